"""Recovery fine-tuning with LoRA (Hu et al., 2022), as SliceGPT uses it after slicing.

Low-rank adapters ``W + (alpha / r) B A`` (A: Kaiming-uniform, B: zeros, dropout on the adapter's
input, as peft initialises them) are attached to every decoder-block linear and trained for
next-token prediction on the calibration windows while everything else stays frozen. Then:

* on a **dense** linear the adapter is merged into the weight: same modules and shapes as
  before, so the model saves, loads and composes like any other;
* on a **compressed** linear (quantized, sparse) merging would destroy the storage format, so the
  adapter stays beside it in a :class:`LoRALinear` (QLoRA-style): saved, loaded and counted in
  bits per parameter like the rest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, Report, engine_field, register_method, require_targets
from ..compress.modules import MODULES, CompressedModule, register_module
from ..errors import ConfigError, TrainingDivergedError
from ..models.adapters import get_adapter
from .full import batch_order

log = logging.getLogger(__name__)


@register_module
class LoRALinear(CompressedModule):
    """A compressed linear plus a LoRA adapter: ``base(x) + (alpha / rank) · B A dropout(x)``.

    ``base`` is any compressed module (its class and init arguments are part of this module's
    own, so a checkpoint rebuilds both); only ``lora_A`` and ``lora_B`` train.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, base_class: str,
                 base_init: dict[str, Any], dropout: float = 0.0, dtype: torch.dtype = torch.float32,
                 base: nn.Module | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.base_class, self.base_init = base_class, dict(base_init)
        if base is None:
            if base_class not in MODULES:
                raise ValueError(f"unknown compressed module class {base_class!r}")
            base = MODULES[base_class](**base_init, dtype=dtype)
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def wrap(cls, base: nn.Module, rank: int, alpha: float, dropout: float) -> LoRALinear:
        """Adapters around ``base`` (an ``nn.Linear`` while training, or a compressed module)."""
        dtype = next(p.dtype for p in base.parameters()) if any(
            p.is_floating_point() for p in base.parameters()) else torch.float32
        if isinstance(base, CompressedModule):
            name, init = type(base).__name__, base.init_kwargs()
        else:
            name, init = "", {}
        mod = cls(base.in_features, base.out_features, rank, alpha, name, init, dropout, dtype, base=base)
        dev = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        nn.init.kaiming_uniform_(mod.lora_A, a=math.sqrt(5))
        return mod.to(dev)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.lora_A.dtype)
        return self.base(x) + F.linear(F.linear(h, self.lora_A), self.lora_B).to(x.dtype) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    def init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                    alpha=self.alpha, base_class=self.base_class, base_init=self.base_init)

    def nominal_params(self) -> int:
        return self.base.nominal_params()

    def storage_bits(self) -> int:
        return super().storage_bits() + self.base.storage_bits()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


@dataclass
class LoRAReport(Report):
    """Training losses per step, the loss on a fixed batch before and after, and which adapters
    were merged (dense linears) or kept (compressed ones)."""

    rank: int = 0
    alpha: float = 0.0
    batch_size: int = 0
    history: list[float] = field(default_factory=list)
    probe_loss: list[float] = field(default_factory=list)
    merged: int = 0
    kept: int = 0

    def summary(self) -> str:
        if not self.history:
            return ""
        before, after = self.probe_loss
        return (f"LoRA r={self.rank} alpha={self.alpha}: {len(self.history)} steps of {self.batch_size} windows; "
                f"loss on the first batch {before:.3f} -> {after:.3f}; {self.merged} adapters merged, "
                f"{self.kept} kept beside compressed linears")


@register_method("lora_finetune")
@dataclass(kw_only=True)
class LoRAFinetune(Compressor):
    """Fine-tune LoRA adapters on the decoder linears with the calibration windows; merge them
    into dense linears, keep them beside compressed ones (:class:`LoRALinear`).

    Defaults follow SliceGPT's recovery fine-tuning (r=32, alpha=10, dropout 0.05, lr 2e-4,
    AdamW); ``epochs`` passes over the windows in ``batch_size`` batches (``max_steps`` caps
    it), learning rate decaying linearly to zero after ``warmup`` of the steps.
    """

    rank: int = 32
    alpha: float = 10.0
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 4
    max_steps: int | None = None
    warmup: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    device: str | None = engine_field(None)
    needs_calibration = True

    def validate(self, model: nn.Module) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ConfigError(f"lora_finetune: invalid rank/alpha/dropout/lr {self.rank}/{self.alpha}/"
                              f"{self.dropout}/{self.lr}")
        if self.epochs <= 0 or self.batch_size < 1:
            raise ConfigError("lora_finetune: epochs must be > 0 and batch_size >= 1")
        self.target_modules(model)

    def target_modules(self, model: nn.Module) -> list[str]:
        """Full names of the decoder-block linears that get adapters (all but those that already
        carry one); raises ConfigError when there is none."""
        names, skipped = [], {}
        for name in get_adapter(model).linear_names():
            if isinstance(model.get_submodule(name), LoRALinear):
                skipped[name] = "they already carry LoRA adapters"
            else:
                names.append(name)
        require_targets("lora_finetune", names, skipped)
        return names

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        steps = math.ceil(self.epochs * math.ceil(calib.shape[0] / self.batch_size))
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        device = torch.device(self.device) if self.device else next(model.parameters()).device
        home = next(model.parameters()).device
        model.to(device)
        names = self.target_modules(model)
        trainable_before = {id(p): p.requires_grad for p in model.parameters()}
        report = self.report_ = LoRAReport(rank=self.rank, alpha=self.alpha, batch_size=self.batch_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for p in model.parameters():
                p.requires_grad_(False)
            wrappers = {}
            for name in names:
                wrappers[name] = LoRALinear.wrap(model.get_submodule(name), self.rank, self.alpha, self.dropout)
                model.set_submodule(name, wrappers[name])
            trainable = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
            opt = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
            warm = max(1, int(self.warmup * steps))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / max(1, steps - warm))))
            order = batch_order(calib.shape[0], steps, self.batch_size, self.seed)
            probe = calib[: self.batch_size].to(device)  # a fixed batch: loss before and after
            report.probe_loss = [self._loss(model, probe)]
            model.train()
            try:
                for step in tqdm(range(steps), desc="LoRA fine-tuning", leave=False):
                    ids = calib[order[step * self.batch_size:(step + 1) * self.batch_size]].to(device)
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(f"lora_finetune: the loss became {loss.item()} at step "
                                                    f"{step}; lower lr (now {self.lr})")
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    report.history.append(loss.item())
                    if step % 10 == 0 or step == steps - 1:
                        log.info("LoRA step %d/%d: loss %.4f", step + 1, steps, loss.item())
            except BaseException:  # leave the model as it came: no half-trained adapters
                for name, w in wrappers.items():
                    model.set_submodule(name, w.base)
                for p in model.parameters():
                    p.requires_grad_(trainable_before.get(id(p), False))
                model.to(home)
                raise
            finally:
                model.eval()
            report.probe_loss.append(self._loss(model, probe))
        report.merged, report.kept = merge_adapters(model, wrappers)
        model.to(home)
        for p in model.parameters():  # restore the flags the model came with
            p.requires_grad_(trainable_before.get(id(p), False))
        return model

    @staticmethod
    def _loss(model: nn.Module, ids: torch.Tensor) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        model.train(was)
        return loss


def merge_adapters(model: nn.Module, wrappers: dict[str, LoRALinear]) -> tuple[int, int]:
    """Freeze trained adapters; merge those on dense linears into the weight (the adapter
    disappears: same modules as before), keep those on compressed linears beside them (dropout
    off). Returns (merged, kept)."""
    merged = kept = 0
    for name, w in wrappers.items():
        w.lora_A.requires_grad_(False)
        w.lora_B.requires_grad_(False)
        if isinstance(w.base, CompressedModule):
            w.dropout.p = 0.0
            kept += 1
            continue
        with torch.no_grad():
            w.base.weight += w.delta_weight().to(w.base.weight.dtype)
        model.set_submodule(name, w.base)
        merged += 1
    return merged, kept
