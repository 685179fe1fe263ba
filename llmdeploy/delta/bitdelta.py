"""BitDelta (Liu et al., 2024): a fine-tune as its base plus one sign bit per weight and one scale
per matrix.

For every decoder linear, ``Δ = W_ft − W_base`` is stored as its signs (packed 8 per byte) and a
scale ``α`` initialised to ``mean|Δ|`` (the L2-optimal scale for a sign matrix); the module keeps a
reference to the base linear (no copy) and computes ``base(x) + α · (x · sign(Δ)ᵀ)``. Then
*scale distillation*: only the scales train (AdamW, cosine schedule, as the paper: lr 1e-4, 200
steps) so that the compressed model's logits match the fine-tune's (MSE, the paper's loss; KL as
an option) on text of the fine-tune's domain.

Faithfulness notes. The reference code (FasterDecoding/BitDelta) never freezes the other
parameters, so embeddings, norms and the head train too and are stored in its "diff"; here only
the scales train (a test checks every other tensor is unchanged). Outside the decoder linears
(embeddings, norms, head) the model keeps, with ``others="base"`` (the default), the *base's*
tensors: the delta holds signs and scales only and a multi-tenant server shares every other
tensor; a fine-tune that changed those tensors loses that change, which scale distillation
partly compensates. ``others="finetune"`` is the reference's model: the fine-tune's own tensors
where they differ from the base, stored in 16 bits in the delta (and not servable by
:class:`~llmdeploy.delta.MultiTenant`, whose tenants share them).

Extension (not in the paper): ``embeddings=True`` also gives the token embedding a 1-bit delta,
with one scale per vocabulary row (``α_r = mean|Δ_r|``, distilled like the others), and the LM head
too — a tied head shares the embedding's signs and scales. A fine-tune moves its embedding rows very
unevenly (the tokens of its domain a lot, the rest barely), so one scale for the whole matrix makes
things worse, while per-row scales recover most of what keeping the base's embedding loses; it
costs ``vocab·dim/8`` bytes of signs plus 2 bytes per row, and stays servable by ``MultiTenant``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, Report, engine_field, register_method
from ..errors import ConfigError, TrainingDivergedError
from ..finetune.full import batch_order
from ..kernels.binary import binary_matmul_reference, multi_binary_linear, pack_signs, unpack_signs
from ..models.adapters import get_adapter

log = logging.getLogger(__name__)


class _DistillMatmul(torch.autograd.Function):
    """``x·W_baseᵀ + b + α·(x·Sᵀ)`` with gradients for ``x`` and ``α`` only (the base is frozen
    during scale distillation); ``α`` is one scale or one per output row. Backward uses one matmul
    with the merged weight ``W_base + α·S`` instead of one per term, and ``∂/∂α = Σ g ⊙ (x·Sᵀ)``
    from the saved sign product."""

    @staticmethod
    def forward(ctx, x, weight, bias, signs, scale):
        d = x @ signs.t()
        ctx.save_for_backward(weight, signs, scale, d)
        return F.linear(x, weight, bias) + scale * d

    @staticmethod
    def backward(ctx, g):
        weight, signs, scale, d = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("BitDelta scale distillation keeps the base frozen")
        col = scale[:, None] if scale.dim() else scale
        gx = g @ (weight + col * signs) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[4]:
            gd = (g * d).reshape(-1, d.shape[-1])
            gs = gd.sum(0) if scale.dim() else gd.sum().reshape(scale.shape)
        return gx, None, None, None, gs


def _scale_parameter(scale: float | torch.Tensor) -> nn.Parameter:
    """A scale as a parameter; a given ``nn.Parameter`` is kept (shared, e.g. by a tied head)."""
    if isinstance(scale, nn.Parameter):
        return scale
    return nn.Parameter(torch.as_tensor(scale, dtype=torch.float32).detach().clone())


class BitDeltaLinear(nn.Module):
    """``base(x) + scale · (x · signsᵀ)`` with the base linear shared (held outside the module's
    parameters, so it is neither copied, saved nor trained here). ``scale`` is one number (the
    paper's, for decoder linears) or one per output row (the LM head with ``embeddings=True``)."""

    def __init__(self, base: nn.Linear, signs: torch.Tensor, scale: float | torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._base = (base,)  # a tuple hides it from parameters(), state_dict() and .to()
        self.register_buffer("signs", signs)
        self.scale = _scale_parameter(scale)
        if self.scale.dim() not in (0, 1) or (self.scale.dim() == 1 and self.scale.numel() != self.out_features):
            raise ConfigError(f"BitDeltaLinear: the scale must be one number or {self.out_features} (one per "
                              f"output), got shape {tuple(self.scale.shape)}")
        self._dense_signs: torch.Tensor | None = None  # ±1 matrix, only while distilling

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def per_row(self) -> bool:
        return self.scale.dim() == 1

    @classmethod
    def from_weights(cls, base: nn.Linear, finetuned_weight: torch.Tensor, per_row: bool = False) -> BitDeltaLinear:
        delta = (finetuned_weight.detach().float() - base.weight.detach().float())
        return cls(base, pack_signs(delta), delta.abs().mean(1) if per_row else delta.abs().mean())

    def delta_weight(self) -> torch.Tensor:
        col = self.scale[:, None] if self.per_row else self.scale
        return col * unpack_signs(self.signs, self.in_features, self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.scale.requires_grad or x.requires_grad):  # autograd paths
            if self._dense_signs is not None and x.dtype == self._dense_signs.dtype:
                b = self.base
                return _DistillMatmul.apply(x, b.weight, b.bias, self._dense_signs, self.scale.to(x.dtype))
            y = self.base(x)
            d = binary_matmul_reference(x.to(self.scale.dtype), self.signs, self.in_features)
            return y + (self.scale * d).to(y.dtype)
        flat = x.reshape(-1, self.in_features)
        y = multi_binary_linear(flat, self.base, self.signs[None], self.scale.detach().float()[None],
                                torch.zeros(flat.shape[0], dtype=torch.int64))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scale = "per row" if self.per_row else f"{self.scale.item():.3g}"
        return f"in={self.in_features}, out={self.out_features}, scale={scale}"


class BitDeltaEmbedding(nn.Module):
    """``base(ids) + scale[ids] · signs[ids]``: a token embedding with a 1-bit delta and one scale
    per vocabulary row, the base embedding shared (``BitDelta(embeddings=True)``)."""

    def __init__(self, base: nn.Embedding, signs: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self._base = (base,)
        self.register_buffer("signs", signs)
        self.scale = _scale_parameter(scale)
        if self.scale.shape != (self.num_embeddings,):
            raise ConfigError(f"BitDeltaEmbedding: one scale per row ({self.num_embeddings}) is needed, "
                              f"got shape {tuple(self.scale.shape)}")

    @property
    def base(self) -> nn.Embedding:
        return self._base[0]

    @classmethod
    def from_weights(cls, base: nn.Embedding, finetuned_weight: torch.Tensor) -> BitDeltaEmbedding:
        delta = finetuned_weight.detach().float() - base.weight.detach().float()
        return cls(base, pack_signs(delta), delta.abs().mean(1))

    def delta_weight(self) -> torch.Tensor:
        return self.scale[:, None] * unpack_signs(self.signs, self.embedding_dim, self.scale.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        d = unpack_signs(self.signs[ids], self.embedding_dim, y.dtype)
        return y + self.scale[ids].to(y.dtype)[..., None] * d

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scale=per row"


def shallow_clone(module: nn.Module) -> nn.Module:
    """A new module tree sharing every parameter and buffer tensor with ``module``."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: (shallow_clone(v) if v is not None else None) for k, v in module._modules.items()}
    return new


def own_tensors(model: nn.Module, base: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a BitDelta ``model`` outside its delta linears that are not ``base``'s own
    (set with ``others="finetune"``), by name; tied names are listed once, under their first name."""
    scales = {id(m.scale) for m in model.modules() if isinstance(m, (BitDeltaLinear, BitDeltaEmbedding))}
    base_params = dict(base.named_parameters(remove_duplicate=False))
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in scales or id(p) in seen or base_params.get(name) is p:
            continue
        seen.add(id(p))
        out[name] = p
    return out


def replace_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """In ``model``'s tree, put ``new[id(p)]`` wherever parameter ``p`` sits (ties stay tied)."""
    for mod in model.modules():
        for k, p in mod._parameters.items():
            if p is not None and id(p) in new:
                mod._parameters[k] = new[id(p)]


def model_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and bytes: identifies a base model."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class BitDeltaReport(Report):
    layers: int = 0
    delta_bytes: int = 0
    fp16_bytes: int = 0
    history: list[float] = field(default_factory=list)
    init_loss: float = float("nan")
    final_loss: float = float("nan")

    def summary(self) -> str:
        return (f"BitDelta: {self.layers} linears, {self.delta_bytes / 2**20:.2f} MiB of signs and scales "
                f"({self.fp16_bytes / max(1, self.delta_bytes):.1f}x smaller than the fp16 tensors it replaces); "
                f"distillation loss "
                f"{self.init_loss:.4g} -> {self.final_loss:.4g}")


@register_method("bitdelta")
@dataclass(kw_only=True)
class BitDelta(Compressor):
    """Compress the fine-tune it is applied to against ``base`` (a model of the same
    architecture); ``calib`` is text of the fine-tune's domain for scale distillation."""

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    loss: str = "mse"
    seed: int = 0
    others: str = "base"
    embeddings: bool = False
    base: nn.Module | None = engine_field(None)
    needs_calibration = True

    def validate(self, model: nn.Module) -> None:
        if self.base is None:
            raise ConfigError("bitdelta needs base=<the base model the fine-tune started from>")
        if self.others not in ("base", "finetune"):
            raise ConfigError(f"bitdelta: others must be 'base' or 'finetune', got {self.others!r}")
        if self.embeddings and self.others == "finetune":
            raise ConfigError("bitdelta: embeddings=True gives the embedding a 1-bit delta, others='finetune' "
                              "keeps the fine-tune's whole embedding; choose one")
        if self.embeddings:
            a, b = model.get_input_embeddings(), self.base.get_input_embeddings()
            if not isinstance(a, nn.Embedding) or not isinstance(b, nn.Embedding) or a.weight.shape != b.weight.shape:
                raise ConfigError("bitdelta: embeddings=True needs dense token embeddings of one shape in both "
                                  "models (same vocabulary); use embeddings=False")
        if self.loss not in ("mse", "kl"):
            raise ConfigError(f"bitdelta: loss must be 'mse' or 'kl', got {self.loss!r}")
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError("bitdelta: steps >= 0, lr > 0 and batch_size >= 1 are required")
        ft, base = get_adapter(model).linear_names(), get_adapter(self.base).linear_names()
        if ft != base:
            raise ConfigError("bitdelta: the fine-tune and the base have different decoder linears; "
                              "give the base the fine-tune started from")
        for name in ft:
            a, b = model.get_submodule(name), self.base.get_submodule(name)
            if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear) or a.weight.shape != b.weight.shape:
                raise ConfigError(f"bitdelta: {name} is not a dense linear of one shape in both models "
                                  "(compress the dense fine-tune against the dense base)")

    def compress(self, model: nn.Module) -> nn.Module:
        """The BitDelta model before distillation: the base's tree with sign-delta linears."""
        out = shallow_clone(self.base)
        n, nbytes, fp16 = 0, 0, 0
        for name in get_adapter(model).linear_names():
            mod = BitDeltaLinear.from_weights(self.base.get_submodule(name), model.get_submodule(name).weight)
            out.set_submodule(name, mod)
            n += 1
            nbytes += mod.signs.numel() + 2  # signs + an fp16 scale
            fp16 += 2 * mod.in_features * mod.out_features
        if self.embeddings:
            names = {id(m): n for n, m in self.base.named_modules()}
            emb_b = self.base.get_input_embeddings()
            emb = BitDeltaEmbedding.from_weights(emb_b, model.get_input_embeddings().weight)
            out.set_submodule(names[id(emb_b)], emb)
            nbytes += emb.signs.numel() + 2 * emb.num_embeddings
            fp16 += 2 * emb_b.weight.numel()
            head_b = self.base.get_output_embeddings()
            if isinstance(head_b, nn.Linear):
                if head_b.weight is emb_b.weight:  # tied: the head is the same matrix, same delta
                    head = BitDeltaLinear(head_b, emb.signs, emb.scale)
                else:
                    head = BitDeltaLinear.from_weights(head_b, model.get_output_embeddings().weight, per_row=True)
                    nbytes += head.signs.numel() + 2 * head.out_features
                    fp16 += 2 * head_b.weight.numel()
                out.set_submodule(names[id(head_b)], head)
        if self.others == "finetune":  # the paper's model: the fine-tune's own tensors elsewhere, in 16 bits
            linears = {f"{name}.{k}" for name in get_adapter(model).linear_names() for k in ("weight", "bias")}
            ft = dict(model.named_parameters(remove_duplicate=False))
            swap: dict[int, nn.Parameter] = {}
            for name, p in self.base.named_parameters(remove_duplicate=False):
                if name in linears or id(p) in swap:
                    continue
                q = ft.get(name)
                if q is None or q.shape != p.shape:
                    raise ConfigError(f"bitdelta: the fine-tune has no tensor {name} of shape {tuple(p.shape)}; "
                                      "others='finetune' needs the base's architecture and vocabulary")
                if not torch.equal(q, p):
                    swap[id(p)] = nn.Parameter(q.detach().to(torch.float16).to(p.dtype), requires_grad=False)
            replace_parameters(out, swap)
            nbytes += sum(2 * p.numel() for p in swap.values())
        self.report_ = BitDeltaReport(layers=n, delta_bytes=nbytes, fp16_bytes=fp16)
        return out

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        student = self.compress(model)
        report = self.report_
        scales = list({id(m.scale): m.scale for m in student.modules()
                       if isinstance(m, (BitDeltaLinear, BitDeltaEmbedding))}.values())  # a tied head shares
        others = list(model.parameters()) + list(self.base.parameters())
        flags = [p.requires_grad for p in others]
        for p in others:
            p.requires_grad_(False)
        for s in scales:
            s.requires_grad_(True)
        mods = [m for m in student.modules() if isinstance(m, BitDeltaLinear)]
        for m in mods:  # unpacked once for the whole run, not at every forward
            m._dense_signs = unpack_signs(m.signs, m.in_features, m.base.weight.dtype)
        opt = torch.optim.AdamW(scales, lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(  # cosine from lr to 0, no warm-up (the paper's)
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(1.0, i / max(1, self.steps)))))
        order = batch_order(calib.shape[0], self.steps, self.batch_size, self.seed)
        device = next(model.parameters()).device
        model.eval()
        student.eval()
        report.init_loss = self._probe(student, model, calib[: self.batch_size].to(device))
        try:
            for step in tqdm(range(self.steps), desc="BitDelta scale distillation", leave=False):
                ids = calib[order[step * self.batch_size:(step + 1) * self.batch_size]].to(device)
                loss = self._loss(student, model, ids)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"bitdelta: the loss became {loss.item()} at step {step}; lower lr")
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                report.history.append(loss.item())
        finally:
            for m in mods:
                m._dense_signs = None
            for s in scales:
                s.requires_grad_(False)
            for p, f in zip(others, flags):  # the caller's models keep their flags
                p.requires_grad_(f)
        report.final_loss = self._probe(student, model, calib[: self.batch_size].to(device))
        return student

    def _loss(self, student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits.float()
        s = student(input_ids=ids, use_cache=False).logits.float()
        if self.loss == "mse":
            return F.mse_loss(s, t)
        return F.kl_div(s.log_softmax(-1).flatten(0, 1), t.log_softmax(-1).flatten(0, 1), log_target=True,
                        reduction="batchmean")

    def _probe(self, student, teacher, ids) -> float:
        with torch.no_grad():
            return self._loss(student, teacher, ids).item()
