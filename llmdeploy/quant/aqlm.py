"""AQLM (Egiazarian et al., ICML 2024): additive quantization of each linear with learned codebooks.

Every group of ``in_group_size`` weights of a row is approximated by ``scale_row · Σ_c C_c[b_c]``,
one vector from each of ``num_codebooks`` codebooks of ``2**nbits_per_codebook`` entries. Per
decoder block, through the shared calibration engine:

1. ``H = XᵀX / n`` of each linear's calibration inputs; the objective is the layer output error
   ``‖(W − Ŵ)X‖² / n = tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (reported relative to ``tr(W H Wᵀ)``).
2. Initialise: scales = row norms; codes and codebooks by residual k-means on the normalised
   weight groups (codebook c clusters what codebooks < c left over).
3. Alternate until the relative improvement of a round falls below ``relative_mse_tolerance``
   (at most ``max_iter`` rounds): (a) ``steps_per_round`` Adam steps on codebooks and scales with
   the codes fixed; (b) beam search over the codes with codebooks fixed: input groups in order,
   codebooks inside, each row keeping its ``beam_size`` best full-row hypotheses; every
   candidate's exact objective change comes from the running ``(W − Ŵ)H`` in closed form, and
   the unchanged code is always a candidate, so a sweep never increases the objective.
4. Block fine-tuning: with all codes fixed, Adam on the block's codebooks, scales, norms (found
   through the adapter) and linear biases to match the *dense* block's outputs on the same
   (quantized-upstream) inputs, in float32 even when the model is bf16/fp16; Adam steps of
   ``finetune_batch_size`` windows (gradients accumulated over the engine's batches, as the
   reference's ``local_batch_size``); optionally early stopping and keeping the best epoch.

With ``checkpoint_dir`` the engine checkpoints every finished block (block, next inputs, report;
:mod:`llmdeploy.compress.resume`); ``resume=True`` restores the finished blocks and continues,
giving the result of an uninterrupted run (every random choice is seeded per block and layer).
Several processes split the beam search by output groups (:func:`beam_search_split`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import Compressor, Report, engine_field, register_method
from ..compress.distributed import gather_rows, my_rows, world
from ..compress.engine import BlockContext, run_blockwise, to_device
from ..compress.modules import CompressedModule, compressed_modules
from ..compress.streaming import engine_options, streaming
from ..errors import ConfigError
from ..models.adapters import get_adapter
from .aqlm_linear import AQLMLinear, check_aqlm_shapes, dequantize, pack_codes

log = logging.getLogger(__name__)


# -- initialisation ------------------------------------------------------------------------
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x`` (n, d): (centroids (k, d), assignment (n,)).
    With n <= k every row is its own centroid (the rest are zero)."""
    n, d = x.shape
    if n <= k:
        cent = torch.zeros(k, d, dtype=x.dtype, device=x.device)
        cent[:n] = x
        return cent, torch.arange(n, device=x.device)
    cent = x[torch.randperm(n, generator=generator).to(x.device)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        assign = nearest(x, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        cent = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        if empty.any():  # re-seed empty clusters with random points
            cent[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=generator).to(x.device)]
    return cent, nearest(x, cent)


def nearest(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every row of ``x`` (squared Euclidean, up to the
    constant ‖x‖²)."""
    c2 = (cent * cent).sum(1).unsqueeze(0)
    chunk = max(1, 2**22 // cent.shape[0])  # distance tiles of ~16 MB stay in cache
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.addmm(c2, x[s:s + chunk], cent.T, alpha=-2.0).argmin(1)
    return out


def init_aq(weight: torch.Tensor, num_codebooks: int, nbits: int, in_group_size: int, out_group_size: int,
            kmeans_iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales (row-group norms) and residual k-means: (codes (O', G, C) int64, codebooks (C, K, og, ig),
    scales (O', 1, 1, 1))."""
    out_f, in_f = weight.shape
    og, ig = out_group_size, in_group_size
    groups = weight.reshape(out_f // og, og, in_f // ig, ig).permute(0, 2, 1, 3)  # (O', G, og, ig)
    scales = groups.flatten(1).norm(dim=1).clamp(min=1e-9).view(-1, 1, 1, 1)
    residual = (groups / scales).reshape(-1, og * ig).clone()
    k = 2**nbits
    codes, books = [], []
    for _ in range(num_codebooks):
        cent, assign = kmeans(residual, k, kmeans_iters, generator)
        residual -= cent[assign]
        codes.append(assign)
        books.append(cent.view(k, og, ig))
    codes_t = torch.stack(codes, dim=1).view(out_f // og, in_f // ig, num_codebooks)
    return codes_t, torch.stack(books), scales


# -- objective -----------------------------------------------------------------------------
def layer_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, the layer's mean squared output error on the calibration data."""
    delta = weight - w_hat
    return ((delta @ hessian) * delta).sum()


# -- beam search ---------------------------------------------------------------------------
@torch.no_grad()
def beam_search_codes(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                      scales: torch.Tensor, beam_size: int) -> torch.Tensor:
    """Codes (unsigned, (O', G, C)) minimising the layer error for fixed codebooks and scales.

    Rows (output groups) are independent and run together. For each input group j, and each
    codebook c within it, every hypothesis of a row expands to the K choices of code (j, c); the
    exact error of each follows in closed form from the hypothesis' error and its running
    ``R H`` (R = W − Ŵ); the ``beam_size`` best survive. Returns each row's best hypothesis, never
    worse than ``codes`` (keeping a code is always a candidate).
    """
    n_og, n_g, n_c = codes.shape
    _, k, og, ig = codebooks.shape
    in_f = weight.shape[1]
    nbits = int(math.log2(k))
    resid = (weight - dequantize(codes, codebooks, scales, nbits)).view(n_og, 1, og, in_f)  # (O', B, og, I)
    rh = resid @ hessian
    loss = (rh * resid).sum(dim=(2, 3))  # (O', B)
    beams = codes.unsqueeze(1).clone()  # (O', B, G, C)
    rows = torch.arange(n_og).unsqueeze(1)
    sv = scales.view(n_og, 1, 1)
    for j in range(n_g):
        cols = slice(j * ig, (j + 1) * ig)
        h_jj, h_j = hessian[cols, cols], hessian[cols, :]
        for c in range(n_c):
            cb = codebooks[c]  # (K, og, ig)
            flat = cb.reshape(k, og * ig)
            quad = ((cb @ h_jj) * cb).sum(dim=(1, 2))  # <A_k H, A_k>
            old = cb[beams[:, :, j, c]]  # B: the current codeword, (O', B, og, ig)
            u = rh[..., cols]
            old_h = old @ h_jj
            au = u.flatten(2) @ flat.T  # <A_k, u>, (O', B, K)
            abh = old_h.flatten(2) @ flat.T  # <A_k, B H>
            bu = (old * u).sum(dim=(2, 3)).unsqueeze(-1)
            bhb = (old_h * old).sum(dim=(2, 3)).unsqueeze(-1)
            # new error = error - 2 s <A_k - B, u> + s² <(A_k - B) H, A_k - B>
            total = loss.unsqueeze(-1) - 2 * sv * (au - bu) + sv * sv * (quad - 2 * abh + bhb)
            best, idx = torch.topk(total.flatten(1), min(beam_size, total.shape[1] * k), dim=1, largest=False)
            parent, code = idx // k, idx % k  # (O', B')
            if beams.shape[1] > 1 or parent.shape[1] > 1:
                beams, old = beams[rows, parent].clone(), old[rows, parent]
                resid, rh = resid[rows, parent].clone(), rh[rows, parent].clone()
            beams[:, :, j, c] = code
            delta = (cb[code] - old) * scales.view(n_og, 1, 1, 1)  # the change of Ŵ in group j
            resid[..., cols] -= delta
            rh -= delta @ h_j
            loss = best
    return beams[torch.arange(n_og), loss.argmin(dim=1)]


def beam_search_split(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                      scales: torch.Tensor, beam_size: int) -> torch.Tensor:
    """:func:`beam_search_codes` with the output groups shared among the processes of a
    distributed run (each searches a contiguous slice; the codes are then gathered), as the
    reference splits its beam search over devices by output channels. Output groups are
    independent, so the codes equal one process's exactly. Alone: the plain search."""
    if world()[1] == 1:
        return beam_search_codes(weight, hessian, codes, codebooks, scales, beam_size)
    n_og = codes.shape[0]
    og = weight.shape[0] // n_og
    lo, hi = my_rows(n_og)
    mine = beam_search_codes(weight[lo * og:hi * og], hessian, codes[lo:hi], codebooks, scales[lo:hi], beam_size) \
        if hi > lo else codes[:0]
    return gather_rows(mine, n_og)


@torch.no_grad()
def encode_groups_l2(target: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, beam_size: int,
                     chunk: int = 8192) -> torch.Tensor:
    """Codes (unsigned, (n, C)) of ``n`` weight groups minimising ``‖target − Σ_c codebooks[c, code_c]‖²``
    for fixed codebooks (no activations: the plain weight-space error PV-Tuning's V step projects
    with). ``target`` (n, og*ig) is already divided by each group's scale; ``codes`` (n, C) is the
    start. Codebooks are visited in order; every hypothesis expands to the K codes of the next
    codebook with its exact error, and the ``beam_size`` best survive. Keeping a code is always a
    candidate, so no group ends worse than it started. With ``beam_size == 1`` this is one sweep of
    coordinate descent, computed as ``argmin_k ‖b_k‖² − 2 r·b_k`` per codebook (:func:`_greedy_sweep`)."""
    n, n_c = codes.shape
    k = codebooks.shape[1]
    books = codebooks.reshape(n_c, k, -1).float()
    norms = (books * books).sum(-1)  # (C, K)
    if beam_size == 1:
        return _greedy_sweep(target, codes, books, norms)
    return _beam_search(target, codes, books, norms, beam_size, chunk)


def _beam_search(target: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, norms: torch.Tensor,
                 beam_size: int, chunk: int = 8192) -> torch.Tensor:
    """``encode_groups_l2``'s beam search; ``books`` (C, K, d) float, ``norms`` (C, K) their squared norms."""
    n, n_c = codes.shape
    k = books.shape[1]
    out = torch.empty_like(codes)
    for s in range(0, n, chunk):
        beams = codes[s:s + chunk].unsqueeze(1).clone()  # (m, B, C)
        m = beams.shape[0]
        rows = torch.arange(m, device=codes.device).unsqueeze(1)
        resid = (target[s:s + chunk].float() - books[torch.arange(n_c), beams[:, 0]].sum(1)).unsqueeze(1)
        err = (resid * resid).sum(-1)  # (m, B)
        for c in range(n_c):
            r = resid + books[c][beams[..., c]]  # residual without codebook c, (m, B, d)
            score = (r * r).sum(-1, keepdim=True) - 2 * (r @ books[c].T) + norms[c]  # (m, B, K)
            err, idx = torch.topk(score.flatten(1), min(beam_size, score.shape[1] * k), dim=1, largest=False)
            parent, code = idx // k, idx % k
            beams = beams[rows, parent].clone()
            beams[..., c] = code
            resid = r[rows, parent] - books[c][code]
        out[s:s + chunk] = beams[torch.arange(m), err.argmin(1)]
    return out


def _greedy_sweep(target: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, norms: torch.Tensor,
                  chunk: int = 4096) -> torch.Tensor:
    """``encode_groups_l2`` at beam 1: codebook by codebook, each group's code becomes the codeword
    nearest to the residual without that codebook. ‖r‖² is the same for every candidate, so the
    nearest codeword minimises ‖b_k‖² − 2 r·b_k: one matrix product and an argmin per chunk of groups
    (no (groups, K, d) tensor, no top-k), which is what makes re-encoding every group of a model
    each step (STE) affordable on a CPU."""
    n_c = books.shape[0]
    out = codes.clone()
    with torch.no_grad():
        for s in range(0, codes.shape[0], chunk):
            cur = out[s:s + chunk].long()
            resid = target[s:s + chunk].float() - books[torch.arange(n_c), cur].sum(1)  # (m, d)
            for c in range(n_c):
                r = resid + books[c][cur[:, c]]
                best = torch.addmm(norms[c], r, books[c].T, alpha=-2).argmin(1)
                cur[:, c] = best
                resid = r - books[c][best]
            out[s:s + chunk] = cur.to(out.dtype)
    return out


# -- one layer -----------------------------------------------------------------------------
@dataclass
class LayerResult:
    codes: torch.Tensor  # unsigned (O', G, C)
    codebooks: torch.Tensor
    scales: torch.Tensor
    errors: list[float] = field(default_factory=list)  # relative error after init and each round

    @property
    def error(self) -> float:
        """The relative error of the returned (best) state."""
        return min(self.errors)


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, cfg: AQLM, generator: torch.Generator) -> LayerResult:
    """AQLM of one weight matrix against the calibration Hessian ``H = XᵀX / n``."""
    weight = weight.float()
    hessian = hessian.float()
    norm = layer_error(weight, torch.zeros_like(weight), hessian).clamp(min=1e-12)
    codes, books, scales = init_aq(weight, cfg.num_codebooks, cfg.nbits_per_codebook, cfg.in_group_size,
                                   cfg.out_group_size, cfg.kmeans_iters, generator)
    books = books.clone().requires_grad_(True)
    scales = scales.clone().requires_grad_(True)
    opt = torch.optim.Adam([books, scales], lr=cfg.lr, betas=(0.0, 0.95))

    def rel_error() -> float:
        with torch.no_grad():
            return (layer_error(weight, dequantize(codes, books, scales, cfg.nbits_per_codebook), hessian) / norm).item()

    errors = [rel_error()]
    best = (errors[0], codes.clone(), books.detach().clone(), scales.detach().clone())
    for _ in range(cfg.max_iter):
        for _ in range(cfg.steps_per_round):
            # d/dŴ tr((W − Ŵ) H (W − Ŵ)ᵀ) = −2 (W − Ŵ) H: one matmul, then autograd only through
            # the (cheap) decoding into codebooks and scales
            opt.zero_grad(set_to_none=True)
            w_hat = dequantize(codes, books, scales, cfg.nbits_per_codebook)
            with torch.no_grad():
                grad = (weight - w_hat) @ hessian * (-2.0 / norm)
            w_hat.backward(grad)
            opt.step()
        codes = beam_search_split(weight, hessian, codes, books.detach(), scales.detach(), cfg.beam_size)
        errors.append(rel_error())
        if errors[-1] < best[0]:
            best = (errors[-1], codes.clone(), books.detach().clone(), scales.detach().clone())
        if errors[-2] - errors[-1] < cfg.relative_mse_tolerance * errors[-2]:
            break
    # Adam can step away from an optimum (its steps do not shrink with the gradient): keep the
    # best state seen, never worse than the k-means start
    return LayerResult(best[1], best[2], best[3], errors)


def _finite_hessian(h: torch.Tensor) -> torch.Tensor:
    """Damp a (possibly singular) Hessian slightly so that the objective is well posed."""
    damp = 1e-4 * h.diagonal().mean().clamp(min=1e-8)
    return h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


@dataclass
class AQLMReport(Report):
    """``errors``: each linear's relative layer error after the k-means start and each round;
    ``finetune``: each block's relative output error before and after each fine-tuning epoch."""

    label: str = ""
    errors: dict[str, list[float]] = field(default_factory=dict)
    finetune: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.errors:
            return ""
        final = [min(e) for e in self.errors.values()]
        rounds = [len(e) - 1 for e in self.errors.values()]
        s = (f"{self.label}: mean relative layer error {sum(final) / len(final):.4f} after "
             f"{sum(rounds) / len(rounds):.1f} rounds on average")
        gains = [1 - min(v) / v[0] for v in self.finetune.values() if v and v[0] > 0]
        if gains:
            s += f"; block fine-tuning lowered block output error by {sum(gains) / len(gains):.1%} on average"
        return s


@register_method("aqlm")
@dataclass(kw_only=True)
class AQLM(Compressor):
    """Additive quantization of every decoder-block linear (see the module docstring).

    ``num_codebooks x nbits_per_codebook`` bits per ``in_group_size`` weights: 2x8 with groups of
    8 is 2 bits per weight (plus codebooks and scales), 1x16 with groups of 8 also 2 bits.

    **The defaults are a fast setting, far cheaper than the reference's.** The reference
    (``main.py`` of the AQLM repository and its README recipe) runs up to 1000 rounds of 100 Adam
    steps per layer (stopped by ``relative_mse_tolerance=0.01``), 100 k-means iterations, and
    block fine-tuning at lr 1e-5 for up to 10 epochs of 32-window batches with early stopping
    after 3 epochs without improvement, keeping the best epoch, on 1024 calibration sequences of
    4096 tokens (Llama-2). Here: at most 8 rounds of 40 steps, 16 k-means iterations, 2 epochs
    at lr 1e-4 without early stopping. The recipes ``aqlm-2x8-paper`` and ``aqlm-1x16-paper``
    carry the reference's settings (see docs/methods.md for their run time); ``aqlm-2x8`` is
    the fast one. Early stopping and the best epoch are judged on the training windows (the
    reference holds out ``val_size`` sequences).
    """

    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    in_group_size: int = 8
    out_group_size: int = 1
    beam_size: int = 1
    max_iter: int = 8
    relative_mse_tolerance: float = 0.01
    steps_per_round: int = 40
    lr: float = 1e-4
    kmeans_iters: int = 16
    finetune_blocks: bool = True
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 8
    finetune_early_stop: int | None = None
    finetune_keep_best: bool = False
    finetune_max_samples: int | None = None
    checkpoint_dir: str | None = engine_field(None)
    resume: bool = engine_field(False)
    seed: int = 0
    device: str | None = engine_field(None)
    batch_size: int = engine_field(8)
    needs_calibration = True
    supports_resume = True  # checkpoint_dir / resume: the CLI wires --resume to it
    streamable = True
    supports_distributed = True

    # -- checks --------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        if self.nbits_per_codebook > 16 or self.nbits_per_codebook < 1:
            raise ConfigError(f"aqlm: nbits_per_codebook must be in 1..16, got {self.nbits_per_codebook} "
                              "(larger codebooks do not fit the aqlm format; use more codebooks instead)")
        if self.beam_size < 1 or self.max_iter < 0 or self.steps_per_round < 0:
            raise ConfigError("aqlm: beam_size must be >= 1, max_iter and steps_per_round >= 0")
        if self.finetune_batch_size < 1 or self.finetune_batch_size % self.batch_size:
            raise ConfigError(f"aqlm: finetune_batch_size ({self.finetune_batch_size}) must be a positive "
                              f"multiple of the engine's batch_size ({self.batch_size}): gradients are "
                              "accumulated over whole engine batches")
        if self.finetune_early_stop is not None and self.finetune_early_stop < 1:
            raise ConfigError("aqlm: finetune_early_stop must be >= 1 epochs or None")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("aqlm: resume=True needs checkpoint_dir (where the finished blocks were saved)")
        if streaming(model) and self.checkpoint_dir:
            raise ConfigError("aqlm: a streamed run checkpoints every finished block itself; leave checkpoint_dir unset")
        if compressed_modules(model):
            raise ConfigError("aqlm: the model already holds compressed modules; quantize the dense model")
        adapter = get_adapter(model)
        for i, block in enumerate(adapter.blocks()):
            for path, lin in adapter.block_linears(block).items():
                check_aqlm_shapes(lin.in_features, lin.out_features, self.num_codebooks, self.nbits_per_codebook,
                                  self.in_group_size, self.out_group_size, name=f"{adapter.blocks_path}.{i}.{path}")

    def config_dict(self) -> dict:
        """The fields that determine the result (not where it is saved or whether it resumes);
        the engine's batch size is one of them: the fine-tuning accumulates over its batches."""
        d = self.to_dict()
        d.pop("method", None)
        d["batch_size"] = self.batch_size
        return d

    # -- the walk ------------------------------------------------------------------------
    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        report = self.report_ = AQLMReport(
            label=f"AQLM {self.num_codebooks}x{self.nbits_per_codebook} g{self.in_group_size}")

        def process(ctx: BlockContext) -> None:
            target = ctx.forward() if self.finetune_blocks else None
            stats = ctx.collect_stats()
            linears = ctx.linears()
            for li, (path, lin) in enumerate(linears.items()):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.index * 1000 + li)
                h = _finite_hessian(stats[path].xtx / max(stats[path].n_rows, 1))
                res = quantize_layer(lin.weight.detach().to(ctx.device), h.to(ctx.device), self, gen)
                ctx.block.set_submodule(path, self._module(lin, res))
                report.errors[f"{ctx.name}.{path}"] = res.errors
                log.debug("aqlm %s.%s relative error %s", ctx.name, path, [round(e, 4) for e in res.errors])
            if self.finetune_blocks and target is not None:
                report.finetune[ctx.name] = finetune_block(ctx, target, self)

        # checkpoint_dir: the engine checkpoints every finished block (and resumes after the last)
        resumable = engine_options(model, checkpoint_dir=self.checkpoint_dir, resume=self.resume) \
            if self.checkpoint_dir else contextlib.nullcontext()
        with resumable:
            run_blockwise(model, calib, process, device=self.device, batch_size=self.batch_size, desc="AQLM",
                          key=self.config_dict(), report=report)
        return model

    def _module(self, lin: nn.Linear, res: LayerResult) -> AQLMLinear:
        m = AQLMLinear(lin.in_features, lin.out_features, self.num_codebooks, self.nbits_per_codebook,
                       self.in_group_size, self.out_group_size, bias=lin.bias is not None,
                       dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            m.codes.copy_(pack_codes(res.codes, self.nbits_per_codebook))
            m.codebooks.copy_(res.codebooks)
            m.scales.copy_(res.scales)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m


# -- block fine-tuning ---------------------------------------------------------------------
def finetune_parameters(ctx: BlockContext) -> list[nn.Parameter]:
    """What block fine-tuning trains, chosen through the adapter: the compressed linears'
    continuous parameters (codebooks, scales), every linear's bias, and every norm's parameters."""
    params: list[nn.Parameter] = []
    for lin in ctx.linears().values():
        if isinstance(lin, CompressedModule):
            params += lin.trainable_parameters()
        if getattr(lin, "bias", None) is not None:
            params.append(lin.bias)
    for norm in ctx.adapter.block_norms(ctx.block).values():
        params += [p for p in norm.parameters() if p.dtype.is_floating_point]
    return list({id(p): p for p in params}.values())


def finetune_block(ctx: BlockContext, target: list[torch.Tensor], cfg: AQLM) -> list[float]:
    """Adam on the block's codebooks, scales, norms and biases (codes fixed) to match ``target``,
    the dense block's outputs, in float32 whatever the model's dtype. One Adam step per
    ``finetune_batch_size`` windows (gradients accumulated over the engine's batches),
    ``finetune_max_samples`` windows at most; ``finetune_early_stop`` epochs without improvement
    end it and ``finetune_keep_best`` restores the best epoch. Returns the relative output error
    before and after each epoch. Several processes: each runs the batches it holds of every Adam
    step's chunk; gradients and losses are summed before the step (the single-process step)."""
    block = ctx.block
    params = finetune_parameters(ctx)
    if not params:
        return []
    dtype = next(block.parameters()).dtype
    if dtype != torch.float32:
        block.float()  # fine-tune in float32: bf16/fp16 Adam updates of 1e-5 round to nothing
    was = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # the windows' batches of every process, in rank order: the same list the single process has
    # (each process holds a contiguous share); each process runs the batches it holds, and the
    # losses and gradients are summed over the processes, so every Adam step is the single-process
    # one (up to the order of the sums) and the processes stay identical
    rank, size = world()
    counts = torch.zeros(size, dtype=torch.int64)
    counts[rank] = len(ctx.inputs)
    ctx.reduce(counts)
    first = int(counts[:rank].sum())
    owned = {first + i: i for i in range(len(ctx.inputs))}  # global batch -> local batch
    windows = torch.tensor(float(sum(t.shape[0] for t in ctx.inputs)), dtype=torch.float64)
    bs = min(cfg.batch_size, int(ctx.reduce(windows)))
    order = list(range(int(counts.sum())))
    if cfg.finetune_max_samples is not None:
        order = order[: max(1, cfg.finetune_max_samples // max(1, bs))]
    mine = [b for b in order if b in owned]
    denom_t = torch.tensor(sum(float((target[owned[b]].float() ** 2).mean()) for b in mine), dtype=torch.float64)
    denom = float(ctx.reduce(denom_t)) / len(order)
    per_step = max(1, cfg.finetune_batch_size // max(1, bs))

    def run(i: int) -> torch.Tensor:
        x = ctx.inputs[i].to(ctx.device).float()
        out = ctx.adapter.block_output(block(x, **to_device(ctx.kwargs[i], ctx.device, torch.float32)))
        return F.mse_loss(out.float(), target[i].to(ctx.device).float()) / max(denom, 1e-12)

    def error() -> float:
        with torch.no_grad():
            local = torch.tensor(sum(float(run(owned[b])) for b in mine), dtype=torch.float64)
        return float(ctx.reduce(local)) / len(order)

    history = [error()]
    best = (history[0], [p.detach().clone() for p in params])
    opt = torch.optim.Adam(params, lr=cfg.finetune_lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.index)
    block.train()
    try:
        stale = 0
        for _ in range(cfg.finetune_epochs):
            perm = torch.randperm(len(order), generator=gen).tolist()
            for start in range(0, len(perm), per_step):
                chunk = perm[start:start + per_step]
                opt.zero_grad(set_to_none=True)
                for b in chunk:
                    if order[b] in owned:
                        (run(owned[order[b]]) / len(chunk)).backward()
                if size > 1:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        ctx.reduce(p.grad)
                opt.step()
            history.append(error())
            if history[-1] < best[0]:
                best, stale = (history[-1], [p.detach().clone() for p in params]), 0
            else:
                stale += 1
            if cfg.finetune_early_stop is not None and stale >= cfg.finetune_early_stop:
                break
        if cfg.finetune_keep_best and best[0] < history[-1]:
            with torch.no_grad():
                for p, v in zip(params, best[1]):
                    p.copy_(v)
    finally:
        block.eval()
        for p in block.parameters():
            p.requires_grad_(was.get(id(p), False))
        for mod in block.modules():
            if isinstance(mod, AQLMLinear):
                mod.codebooks.requires_grad_(False)
                mod.scales.requires_grad_(False)
        if dtype != torch.float32:
            block.to(dtype)
    return history


__all__ = ["AQLM", "beam_search_codes", "encode_groups_l2", "init_aq", "kmeans", "layer_error", "quantize_layer"]
