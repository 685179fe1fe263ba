"""The damped inverse Hessian of a layer's calibration inputs, shared by GPTQ and SparseGPT."""

from __future__ import annotations

import logging

import torch

from ..errors import TrainingDivergedError

log = logging.getLogger(__name__)


def inverse_hessian_factor(xtx: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with U ᵀU = (H + λI)⁻¹, λ = percdamp · mean diag(H).

    Computed in float64; columns whose inputs are always zero get a unit diagonal. If the damped
    matrix is still not positive definite, λ grows tenfold (with a warning) until it is.
    """
    H = xtx.to(torch.float64).clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    damp = percdamp * float(diag.mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            break
        log.warning("Hessian not positive definite with damping %.3g; retrying with 10x", damp)
        damp = max(damp * 10, 1e-8)
    else:
        raise TrainingDivergedError("the calibration Hessian is not positive definite even with heavy damping: "
                                    "check the calibration data for constant or non-finite activations")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
