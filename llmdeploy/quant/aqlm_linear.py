"""``AQLMLinear``: a linear layer stored as additive codes (AQLM), in the ``aqlm`` package's format.

Each group of ``out_group_size x in_group_size`` weights is the sum of one vector from each of
``num_codebooks`` codebooks of ``2**nbits_per_codebook`` entries, times a per-output-group scale::

    W[o-group i, in-group j] = scales[i] * Σ_c codebooks[c, codes[i, j, c]]

Tensors, shapes, dtypes and packing are those of ``aqlm.QuantizedLinear`` (codes are stored as
signed integers of the smallest width holding ``nbits_per_codebook`` bits: a code k ≥ 2**(n-1)
is stored as k - 2**n), so state dicts are interchangeable.

Forward dispatch: on CUDA with Triton, a matrix-vector kernel for a few tokens and a
dequantize-then-matmul kernel for many; on CPU, a lookup-table kernel (numba) for a few tokens;
everywhere else, and whenever gradients are needed, the plain-torch reference
(:meth:`AQLMLinear.dequantize` + ``F.linear``), which the kernels are tested against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.modules import CompressedModule, register_hf_loader, register_module
from ..errors import CheckpointError, ConfigError
from ..kernels import aqlm_kernel_for
from ..kernels.opaque import opaque_forward
from ..models.adapters import get_adapter

#: at most this many tokens (rows of the flattened input) take the matrix-vector kernels
GEMV_MAX_TOKENS = 8


def code_dtype(nbits: int) -> torch.dtype:
    """The signed integer dtype the ``aqlm`` package stores ``nbits``-bit codes in."""
    if nbits <= 8:
        return torch.int8
    if nbits <= 16:
        return torch.int16
    raise ConfigError(f"AQLM: at most 16 bits per codebook are supported, got {nbits}")


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2**nbits) -> the signed storage of the ``aqlm`` package."""
    codes = codes.to(torch.int64)
    codes = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    return codes.to(code_dtype(nbits))


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Signed storage -> unsigned codes in [0, 2**nbits) (int64)."""
    return codes.to(torch.int64) % (2**nbits)


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int) -> torch.Tensor:
    """The reference decoding (differentiable in codebooks and scales): the dense weight (out, in)."""
    n_out_g, n_in_g, n_cb = codes.shape
    _, k, og, ig = codebooks.shape
    idx = unpack_codes(codes, nbits) + torch.arange(n_cb, device=codes.device) * k  # (O/og, I/ig, C)
    vecs = codebooks.reshape(n_cb * k, og * ig)[idx]  # (O/og, I/ig, C, og*ig)
    groups = vecs.sum(dim=2).view(n_out_g, n_in_g, og, ig) * scales  # scales (O/og,1,1,1)
    return groups.permute(0, 2, 1, 3).reshape(n_out_g * og, n_in_g * ig)


def check_aqlm_shapes(in_features: int, out_features: int, num_codebooks: int, nbits_per_codebook: int,
                      in_group_size: int, out_group_size: int, name: str = "layer") -> None:
    """Clear errors for configurations AQLM cannot represent."""
    if not 1 <= nbits_per_codebook <= 16:
        raise ConfigError(f"AQLM: nbits_per_codebook must be in 1..16, got {nbits_per_codebook} "
                          "(a 2**17-entry codebook does not fit the aqlm format)")
    if num_codebooks < 1 or in_group_size < 1 or out_group_size < 1:
        raise ConfigError("AQLM: num_codebooks, in_group_size and out_group_size must be >= 1")
    if in_features % in_group_size:
        raise ConfigError(f"AQLM: {name} has in_features={in_features}, not divisible by in_group_size="
                          f"{in_group_size}; choose a group size that divides it or exclude the layer")
    if out_features % out_group_size:
        raise ConfigError(f"AQLM: {name} has out_features={out_features}, not divisible by out_group_size="
                          f"{out_group_size}")


@register_module
class AQLMLinear(CompressedModule):
    """A linear layer with additive-quantized weights (see the module docstring)."""

    #: what the CPU kernels (``llmdeploy.kernels.aqlm_cpu``) keep per module: transposed layouts,
    #: 16-bit codes and the C call's plan (raw pointers, a ctypes function)
    derived_caches: ClassVar[tuple[str, ...]] = (*CompressedModule.derived_caches, "_cpu_codes_t", "_cpu_books_t",
                                                 "_cpu_codes_u16", "_cpu_c_plan")

    def __init__(self, in_features: int, out_features: int, num_codebooks: int, nbits_per_codebook: int,
                 in_group_size: int, out_group_size: int = 1, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_aqlm_shapes(in_features, out_features, num_codebooks, nbits_per_codebook, in_group_size,
                          out_group_size)
        self.in_features, self.out_features = in_features, out_features
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.in_group_size, self.out_group_size = in_group_size, out_group_size
        self.codebook_size = 2**nbits_per_codebook
        n_out_g, n_in_g = out_features // out_group_size, in_features // in_group_size
        fk = {"dtype": dtype, "device": device}
        # frozen by default, as in the aqlm package; fine-tuning turns codebooks/scales on
        self.codebooks = nn.Parameter(torch.zeros(num_codebooks, self.codebook_size, out_group_size,
                                                  in_group_size, **fk), requires_grad=False)
        self.codes = nn.Parameter(torch.zeros(n_out_g, n_in_g, num_codebooks, dtype=code_dtype(nbits_per_codebook),
                                              device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(n_out_g, 1, 1, 1, **fk), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **fk), requires_grad=False) if bias else None

    # -- storage -------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.codebooks, self.scales]

    def init_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "num_codebooks": self.num_codebooks, "nbits_per_codebook": self.nbits_per_codebook,
                "in_group_size": self.in_group_size, "out_group_size": self.out_group_size,
                "bias": self.bias is not None}

    def nominal_params(self) -> int:
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def paper_bits_per_param(self) -> float:
        """Bits per weight as the AQLM paper counts them: codes at ``nbits`` each, codebooks and
        scales at 16 bits (bias excluded)."""
        n = self.in_features * self.out_features
        codes = self.codes.numel() * self.nbits_per_codebook
        books = self.codebooks.numel() * 16
        return (codes + books + self.scales.numel() * 16) / n

    @classmethod
    def hf_quantization_config(cls, model: nn.Module) -> dict[str, Any] | None:
        """transformers' ``quantization_config`` (quant_method "aqlm") for a model whose quantized
        linears are all AQLMLinear with one configuration; None when it cannot be expressed."""
        mods = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
        configs = {(m.in_group_size, m.out_group_size, m.num_codebooks, m.nbits_per_codebook) for m in mods.values()}
        others = [n for n, m in model.named_modules() if isinstance(m, CompressedModule) and not isinstance(m, cls)]
        if len(configs) != 1 or others:
            return None
        ig, og, nc, nb = configs.pop()
        # transformers replaces every nn.Linear not listed; 5.x matches module names ("lm_head"),
        # published checkpoints list parameter names ("lm_head.weight"): write both
        dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        keep = [x for n in dense for x in (n, f"{n}.weight")]
        return {"quant_method": "aqlm", "in_group_size": ig, "out_group_size": og, "num_codebooks": nc,
                "nbits_per_codebook": nb, "linear_weights_not_to_quantize": keep}

    # -- compute -------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The dense weight (out, in), differentiable in codebooks and scales."""
        return dequantize(self.codes, self.codebooks, self.scales, self.nbits_per_codebook)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @opaque_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self._parameters, not self.codebooks: a decode step runs ~200 of these, and nn.Module's
        # __getattr__ costs about a microsecond per name
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in self._parameters.values()))
        if not needs_grad:
            kernel = aqlm_kernel_for(self, x, math.prod(x.shape[:-1]))
            if kernel is not None:
                return kernel(x, self)
        return self.forward_reference(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.num_codebooks}x{self.nbits_per_codebook} bits, groups {self.out_group_size}x"
                f"{self.in_group_size}, bias={self.bias is not None}")


def _listed(name: str, entries: set[str]) -> bool:
    """Whether module ``name`` is excluded by ``linear_weights_not_to_quantize`` (entries may be
    module or parameter names; matched whole, from the start or as a suffix at a module boundary)."""
    return any(name == e or name.startswith(e + ".") or name.endswith("." + e) for e in entries)


@register_hf_loader("aqlm")
def load_hf_aqlm(path, dtype: torch.dtype = torch.float32):
    """A Hugging Face AQLM directory (``quantization_config.quant_method == "aqlm"``, written by
    the AQLM authors' tools, by transformers, or by llmdeploy) as a model of AQLMLinear layers.

    ``linear_weights_not_to_quantize`` entries are read as parameter *or* module names, so the
    published ``lm_head.weight`` keeps the head dense (transformers 5 would replace it).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    keep = {str(e).removesuffix(".weight") for e in (qc.get("linear_weights_not_to_quantize") or [])}
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not _listed(name, keep):
            model.set_submodule(name, AQLMLinear(mod.in_features, mod.out_features, int(qc["num_codebooks"]),
                                                 int(qc["nbits_per_codebook"]), int(qc["in_group_size"]),
                                                 int(qc.get("out_group_size", 1)), bias=mod.bias is not None,
                                                 dtype=dtype))
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(path / f)))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{path / f} cannot be read ({e}): missing or corrupt") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    head = f"{get_adapter(model).head_path}.weight"  # a tied head is filled from the embedding
    missing = [k for k in missing if not (tied and k == head)]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match an AQLM {config.model_type} model: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()
