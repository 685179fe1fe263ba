"""Recovery fine-tuning with LoRA (Hu et al., 2022), as SliceGPT uses it after slicing.

Low-rank adapters ``W + (alpha / r) B A`` are attached (through ``peft``) to every decoder-block
linear, trained for next-token prediction on the calibration windows while everything else stays
frozen, and merged back into the weights, so the result has the same modules and shapes as
before: it saves, loads and composes like any other model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, register_method
from ..compress.modules import compressed_modules
from ..errors import ConfigError
from ..models.adapters import get_adapter

log = logging.getLogger(__name__)


@register_method("lora_finetune")
@dataclass
class LoRAFinetune(Compressor):
    """Fine-tune LoRA adapters on the decoder linears with the calibration windows, then merge.

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
    device: str | None = None
    needs_calibration = True

    def validate(self, model: nn.Module) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ConfigError(f"lora_finetune: invalid rank/alpha/dropout/lr {self.rank}/{self.alpha}/"
                              f"{self.dropout}/{self.lr}")
        if self.epochs <= 0 or self.batch_size < 1:
            raise ConfigError("lora_finetune: epochs must be > 0 and batch_size >= 1")
        if compressed_modules(model):
            raise ConfigError("lora_finetune: the model holds compressed modules; fine-tune before "
                              "quantizing or compacting (LoRA is merged into dense linears)")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("lora_finetune needs the peft package: pip install peft") from None

    def target_modules(self, model: nn.Module) -> list[str]:
        """Full names of the decoder-block linears that get adapters."""
        return get_adapter(model).linear_names()

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        steps = math.ceil(self.epochs * math.ceil(calib.shape[0] / self.batch_size))
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        device = torch.device(self.device) if self.device else next(model.parameters()).device
        home = next(model.parameters()).device
        model.to(device)
        trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules(model), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            peft_model = get_peft_model(model, config)
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
            warm = max(1, int(self.warmup * steps))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / max(1, steps - warm))))
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.cat([torch.randperm(calib.shape[0], generator=gen)
                               for _ in range(math.ceil(steps * self.batch_size / calib.shape[0]) + 1)])
            probe = calib[: self.batch_size].to(device)  # a fixed batch: loss before and after
            self.probe_loss_ = [self._loss(peft_model, probe)]
            peft_model.train()
            self.history_: list[float] = []
            for step in tqdm(range(steps), desc="LoRA fine-tuning", leave=False):
                ids = calib[order[step * self.batch_size:(step + 1) * self.batch_size]].to(device)
                loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"lora_finetune: the loss became {loss.item()} at step {step}; "
                                             "lower lr")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.history_.append(loss.item())
                if step % 10 == 0 or step == steps - 1:
                    log.info("LoRA step %d/%d: loss %.4f", step + 1, steps, loss.item())
            self.probe_loss_.append(self._loss(peft_model, probe))
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged.to(home)
        for name, p in merged.named_parameters():  # peft froze everything: restore the flags
            p.requires_grad_(trainable_before.get(name, True))
        return merged

    @staticmethod
    def _loss(model: nn.Module, ids: torch.Tensor) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        model.train(was)
        return loss

    def summary(self) -> str:
        h = getattr(self, "history_", None)
        if not h:
            return ""
        before, after = self.probe_loss_
        return (f"LoRA r={self.rank} alpha={self.alpha}: {len(h)} steps of {self.batch_size} windows; loss on "
                f"the first batch {before:.3f} -> {after:.3f}")
