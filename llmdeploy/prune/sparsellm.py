"""SparseLLM (Bai et al., NeurIPS 2024): global pruning of each block's MLP through auxiliary
variables, solved by alternating closed-form updates.

For a gated MLP ``Y = W_down (σ(W_gate X) ⊙ W_up X)`` (Llama-like) SparseLLM introduces the
gate pre-activation ``s``, the up output ``z`` and the down input ``p`` and minimises, over sparse
weights and free auxiliaries (rows are calibration tokens),

    ‖Y − p W_downᵀ‖² + β ‖p − σ(s) ⊙ z‖² + α ‖z − X W_upᵀ‖² + α ‖s − X W_gateᵀ‖²

where ``X`` is the MLP's input in the pruned network (upstream blocks and this block's attention
already pruned) and ``Y`` the MLP output that would make this block reproduce the *dense*
block's output: ``Y = dense_block(h) − (h + attn_pruned(h))``, so the MLP also absorbs the error
of the pruned attention (the reference code targets the dense MLP's own output instead; this
target is the block-level version of the paper's global objective). A plain MLP ``Y = W_2 σ(W_1 X)`` (OPT) has ``z`` (pre-activation) and ``p`` only. Each round:

* ``p`` — ridge least squares: ``p = (Y W_down + β σ(s)⊙z)(W_downᵀW_down + βI)⁻¹``;
* ``z`` — closed form, elementwise: ``(β σ(s) p + α X W_upᵀ) / (β σ(s)² + α)`` (gated), or
  for a plain ReLU MLP the better of the two branch minimisers (the paper's update);
* ``s`` (and ``z`` of a plain MLP with a smooth activation) — elementwise descent steps with
  backtracking, which never increase the objective;
* every weight — least squares onto its new target (``W_up``: X → z, ``W_gate``: X → s,
  ``W_down``: p → Y), then re-pruned to the pattern by SparseGPT with that layer's Hessian
  (XᵀX, or pᵀp for the down projection), which keeps masks exact.

The weights start from SparseGPT's result on the same block (so the initial point is the local
baseline), and the round with the lowest *true* error ‖MLP_sparse(X) − Y‖² is kept — which is
the block's output error against the dense block on the calibration tokens, so the result is
never worse there than its SparseGPT start. Attention projections are pruned with
SparseGPT, as in the paper. Gram matrices and solves are float64 with relative damping, so
models with large activation ranges stay finite. Where the reference code differs: it inverts
in fp16 (NaN on LLaMA), hard-codes its per-layer schedule for 32 layers, and prunes only some
layers; here every block of any depth and width is treated the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import register_method
from ..compress.engine import BlockContext
from ..errors import ConfigError
from ..models.adapters import MLPParts, get_adapter
from .masks import SparsityPattern
from .sparsegpt import SparseGPT, inverse_hessian_factor, sparsegpt_prune

log = logging.getLogger(__name__)


def _solve_ls(target_x: torch.Tensor, xtx: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W minimising ‖T − X Wᵀ‖² + λ‖W‖² given ``target_x = TᵀX`` and ``xtx = XᵀX`` (float64)."""
    H = xtx.to(torch.float64).clone()
    H.diagonal().add_(percdamp * float(H.diagonal().mean().clamp_min(1e-12)))
    L = torch.linalg.cholesky(H)
    return torch.cholesky_solve(target_x.to(torch.float64).T, L).T.to(torch.float32)


def _coupling_objective(s, p, u, m, act, alpha, beta):
    a = act(s) if u is None else act(s) * u
    return beta * (p - a).square() + alpha * (s - m).square()


def activation_prox(
    s: torch.Tensor, p: torch.Tensor, u: torch.Tensor | None, m: torch.Tensor, act: nn.Module,
    alpha: float, beta: float, steps: int = 2,
) -> torch.Tensor:
    """Elementwise ``argmin_s β(p − σ(s)·u)² + α(s − m)²`` (``u = 1`` when None), starting at ``s``.

    ReLU has a closed form (the better of the branch minimisers); other activations take
    gradient steps with elementwise backtracking, so the objective never increases.
    """
    uu = torch.ones_like(p) if u is None else u
    if isinstance(act, nn.ReLU):
        pos = ((beta * uu * p + alpha * m) / (beta * uu.square() + alpha)).clamp_min(0)
        neg = m.clamp_max(0)
        f_pos = _coupling_objective(pos, p, u, m, act, alpha, beta)
        f_neg = _coupling_objective(neg, p, u, m, act, alpha, beta)
        return torch.where(f_pos <= f_neg, pos, neg)
    s = s.clone()
    for _ in range(steps):
        with torch.enable_grad():
            x = s.detach().requires_grad_(True)
            f0 = _coupling_objective(x, p, u, m, act, alpha, beta)
            (grad,) = torch.autograd.grad(f0.sum(), x)
        f0 = f0.detach()
        # 1/L for the curvature 2α + 2β·u²·(max σ')² of a quadratic model; quartered on failure
        t = 1.0 / (2 * alpha + 2.5 * beta * uu.square())
        for _ in range(2):
            cand = s - t * grad
            ok = _coupling_objective(cand, p, u, m, act, alpha, beta) < f0
            s = torch.where(ok, cand, s)
            if bool(ok.all()):
                break
            grad = grad.masked_fill(ok, 0.0)  # accepted elements stay where they are
            t = t / 4
    return s


@dataclass
class _MLPWeights:
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None


@register_method("sparsellm")
@dataclass
class SparseLLM(SparseGPT):
    """``SparseLLM(sparsity=0.7, iterations=4, alpha=1.0, beta=1.0)``.

    ``alpha`` weighs the pre-activation fits and ``beta`` the activation coupling, both relative
    to the output fit (the reference uses equal weights: 5.0 for LLaMA, 0.1 for OPT; only the
    ratios matter). ``max_tokens`` caps the calibration tokens used by the MLP problem (a
    deterministic subsample; None uses all). Other fields as in :class:`SparseGPT`.
    """

    iterations: int = 4
    alpha: float = 1.0
    beta: float = 1.0
    max_tokens: int | None = None

    def validate(self, model) -> None:
        super().validate(model)
        if self.iterations < 0:
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")
        if not (self.alpha > 0 and self.beta > 0):
            raise ConfigError(f"alpha and beta must be > 0, got alpha={self.alpha}, beta={self.beta}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if not get_adapter(model).pre_norm:
            raise ConfigError(
                "SparseLLM needs pre-norm blocks (the MLP output adds to the block output); this "
                "model normalises after the residual additions (e.g. OPT-350m). Use SparseGPT."
            )

    def apply(self, model, calib):
        self.history_: list[list[float]] = []
        return super().apply(model, calib)

    def summary(self) -> str:
        """One line on the last run: the error of the SparseGPT start and of the kept rounds."""
        if not getattr(self, "history_", None):
            return ""
        first = [h[0] for h in self.history_]
        best = [min(h) for h in self.history_]
        improved = sum(b < f for b, f in zip(best, first))
        return (f"block output error relative to the MLP target, mean over blocks: SparseGPT start "
                f"{sum(first) / len(first):.4f}, kept {sum(best) / len(best):.4f}; improved in "
                f"{improved}/{len(first)} blocks")

    # -- one block -------------------------------------------------------------------
    def prune_block(self, ctx: BlockContext, pattern: SparsityPattern) -> None:
        mlp = ctx.adapter.mlp_parts(ctx.block)
        dense_out = ctx.forward()  # the dense block's outputs: the MLP's target below
        mlp_ids = {id(mlp.up), id(mlp.down), id(mlp.gate)}
        linears = ctx.linears()
        attention = [g for g in ctx.adapter.linear_groups(ctx.block)
                     if not any(id(linears[n]) in mlp_ids for n in g)]
        self.prune_groups(ctx, pattern, attention)  # attention: SparseGPT, as in the paper
        x, target = self._mlp_problem(ctx, mlp, dense_out)
        del dense_out
        with torch.no_grad():
            history = self._prune_mlp(x, target, mlp, pattern)
        self.history_.append(history)
        log.info("block %d: SparseLLM block output error (relative to the MLP target) %.4g (SparseGPT start) -> %.4g "
                 "(best of %d rounds)", ctx.index, history[0], min(history), len(history) - 1)

    def _mlp_problem(self, ctx: BlockContext, mlp: MLPParts, dense_out: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the MLP's input X (with attention already pruned) and of its target: the
        output that makes the block reproduce the dense block, ``dense_out − (block_out − mlp_out)``
        (the residual stream after the pruned attention is subtracted). Float32, compute device."""
        xs: list[torch.Tensor] = []
        mlp_outs: list[torch.Tensor] = []

        def pre(_mod, args):
            xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32))

        def post(_mod, _args, out):
            mlp_outs.append(out.detach().reshape(-1, out.shape[-1]).to(torch.float32))

        handles = [mlp.up.register_forward_pre_hook(pre), mlp.down.register_forward_hook(post)]
        try:
            outs = ctx.forward()
        finally:
            for h in handles:
                h.remove()
        rows = lambda ts: torch.cat([t.reshape(-1, t.shape[-1]).to(ctx.device, torch.float32) for t in ts])  # noqa: E731
        x = torch.cat(xs)
        target = rows(dense_out) - rows(outs) + torch.cat(mlp_outs)
        if self.max_tokens is not None and x.shape[0] > self.max_tokens:
            g = torch.Generator().manual_seed(ctx.index)
            keep = torch.randperm(x.shape[0], generator=g)[: self.max_tokens].to(x.device)
            x, target = x[keep], target[keep]
        return x, target

    def _prune_mlp(self, X: torch.Tensor, Y: torch.Tensor, mlp: MLPParts, pattern: SparsityPattern) -> list[float]:
        """Run SparseLLM on one MLP in place so that MLP(X) ≈ Y; returns the relative error
        ‖MLP(X) − Y‖² / ‖Y‖² after SparseGPT (round 0) and after each round."""
        act, alpha, beta = mlp.act, self.alpha, self.beta
        f32 = lambda t: None if t is None else t.detach().to(X.device, torch.float32)  # noqa: E731
        b_up, b_down = f32(mlp.up.bias), f32(mlp.down.bias)
        b_gate = f32(mlp.gate.bias) if mlp.gated else None
        dense = _MLPWeights(f32(mlp.up.weight), f32(mlp.down.weight), f32(mlp.gate.weight) if mlp.gated else None)

        def forward(w: _MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
            z = F.linear(X, w.up, b_up)
            a = act(F.linear(X, w.gate, b_gate)) * z if mlp.gated else act(z)
            return a, F.linear(a, w.down, b_down)

        Yc = Y if b_down is None else Y - b_down
        y_norm = float(Y.square().sum().clamp_min(1e-30))
        xtx = (X.T @ X).to(torch.float64)
        ux = inverse_hessian_factor(xtx, self.percdamp)  # shared by up and gate (same inputs)

        def prune(w: torch.Tensor, h: torch.Tensor, hinv: torch.Tensor | None = None) -> torch.Tensor:
            return sparsegpt_prune(w, h, pattern, blocksize=self.blocksize, percdamp=self.percdamp, hinv=hinv)

        # start: SparseGPT, sequential (the down projection sees the pruned MLP inputs)
        w = _MLPWeights(prune(dense.up, xtx, ux), dense.down, prune(dense.gate, xtx, ux) if mlp.gated else None)
        a, _ = forward(w)
        w.down = prune(dense.down, (a.T @ a).to(torch.float64))
        a, out = forward(w)
        history = [float((out - Y).square().sum()) / y_norm]
        best, best_err = w, history[0]

        # auxiliaries start at the dense model's values (as in the reference code)
        z = F.linear(X, dense.up, b_up)
        s = F.linear(X, dense.gate, b_gate) if mlp.gated else None
        p = act(s) * z if mlp.gated else act(z)
        eye = torch.eye(p.shape[1], dtype=torch.float64, device=X.device)
        # at sparsity 0 SparseGPT's start reproduces the block exactly: nothing to improve
        rounds = 0 if not pattern.structured and pattern.sparsity == 0 else self.iterations
        for _ in range(rounds):
            # p: ridge least squares between the output fit and the activation coupling
            target = act(s) * z if mlp.gated else act(z)
            lhs = (w.down.T @ w.down).to(torch.float64) + beta * eye  # SPD: inverse in float64
            p = (Yc @ w.down + beta * target) @ torch.cholesky_inverse(torch.linalg.cholesky(lhs)).to(torch.float32)
            del target
            m_up = F.linear(X, w.up, b_up)
            if mlp.gated:
                g = act(s)
                z = (beta * g * p + alpha * m_up) / (beta * g.square() + alpha)
                del g
                s = activation_prox(s, p, z, F.linear(X, w.gate, b_gate), act, alpha, beta)
            else:
                z = activation_prox(z, p, None, m_up, act, alpha, beta)
            del m_up
            # weights: least squares onto the new targets, then re-pruned by SparseGPT
            zt = z if b_up is None else z - b_up
            new = _MLPWeights(prune(_solve_ls(zt.T @ X, xtx, self.percdamp), xtx, ux), w.down, None)
            if mlp.gated:
                st = s if b_gate is None else s - b_gate
                new.gate = prune(_solve_ls(st.T @ X, xtx, self.percdamp), xtx, ux)
            ptp = (p.T @ p).to(torch.float64)
            new.down = prune(_solve_ls(Yc.T @ p, ptp, self.percdamp), ptp)
            w = new
            _, out = forward(w)
            err = float((out - Y).square().sum()) / y_norm
            history.append(err)
            if err < best_err * (1 - 1e-6):  # a real improvement, not float noise
                best, best_err = w, err
        with torch.no_grad():
            mlp.up.weight.copy_(best.up.to(mlp.up.weight))
            mlp.down.weight.copy_(best.down.to(mlp.down.weight))
            if mlp.gated:
                mlp.gate.weight.copy_(best.gate.to(mlp.gate.weight))
        return history
