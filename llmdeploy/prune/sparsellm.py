"""SparseLLM (Bai et al., NeurIPS 2024): global pruning of each block's MLP through auxiliary
variables, solved by alternating closed-form updates.

For a gated MLP ``Y = W_down (σ(W_gate X) ⊙ W_up X)`` (Llama-like) SparseLLM introduces the
gate pre-activation ``s``, the up output ``z`` and the down input ``p`` and minimises, over sparse
weights and free auxiliaries (rows are calibration tokens),

    F = ‖Y − p W_downᵀ‖² + β ‖p − σ(s) ⊙ z‖² + α ‖z − X W_upᵀ‖² + α ‖s − X W_gateᵀ‖²

A plain MLP ``Y = W_2 σ(W_1 X)`` (OPT) has ``z`` (pre-activation) and ``p`` only.

**What X and Y are** (``target``):

* ``"mlp"`` (default, the paper's problem and its reference code): ``X`` is the MLP's input and
  ``Y`` the *dense* MLP's own output on it, both taken in one pass of the block before anything
  in it is pruned (upstream blocks already pruned, as in every layer-wise method); with
  ``sequential=True`` attention is pruned first and X, Y are taken after it (the reference's
  ``--true-sequential``).
* ``"block"`` (a variant of ours): ``X`` is taken after this block's attention is pruned, and
  ``Y = dense_block(h) − (h + attn_pruned(h))`` is the MLP output that would make the block
  reproduce the dense block's output, so the MLP also absorbs the pruned attention's error.

Start (round 0): SparseGPT on the three weights, each with its own dense-input Hessian (the
reference's start; the block variant prunes the down projection on the pruned MLP's
activations instead). The auxiliaries start at the dense model's values. Each round:

* ``p`` — ridge least squares: ``p = (Y W_down + β σ(s)⊙z)(W_downᵀW_down + βI)⁻¹``;
* ``z`` — closed form, elementwise: ``(β σ(s) p + α X W_upᵀ) / (β σ(s)² + α)`` (gated), or
  for a plain ReLU MLP the better of the two branch minimisers (the paper's update);
* ``s`` (and ``z`` of a plain MLP with a smooth activation) — elementwise descent steps with
  backtracking, which never increase the objective;
* every weight — least squares onto its new target (``W_up``: X → z, ``W_gate``: X → s,
  ``W_down``: p → Y), then re-pruned to the pattern by SparseGPT with that layer's Hessian
  (XᵀX, or pᵀp for the down projection), which keeps masks exact.

The result is the last round's weights, as in the reference. ``keep_best=True`` (an option of
ours) keeps the round with the lowest true error ``‖MLP_sparse(X) − Y‖²`` instead, so the
result is never worse on the calibration tokens than its SparseGPT start *by construction*.
``report_.history`` records that error (relative to ‖Y‖²) after the start and after each round,
``report_.objective`` the paper's F (relative to ‖Y‖²) after each weight update.

Attention projections are pruned with SparseGPT, as in the paper. Gram matrices and solves are
float64 with relative damping (the reference inverts in fp16, NaN on LLaMA, with a pseudo-inverse),
``alpha = beta`` by default (the reference: 5.0 for LLaMA, 0.1 for OPT, equal to its output
weight γ; only the ratios matter here, the output fit has weight 1). The reference hard-codes a
per-layer schedule for 32-layer models (1 round in layers 1, 30, 31) and prunes only some
layers; here every block of any depth gets ``iterations`` rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import register_method
from ..compress.engine import BlockContext, hooks
from ..errors import ConfigError
from ..models.adapters import MLPParts, get_adapter
from .masks import SparsityPattern
from .pruner import PruningReport
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


@dataclass
class SparseLLMReport(PruningReport):
    """Per block: the true MLP error ‖MLP(X) − Y‖²/‖Y‖² after the SparseGPT start and each round
    (``history``), and the paper's objective F/‖Y‖² at the start and after each round
    (``objective``); ``kept`` is the index of the round each block kept."""

    target: str = "mlp"
    history: list[list[float]] = field(default_factory=list)
    objective: list[list[float]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)

    def summary(self) -> str:
        if not self.history:
            return ""
        first = [h[0] for h in self.history]
        final = [h[k] for h, k in zip(self.history, self.kept)]
        improved = sum(b < f for b, f in zip(final, first))
        return (super().summary() + f"; SparseLLM (target={self.target}) MLP error relative to ‖Y‖², mean over blocks: SparseGPT start "
                f"{sum(first) / len(first):.4f}, result {sum(final) / len(final):.4f}; lower than the start in "
                f"{improved}/{len(first)} blocks")


@register_method("sparsellm")
@dataclass(kw_only=True)
class SparseLLM(SparseGPT):
    """``SparseLLM(sparsity=0.7, iterations=4, alpha=1.0, beta=1.0, target="mlp")``.

    ``alpha`` weighs the pre-activation fits and ``beta`` the activation coupling, both relative
    to the output fit. ``target="mlp"`` is the paper's problem, ``"block"`` our block-output
    variant (see the module docstring); ``keep_best`` keeps the best round instead of the last.
    ``max_tokens`` caps the calibration tokens used by the MLP problem (a deterministic
    subsample; None uses all). Other fields as in :class:`SparseGPT`.
    """

    iterations: int = 4
    alpha: float = 1.0
    beta: float = 1.0
    target: str = "mlp"
    keep_best: bool = False
    max_tokens: int | None = None
    #: the MLP problem gathers its own activations (not reduced over processes)
    supports_distributed: ClassVar[bool] = False

    def validate(self, model) -> None:
        super().validate(model)
        if self.iterations < 0:
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")
        if not (self.alpha > 0 and self.beta > 0):
            raise ConfigError(f"alpha and beta must be > 0, got alpha={self.alpha}, beta={self.beta}")
        if self.target not in ("mlp", "block"):
            raise ConfigError(f"sparsellm: target must be 'mlp' (the paper's) or 'block', got {self.target!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.target == "block" and not get_adapter(model).pre_norm:
            raise ConfigError(
                "SparseLLM's target='block' needs pre-norm blocks (the MLP output adds to the block "
                "output); this model normalises after the residual additions (e.g. OPT-350m). Use "
                "target='mlp'."
            )

    def apply(self, model, calib):
        self.report_ = SparseLLMReport(target=self.target)
        return super().apply(model, calib)

    # -- one block -------------------------------------------------------------------
    def prune_block(self, ctx: BlockContext, pattern: SparsityPattern) -> None:
        mlp = ctx.adapter.mlp_parts(ctx.block)
        mlp_ids = {id(mlp.up), id(mlp.down), id(mlp.gate)}
        linears = ctx.linears()
        attention = [g for g in ctx.adapter.linear_groups(ctx.block)
                     if not any(id(linears[n]) in mlp_ids for n in g)]
        if self.target == "mlp":
            if self.sequential:  # the reference's --true-sequential: X, Y after attention is pruned
                self.prune_groups(ctx, pattern, attention)
            x, target = self._mlp_io(ctx, mlp)
            if not self.sequential:
                self.prune_groups(ctx, pattern, attention)
        else:
            dense_out = ctx.forward()  # the dense block's outputs: the MLP's target below
            self.prune_groups(ctx, pattern, attention)  # attention: SparseGPT, as in the paper
            x, target = self._mlp_problem(ctx, mlp, dense_out)
            dense_out.release()
        with torch.no_grad():
            history, objective, kept = self._prune_mlp(x, target, mlp, pattern)
        report = self.report_
        report.history.append(history)
        report.objective.append(objective)
        report.kept.append(kept)
        log.info("block %d: SparseLLM MLP error (relative to ‖Y‖²) %.4g (SparseGPT start) -> %.4g (round %d of %d)",
                 ctx.index, history[0], history[kept], kept, len(history) - 1)

    def _subsample(self, ctx: BlockContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_tokens is not None and x.shape[0] > self.max_tokens:
            g = torch.Generator().manual_seed(ctx.index)
            keep = torch.randperm(x.shape[0], generator=g)[: self.max_tokens].to(x.device)
            x, y = x[keep], y[keep]
        return x, y

    def _capture_mlp(self, ctx: BlockContext, mlp: MLPParts) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """One pass of the block as it is now: rows of the MLP's input and output (float32, compute
        device) and the block's outputs."""
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []

        def pre(_mod, args):
            xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32))

        def post(_mod, _args, out):
            ys.append(out.detach().reshape(-1, out.shape[-1]).to(torch.float32))

        with hooks((mlp.up, "pre", pre), (mlp.down, "post", post)):
            outs = ctx.forward()
        return torch.cat(xs), torch.cat(ys), outs

    def _mlp_io(self, ctx: BlockContext, mlp: MLPParts) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's problem: rows of the MLP's input X and of the (still dense) MLP's output Y."""
        x, y, _ = self._capture_mlp(ctx, mlp)
        return self._subsample(ctx, x, y)

    def _mlp_problem(self, ctx: BlockContext, mlp: MLPParts, dense_out: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block variant: rows of the MLP's input X (with attention already pruned) and of the
        output that makes the block reproduce the dense block, ``dense_out − (block_out − mlp_out)``
        (the residual stream after the pruned attention is subtracted)."""
        x, mlp_out, outs = self._capture_mlp(ctx, mlp)
        rows = lambda ts: torch.cat([t.reshape(-1, t.shape[-1]).to(ctx.device, torch.float32) for t in ts])  # noqa: E731
        return self._subsample(ctx, x, rows(dense_out) - rows(outs) + mlp_out)

    def _prune_mlp(self, X: torch.Tensor, Y: torch.Tensor, mlp: MLPParts, pattern: SparsityPattern
                   ) -> tuple[list[float], list[float], int]:
        """Run SparseLLM on one MLP in place so that MLP(X) ≈ Y. Returns the relative error
        ‖MLP(X) − Y‖² / ‖Y‖² after SparseGPT (round 0) and after each round, the paper's
        objective F / ‖Y‖² at the same points, and the round whose weights were kept."""
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

        # auxiliaries start at the dense model's values (as in the reference code)
        z = F.linear(X, dense.up, b_up)
        s = F.linear(X, dense.gate, b_gate) if mlp.gated else None
        p = act(s) * z if mlp.gated else act(z)

        def objective(w: _MLPWeights) -> float:
            """The paper's F at the current weights and auxiliaries, relative to ‖Y‖²."""
            f = (Yc - F.linear(p, w.down)).square().sum()
            f += beta * (p - (act(s) * z if mlp.gated else act(z))).square().sum()
            f += alpha * (z - F.linear(X, w.up, b_up)).square().sum()
            if mlp.gated:
                f += alpha * (s - F.linear(X, w.gate, b_gate)).square().sum()
            return float(f) / y_norm

        # start: SparseGPT. The paper's problem prunes the down projection on the dense MLP's
        # activations (one pass, as the reference); the block variant on the pruned MLP's.
        w = _MLPWeights(prune(dense.up, xtx, ux), dense.down, prune(dense.gate, xtx, ux) if mlp.gated else None)
        a = p if self.target == "mlp" else forward(w)[0]
        w.down = prune(dense.down, (a.T @ a).to(torch.float64))
        del a
        _, out = forward(w)
        history = [float((out - Y).square().sum()) / y_norm]
        objectives = [objective(w)]
        best, best_err, kept = w, history[0], 0
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
            objectives.append(objective(w))
            if not self.keep_best:
                best, kept = w, len(history) - 1
            elif err < best_err * (1 - 1e-6):  # a real improvement, not float noise
                best, best_err, kept = w, err, len(history) - 1
        with torch.no_grad():
            mlp.up.weight.copy_(best.up.to(mlp.up.weight))
            mlp.down.weight.copy_(best.down.to(mlp.down.weight))
            if mlp.gated:
                mlp.gate.weight.copy_(best.gate.to(mlp.gate.weight))
        return history, objectives, kept
