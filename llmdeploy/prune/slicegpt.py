"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream by PCA, slice its width.

A pre-norm transformer is invariant to an orthogonal change of basis Q of its residual stream
once the norms carry no scale: embeddings and every linear writing to the stream are multiplied
by Q on their output side, every linear reading from it by Q on their input side, and RMS norms
commute with Q. So:

1. *Fuse the norms*: fold each norm's scale (and LayerNorm's shift) into the linears that read
   its output, and replace the norm by a weightless :class:`RMSN`. LayerNorm also subtracts the
   mean: the embeddings and every linear writing to the stream are centred first (multiplied by
   ``I - 11ᵀ/d``), so the stream has zero mean and LayerNorm reduces to RMSN.
2. *Rotate and slice, block by block* through the shared calibration engine, on activations of
   the already-sliced upstream network: the PCA (eigenvectors of ``Σ xᵀx``, largest first) of
   block i's input gives Q_in, of the residual between attention and MLP Q_mid, of the block's
   output Q_out. Readers keep the first ``d'`` columns of ``W Q``, writers the first ``d'`` rows
   of ``Qᵀ W``; the residual crosses from one basis to the next through the shortcut matrices
   ``Q_inᵀ Q_mid`` and ``Q_midᵀ Q_out`` (``d' x d'``).
3. Rotate (optionally slice) the head by the last Q.

The sliced model is an instance of ``sliced_modeling``'s classes; ``llmdeploy.save`` writes it
so that transformers can load it with ``trust_remote_code=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..compress.base import Compressor, Report, engine_field, register_method
from ..compress.engine import BlockContext, run_blockwise
from ..compress.modules import compressed_modules
from ..errors import ConfigError
from ..models.adapters import ModelAdapter, get_adapter
from . import sliced_modeling as sm

log = logging.getLogger(__name__)


def sliced_width(d: int, sparsity: float, round_to: int) -> int:
    """``int((1 - sparsity) d)`` rounded down to a multiple of ``round_to``."""
    w = int((1.0 - sparsity) * d)
    return w - w % round_to


def pca_basis(xtx: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the (uncentred) second-moment matrix, by decreasing eigenvalue (float64)."""
    evals, evecs = torch.linalg.eigh(xtx.double())
    return evecs[:, torch.argsort(evals, descending=True)]


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian with the signs fixed), float64."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=torch.float64))


def _set_weight(lin: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a linear's weight (and bias) by new float64 values, cast to its dtype."""
    dtype, device = lin.weight.dtype, lin.weight.device
    lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=lin.weight.requires_grad)
    if isinstance(lin, nn.Linear):
        lin.out_features, lin.in_features = weight.shape
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype))


def rotate_input(lin: nn.Linear, q: torch.Tensor) -> None:
    """A reader of the stream: ``W <- W Q`` (Q may keep fewer columns: slicing)."""
    _set_weight(lin, lin.weight.double() @ q.to(lin.weight.device))


def rotate_output(lin: nn.Linear, q: torch.Tensor) -> None:
    """A writer to the stream: ``W <- Qᵀ W``, ``b <- Qᵀ b``."""
    q = q.to(lin.weight.device)
    bias = None if lin.bias is None else q.T @ lin.bias.double()
    _set_weight(lin, q.T @ lin.weight.double(), bias)


def fold_norm(norm: nn.Module, readers: list[nn.Linear], adapter: ModelAdapter) -> None:
    """``W (γ ⊙ x̂ + β) + b = (W diag γ) x̂ + (W β + b)`` for every linear reading the norm."""
    gamma, beta, _ = adapter.norm_affine(norm)
    for lin in readers:
        w = lin.weight.double()
        new_b = None
        if beta is not None:
            new_b = w @ beta.double().to(w.device)
            if lin.bias is not None:
                new_b = new_b + lin.bias.double()
        _set_weight(lin, w * gamma.double().to(w.device) if gamma is not None else w, new_b)


def center_output(lin: nn.Linear) -> None:
    """Make a writer's outputs zero-mean over the stream: ``W <- C W``, ``b <- C b``."""
    w = lin.weight.double()
    bias = None if lin.bias is None else lin.bias.double() - lin.bias.double().mean()
    _set_weight(lin, w - w.mean(dim=0, keepdim=True), bias)


@register_method("slicegpt")
@dataclass(kw_only=True)
class SliceGPT(Compressor):
    """Rotate by PCA and delete the ``sparsity`` fraction of the residual stream's width.

    ``final_orientation="random"`` multiplies each kept principal subspace by a random rotation
    (the reference's option; it spreads the variance evenly over the kept coordinates, which
    helps a later quantizer). ``slice_head=False`` (the reference's default) keeps the last
    block's output and the head at full width.
    """

    sparsity: float = 0.25
    round_to: int = 8
    final_orientation: str = "pca"
    slice_head: bool = False
    seed: int = 0
    batch_size: int = engine_field(8)
    device: str | None = engine_field(None)
    needs_calibration = True
    streamable = True
    supports_distributed = True

    def validate(self, model: nn.Module) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"slicegpt: sparsity must be in [0, 1), got {self.sparsity}")
        if self.round_to < 1:
            raise ConfigError(f"slicegpt: round_to must be >= 1, got {self.round_to}")
        if self.final_orientation not in ("pca", "random"):
            raise ConfigError(f"slicegpt: final_orientation must be 'pca' or 'random', got {self.final_orientation!r}")
        adapter = get_adapter(model)
        adapter.check_rotatable()
        if isinstance(getattr(model.config, "slicegpt", None), dict):
            raise ConfigError("slicegpt: this model is already sliced; slice the original model instead")
        if compressed_modules(model):
            raise ConfigError("slicegpt: apply SliceGPT before quantizing or pruning weights (the model "
                              "already holds compressed modules)")
        d = model.config.hidden_size
        if sliced_width(d, self.sparsity, self.round_to) <= 0:
            raise ConfigError(f"slicegpt: sparsity {self.sparsity} with round_to {self.round_to} leaves no "
                              f"dimension of {d}")
        norm_eps(adapter)
        try:
            sm.sliced_model_class(type(model))
        except ValueError as e:
            raise ConfigError(f"slicegpt: {e}") from None

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        adapter = get_adapter(model)
        d = model.config.hidden_size
        d_new = sliced_width(d, self.sparsity, self.round_to)
        n_blocks = len(adapter.blocks())
        params_before = _count_params(model)
        eps = fuse_outside(model, adapter)
        gen = torch.Generator().manual_seed(self.seed)
        layout = adapter.rotation_layout()
        # carried from block to block (and checkpointed with each): the last rotation, the
        # widths of the finished blocks, the rotation of the embeddings, the generator's state
        carry: dict = {"dims": []}

        def orient(xtx: torch.Tensor, keep: int) -> torch.Tensor:
            q = pca_basis(xtx)
            if self.final_orientation == "random":
                q[:, :keep] = q[:, :keep] @ random_orthogonal(keep, gen)
            return q[:, :keep]

        def rotate_embeddings(q_in: torch.Tensor) -> None:
            for path in adapter.residual_embedding_paths:
                emb = model.get_submodule(path)
                _set_weight(emb, emb.weight.double() @ q_in.to(emb.weight.device))
                emb.embedding_dim = d_new

        def process(ctx: BlockContext) -> None:
            block, dev = ctx.block, ctx.device
            fuse_block(block, adapter, d, eps)  # one block at a time: a streamed block is loaded only now
            if "gen" in ctx.carry:
                gen.set_state(ctx.carry["gen"])
            if ctx.index == 0:  # the embeddings write block 0's input: rotate them first
                q_in = orient(ctx.reduce(_xtx(ctx.inputs, d)), d_new)
                rotate_embeddings(q_in)
                ctx.carry["q_embed"] = q_in.clone()
                ctx.inputs[:] = [(x.double() @ q_in.to(x.device)).to(x.dtype) for x in ctx.inputs]
            else:
                q_in = ctx.carry["q"]
            q_in = q_in.to(dev)
            linears = ctx.linears()
            wdtype = linears[layout["attn_out"]].weight.dtype
            for path in layout["attn_in"]:
                rotate_input(linears[path], q_in)
            # meanwhile the shortcut maps the residual back to the original basis (Q_inᵀ) ...
            block.attn_shortcut_Q = nn.Parameter(q_in.T.to(wdtype))
            # ... where the residual between attention and MLP is measured
            q_mid = orient(ctx.input_moments(block.get_submodule(layout["mlp_norm"])), d_new).to(dev)
            block.attn_shortcut_Q = nn.Parameter((q_in.T @ q_mid).to(wdtype))
            rotate_output(linears[layout["attn_out"]], q_mid)
            for path in layout["mlp_in"]:
                rotate_input(linears[path], q_mid)
            block.mlp_shortcut_Q = nn.Parameter(q_mid.T.to(wdtype))
            last = ctx.index == n_blocks - 1
            d_out = d if last and not self.slice_head else d_new
            outs = ctx.forward()
            q_out = orient(ctx.reduce(_xtx(outs, d)), d_out).to(dev)
            outs.release()
            block.mlp_shortcut_Q = nn.Parameter((q_mid.T @ q_out).to(wdtype))
            rotate_output(linears[layout["mlp_out"]], q_out)
            block.get_submodule(layout["attn_norm"]).dim = d_new
            block.get_submodule(layout["mlp_norm"]).dim = d_new
            ctx.carry["dims"] = [*ctx.carry["dims"], [d_new, d_new, d_out]]
            ctx.carry["q"] = q_out.cpu()
            ctx.carry["gen"] = gen.get_state()

        def restore(index: int, block: nn.Module, saved: dict) -> None:
            """A block finished by an interrupted run: its sliced shapes (values come from the
            checkpoint); block 0 also gives back the embeddings' rotation."""
            if index == 0:
                rotate_embeddings(saved["q_embed"])
            fuse_block(block, adapter, d, eps)
            sm.build_sliced_block(block, layout, d, eps, saved["dims"][index])

        run_blockwise(model, calib, process, device=self.device, batch_size=self.batch_size, desc="SliceGPT",
                      key=self.to_dict(), carry=carry, restore=restore)
        head = adapter.head()
        rotate_input(head, carry["q"])
        adapter.final_norm().dim = head.in_features
        model.config.slicegpt = {
            "hidden_size": d,
            "eps": eps,
            "embedding_dim": d_new,
            "layers": [list(x) for x in carry["dims"]],
            "head_bias": head.bias is not None,
            "layout": layout,
            "sparsity": self.sparsity,
        }
        model.__class__ = sm.sliced_model_class(type(model))
        params_after = _count_params(model)
        self.report_ = SliceGPTReport(
            hidden_size=d, sliced_width=d_new, nominal_sparsity=1 - d_new / d, params_dense=params_before,
            params_sliced=params_after,
            shortcut_params=sum(b.attn_shortcut_Q.numel() + b.mlp_shortcut_Q.numel() for b in adapter.blocks()),
        )
        log.info("SliceGPT: %s", self.summary())
        return model


@dataclass
class SliceGPTReport(Report):
    """The widths and the real parameter counts before and after slicing."""

    hidden_size: int = 0
    sliced_width: int = 0
    nominal_sparsity: float = 0.0
    params_dense: int = 0
    params_sliced: int = 0
    shortcut_params: int = 0

    def summary(self) -> str:
        return (f"width {self.hidden_size} -> {self.sliced_width} (nominal {self.nominal_sparsity:.1%} sliced); "
                f"params {self.params_dense / 1e6:.1f} M -> {self.params_sliced / 1e6:.1f} M "
                f"({self.params_sliced / self.params_dense - 1:+.1%}; shortcuts {self.shortcut_params / 1e6:.2f} M "
                "and the untied head included)")


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _xtx(xs: list[torch.Tensor], d: int) -> torch.Tensor:
    """``Σ xᵀx`` over every token of the batches, float64."""
    acc = torch.zeros(d, d, dtype=torch.float64)
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).double()
        acc += (x.T @ x).cpu()
    return acc


def norm_eps(adapter: ModelAdapter) -> float:
    """The epsilon all of the model's norms share (a sliced model stores one)."""
    layout = adapter.rotation_layout()
    norms = [adapter.final_norm()] + [b.get_submodule(layout[k]) for b in adapter.blocks()
                                      for k in ("attn_norm", "mlp_norm")]
    values = {adapter.norm_affine(n)[2] for n in norms}
    if len(values) != 1:
        raise ConfigError(f"slicegpt: the model's norms use different epsilons {sorted(values)}")
    return values.pop()


def fuse_norms(model: nn.Module, adapter: ModelAdapter) -> float:
    """Fold every norm into its readers and replace it by :class:`RMSN` over the full width;
    centre the stream's writers first where the norms subtract the mean. Returns the norms' eps.
    The model computes the same function afterwards."""
    eps = fuse_outside(model, adapter)
    for block in adapter.blocks():
        fuse_block(block, adapter, model.config.hidden_size, eps)
    return eps


def fuse_outside(model: nn.Module, adapter: ModelAdapter) -> float:
    """The part of :func:`fuse_norms` outside the decoder blocks: centre the embeddings (where the
    norms subtract the mean), untie the head, fold the final norm into it. Returns the eps."""
    d = model.config.hidden_size
    layout = adapter.rotation_layout()
    eps = norm_eps(adapter)
    if adapter.norm_subtracts_mean:
        for path in adapter.residual_embedding_paths:
            emb = model.get_submodule(path)
            w = emb.weight.double()
            _set_weight(emb, w - w.mean(dim=1, keepdim=True))
    head, emb0 = adapter.head(), model.get_submodule(adapter.residual_embedding_paths[0])
    if head.weight is emb0.weight:  # tied: the head gets the final norm, the embedding does not
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    final = adapter.final_norm()
    if head.bias is None and adapter.norm_affine(final)[1] is not None:
        head.bias = nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device))
    fold_norm(final, [head], adapter)
    model.set_submodule(layout["final_norm"], sm.RMSN(d, d, eps))
    return eps


def fuse_block(block: nn.Module, adapter: ModelAdapter, d: int, eps: float) -> None:
    """The part of :func:`fuse_norms` inside one decoder block (a no-op on a block already fused)."""
    layout = adapter.rotation_layout()
    if isinstance(block.get_submodule(layout["attn_norm"]), sm.RMSN):
        return
    if adapter.norm_subtracts_mean:
        center_output(block.get_submodule(layout["attn_out"]))
        center_output(block.get_submodule(layout["mlp_out"]))
    for norm_path, readers in (("attn_norm", "attn_in"), ("mlp_norm", "mlp_in")):
        norm = block.get_submodule(layout[norm_path])
        fold_norm(norm, [block.get_submodule(p) for p in layout[readers]], adapter)
    sm.convert_layer(block, layout)
    block.set_submodule(layout["attn_norm"], sm.RMSN(d, d, eps))
    block.set_submodule(layout["mlp_norm"], sm.RMSN(d, d, eps))
