"""Full-parameter fine-tuning for next-token prediction (the fine-tunes BitDelta compresses).

AdamW on every parameter, the learning rate warming up linearly over ``warmup`` of the steps and
then decaying to zero along a cosine; gradients clipped to ``grad_clip``; gradient checkpointing
(transformers' own) so activations of one block at a time are kept. With ``checkpoint_dir`` the
model, optimizer and scheduler state are written atomically every ``save_every`` steps and
``resume=True`` continues from the last one: the data order is a function of the seed, so a
resumed run takes the same batches and ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, engine_field, register_method
from ..compress.modules import compressed_modules
from ..compress.state import TrainingReport, TrainingState
from ..errors import ConfigError, TrainingDivergedError

log = logging.getLogger(__name__)


@dataclass
class FullFinetuneReport(TrainingReport):
    """Training loss and learning rate per step, and the wall time."""

    steps: int = 0
    batch_size: int = 0
    lr: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.history:
            return ""
        return (f"full fine-tuning: {self.steps} steps of {self.batch_size} windows, {self.trend()}, "
                f"{self.seconds:.0f} s")


def cosine_schedule(step: int, steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def heldout_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of ``model`` on token ``windows`` (each scored on its own), in eval mode: the
    held-out curve training stages record every ``eval_every`` steps."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            count += ids[:, 1:].numel()
    model.train(was)
    return math.exp(nll / max(count, 1))


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices for ``steps`` batches of ``batch_size``: seeded permutations of ``range(n)``
    back to back, so step ``i`` always takes ``order[i * batch_size:(i + 1) * batch_size]``."""
    gen = torch.Generator().manual_seed(seed)
    reps = math.ceil(steps * batch_size / n) + 1
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])


@register_method("full_finetune")
@dataclass(kw_only=True)
class FullFinetune(Compressor):
    """Fine-tune every parameter on the calibration windows (next-token cross-entropy)."""

    steps: int = 200
    lr: float = 2e-5
    batch_size: int = 8
    warmup: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    gradient_checkpointing: bool = True
    seed: int = 0
    device: str | None = engine_field(None)
    checkpoint_dir: str | None = engine_field(None)
    resume: bool = engine_field(False)
    save_every: int = engine_field(50)
    needs_calibration = True
    supports_resume = True

    def validate(self, model: nn.Module) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.warmup < 1:
            raise ConfigError(f"full_finetune: steps/batch_size must be >= 1, lr > 0, 0 <= warmup < 1 (got "
                              f"{self.steps}/{self.batch_size}/{self.lr}/{self.warmup})")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("full_finetune: resume=True needs checkpoint_dir")
        if compressed_modules(model):
            raise ConfigError("full_finetune trains dense weights; this model holds compressed modules "
                              "(use lora_finetune for those)")

    def _fingerprint(self, calib: torch.Tensor) -> str:
        d = {k: v for k, v in self.to_dict().items() if k != "method"}
        return json.dumps({"config": d, "calib": [list(calib.shape), int(calib.sum()), int(calib[:, :8].sum())]},
                          sort_keys=True, default=str)

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        device = torch.device(self.device) if self.device else next(model.parameters()).device
        home = next(model.parameters()).device
        model.to(device)
        params = [p for p in model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        warm = max(1, int(self.warmup * self.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cosine_schedule(i, self.steps, warm))
        report = self.report_ = FullFinetuneReport(steps=self.steps, batch_size=self.batch_size)
        order = batch_order(calib.shape[0], self.steps, self.batch_size, self.seed)
        store = TrainingState(self.checkpoint_dir, self._fingerprint(calib), "fine-tuning") \
            if self.checkpoint_dir else None
        saved = store.load() if store is not None and self.resume else None
        start = 0
        if saved is not None:
            start, tensors, extra, progress = saved
            model.load_state_dict(tensors, strict=False)
            opt.load_state_dict(extra["opt"])
            sched.load_state_dict(extra["sched"])
            report.history, report.lr, report.seconds = progress["history"], progress["lr"], progress["seconds"]
            log.info("full_finetune: resuming at step %d from %s", start, self.checkpoint_dir)
        report.resumed_at = start
        use_gc = self.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
        if use_gc:
            _checkpointing(model, True)
        t0 = time.perf_counter()
        model.train()
        try:
            for step in tqdm(range(start, self.steps), desc="full fine-tuning", leave=False,
                             initial=start, total=self.steps):
                ids = calib[order[step * self.batch_size:(step + 1) * self.batch_size]].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"full_finetune: the loss became {loss.item()} at step {step}; "
                                                f"lower lr (now {self.lr})")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                report.lr.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                report.history.append(loss.item())
                if step % 20 == 0 or step == self.steps - 1:
                    log.info("full_finetune step %d/%d: loss %.4f", step + 1, self.steps, loss.item())
                if store is not None and ((step + 1) % self.save_every == 0 or step + 1 == self.steps):
                    store.save(step + 1, model.state_dict(), {"opt": opt.state_dict(), "sched": sched.state_dict()},
                               {"history": report.history, "lr": report.lr, "seconds": report.seconds})
        finally:
            if use_gc:
                _checkpointing(model, False)
            model.eval()
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            report.seconds += time.perf_counter() - t0
        return model.to(home)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' activation (gradient) checkpointing, under its current name or the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
