"""PV-Tuning (Malinovskii et al., NeurIPS 2024): fine-tune a quantized model end to end, codes included.

A quantized weight is a discrete part (codes) and a continuous part (AQLM's codebooks and scales,
GPTQ/RTN's group scales). PV-Tuning minimises the KL divergence from the dense teacher's
next-token distributions to the student's, over the calibration windows, by alternating two
kinds of update in every optimizer step (as the reference implementation, ``src/pv_optimizer.py``
of the AQLM repository, does):

* **P step** — codes fixed: Adam on the continuous parameters of every quantized linear and on
  every parameter that is not quantized (norms, biases, embeddings, the head; ``train_non_quantized``).
  The gradient reaches codebooks and scales by back-propagating the gradient of the dequantized
  weight through the decoding, once per step.
* **V step** — the discrete part: Adam (``code_lr``, β = ``code_betas``, the reference's 0 / 0.95)
  on a *straight-through buffer* per quantized weight (a dense copy initialised to the dequantized
  weight), then projection back onto representable weights, restricted to the fraction
  ``max_code_change`` of code groups whose distance to the buffer is largest (the paper's
  subspace step): only those are re-encoded — by beam search over codebooks for AQLM, by
  rounding to the group's grid for GPTQ/RTN — to minimise the squared distance to the buffer.
  ``code_trust_ratio`` (the published recipe's 1e-2, the default here) then bounds the step: the
  changes are kept farthest group first while ‖Ŵ_new − Ŵ_prev‖ ≤ ratio · ‖Ŵ_prev‖ per weight
  (plus one group beyond, so that every step can move), the rest undone, as the reference's
  ``beam_search_optimal_codes`` does. Without it (``None``) every selected group takes its new
  code: on SmolLM2 GPTQ 3-bit, 20 steps at code_lr 1e-2 then diverged (PV 94 -> 5.4e5
  perplexity, STE -> 3318, while P-only reached 58; ``benchmarks/results/pv_tuning``).
  ``delta_decay`` (0: a persistent buffer, the published recipe; 1: the buffer reset to the
  quantized weight every step) mixes the two.

The **baselines** live in the same class with the same budget: ``mode="ste"`` re-encodes *every*
group each step (straight-through estimation; with AQLM that search dominates the step — 140–158 s
per step on SmolLM2's 13.3 M groups at beam 5, measured, against ~30 s for PV), ``mode="p_only"``
never changes a code; ``mode="v_only"`` (codes only) is an ablation. Under ``code_trust_ratio`` STE
keeps, like PV, the changes of the groups farthest from the buffer first until the ratio is reached,
so the two differ only where the ratio lets more than ``max_code_change`` of the groups change:
measured on SmolLM2 AQLM 2x8 (20 steps, ratio 1e-2) about 0.05% of the groups change per step, STE and
PV land within 0.03% of each other, and a binding ``max_code_change`` (1e-4) moves PV toward P-only.
Against the unbounded straight-through estimator (``code_trust_ratio=None``, the classic baseline)
PV is the stable one: on one AQLM build STE at ``code_lr`` 1e-3 changed almost no code (= P-only,
85.86), at 3e-3 reached 84.75 and at 1e-2 diverged (2187), where PV gave 79.61
(``benchmarks/results/pv_tuning``).

Every quantized module is read through a :class:`Representation` (one per storage format:
:class:`AdditiveCodes` for AQLMLinear, :class:`ScalarCodes` for RTNLinear, which GPTQ writes too),
so the method is representation-agnostic, as the paper says; a format gains PV-Tuning by
registering one. What "a code group" is follows the format: an AQLM group is one
``out_group_size x in_group_size`` tile (all its codebooks' codes); a scalar code is one weight.

The training forward runs the model with each quantized linear replaced by a plain linear whose
weight *is* the current dequantized weight, so what is trained is exactly what is stored:
RTN/GPTQ scales train in float32 but compute through their fp16 rounding (straight-through), and
after every step each weight decodes exactly from the stored codes.

Deviations from the reference, all documented here:

* One machine: no FSDP; memory is kept by micro-batches (gradients accumulated over
  ``batch_size`` windows) and transformers' gradient checkpointing, one block's activations at a time.
* Adam for the P step (the published recipe uses LAMB-style updates at lr 3e-4, β 0.9/0.95;
  the learning rate here is constant, as in the reference).
* The teacher is the dense model the recipe started from: kept beside the student, or — with
  ``teacher_top_k`` — reduced before the first step to memory-mapped top-k log-probabilities
  (see :mod:`llmdeploy.distill.teacher`; the KL is then over the top-k tokens plus one bucket).
* GPTQ/RTN zero points are integers of the format and stay fixed; codes move on the grid only.
* The GPTQ/RTN "group" the subspace step counts is one weight (a scalar code).

With ``checkpoint_dir`` the state (codes, continuous parameters, buffers, both optimizers) is
written every ``save_every`` steps; ``resume=True`` on a freshly quantized model (the same
recipe) continues and ends where an uninterrupted run does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import register_method, require_targets
from ..compress.modules import compressed_modules
from ..compress.state import TrainingReport, TrainingState, run_fingerprint
from ..distill.losses import kl_full, kl_topk
from ..distill.teacher import TeacherStage, TopKCache
from ..errors import ConfigError, TrainingDivergedError
from ..finetune.full import _checkpointing, batch_order
from .aqlm import encode_groups_l2
from .aqlm_linear import AQLMLinear, dequantize, pack_codes, unpack_codes
from .packing import pack
from .rtn import RTNLinear

log = logging.getLogger(__name__)

MODES = ("pv", "ste", "p_only", "v_only")


# -- representations -----------------------------------------------------------------------
class Representation:
    """One quantized linear during a run: its continuous parameters (the P step trains them), its
    decoding (differentiable in them) and its codes (only the V step's projection changes them)."""

    #: number of code groups (the unit ``max_code_change`` counts)
    n_groups: int

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def continuous(self) -> list[torch.Tensor]:
        """Float32 leaf tensors the P step trains."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) the module computes with, differentiable in :meth:`continuous`."""
        raise NotImplementedError

    def group_errors(self, delta: torch.Tensor) -> torch.Tensor:
        """Squared norm of ``delta`` (out, in) over each code group, (n_groups,)."""
        raise NotImplementedError

    def encode(self, target: torch.Tensor, groups: torch.Tensor, beam_size: int = 1) -> int:
        """Re-encode the code groups ``groups`` (flat indices) to minimise the squared distance
        to ``target`` (out, in) (``beam_size`` hypotheses where the format searches); return how
        many of them changed."""
        raise NotImplementedError

    def group_codes(self, groups: torch.Tensor) -> torch.Tensor:
        """A copy of the codes of ``groups`` (flat indices), one row per group."""
        raise NotImplementedError

    def set_group_codes(self, groups: torch.Tensor, codes: torch.Tensor) -> None:
        """Write ``codes`` (as :meth:`group_codes` returns them) back into ``groups``."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Write everything back into the module's storage and freeze it."""
        raise NotImplementedError


REPRESENTATIONS: dict[type[nn.Module], type[Representation]] = {}


def representation(module_class: type[nn.Module]):
    """Class decorator: PV-Tuning reads modules of ``module_class`` through this representation."""

    def deco(cls: type[Representation]) -> type[Representation]:
        REPRESENTATIONS[module_class] = cls
        return cls

    return deco


@representation(AQLMLinear)
class AdditiveCodes(Representation):
    """AQLM: codes per (output group, input group) tile; codebooks and scales continuous."""

    def __init__(self, module: AQLMLinear) -> None:
        super().__init__(module)
        self.nbits = module.nbits_per_codebook
        self.codes = unpack_codes(module.codes.data, self.nbits)  # (O', G, C), unsigned
        self.n_out_g, self.n_in_g = self.codes.shape[:2]
        self.n_groups = self.n_out_g * self.n_in_g

    def continuous(self) -> list[torch.Tensor]:
        return [self.module.codebooks, self.module.scales]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.module.codebooks, self.module.scales, self.nbits)

    def _tiles(self, w: torch.Tensor) -> torch.Tensor:  # (O', G, og, ig)
        m = self.module
        return w.reshape(self.n_out_g, m.out_group_size, self.n_in_g, m.in_group_size).transpose(1, 2)

    def group_errors(self, delta: torch.Tensor) -> torch.Tensor:
        return self._tiles(delta).square().sum(dim=(2, 3)).flatten()

    def encode(self, target: torch.Tensor, groups: torch.Tensor, beam_size: int = 1) -> int:
        m = self.module
        rows, cols = groups // self.n_in_g, groups % self.n_in_g
        tiles = self._tiles(target)[rows, cols] / m.scales.detach().view(-1, 1, 1)[rows]
        old = self.codes[rows, cols]
        new = encode_groups_l2(tiles.flatten(1), old, m.codebooks.detach(), beam_size)
        self.codes[rows, cols] = new
        m.codes.data.copy_(pack_codes(self.codes, self.nbits))
        return int((new != old).any(-1).sum())

    def group_codes(self, groups: torch.Tensor) -> torch.Tensor:
        return self.codes[groups // self.n_in_g, groups % self.n_in_g].clone()

    def set_group_codes(self, groups: torch.Tensor, codes: torch.Tensor) -> None:
        self.codes[groups // self.n_in_g, groups % self.n_in_g] = codes
        self.module.codes.data.copy_(pack_codes(self.codes, self.nbits))

    def state(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "codebooks": self.module.codebooks.data, "scales": self.module.scales.data}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.codes.copy_(state["codes"])
        self.module.codes.data.copy_(pack_codes(self.codes, self.nbits))
        self.module.codebooks.data.copy_(state["codebooks"])
        self.module.scales.data.copy_(state["scales"])

    def finish(self) -> None:
        self.module.codes.data.copy_(pack_codes(self.codes, self.nbits))
        self.module.codebooks.requires_grad_(False)
        self.module.scales.requires_grad_(False)


@representation(RTNLinear)
class ScalarCodes(Representation):
    """GPTQ/RTN: one code per weight on its group's grid ``(q − z)·s``; the fp16 group scales
    continuous (trained in float32, computed through their fp16 rounding), zero points fixed."""

    def __init__(self, module: RTNLinear) -> None:
        super().__init__(module)
        self.gs, self.qmax = module.group_size, 2**module.bits - 1
        self.q = module.codes().to(torch.float32)  # (out, in), exact small integers
        z = module.zeros
        self.zero = (z.to(torch.float32) if z is not None else
                     torch.full(module.scales.shape, float(2 ** (module.bits - 1))))
        self.scale = module.scales.detach().to(torch.float32).clone().requires_grad_(True)
        self.n_groups = self.q.numel()

    def continuous(self) -> list[torch.Tensor]:
        return [self.scale]

    def _stored_scale(self) -> torch.Tensor:
        s = self.scale
        return s + (s.detach().half().float() - s.detach())  # the fp16 value, gradient straight through

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.q.shape
        g = self.q.view(out_f, in_f // self.gs, self.gs) - self.zero.unsqueeze(-1)
        return (g * self._stored_scale().unsqueeze(-1)).view(out_f, in_f)

    def group_errors(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.square().flatten()

    def encode(self, target: torch.Tensor, groups: torch.Tensor, beam_size: int = 1) -> int:
        per_group = groups // self.gs  # index into the flattened (out, in / gs) scales
        s = self.scale.detach().half().float().flatten()[per_group]
        s = torch.where(s == 0, torch.full_like(s, 2.0**-14), s)
        new = (torch.round(target.flatten()[groups] / s) + self.zero.flatten()[per_group]).clamp(0, self.qmax)
        flat = self.q.view(-1)
        changed = int((new != flat[groups]).sum())
        flat[groups] = new
        return changed

    def group_codes(self, groups: torch.Tensor) -> torch.Tensor:
        return self.q.view(-1)[groups].clone()

    def set_group_codes(self, groups: torch.Tensor, codes: torch.Tensor) -> None:
        self.q.view(-1)[groups] = codes

    def state(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale.data}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.q.copy_(state["q"])
        self.scale.data.copy_(state["scale"])

    def finish(self) -> None:
        m = self.module
        m.qweight = pack(self.q.to(torch.uint8), m.bits)
        m.scales = self.scale.detach().half()


# -- the report ----------------------------------------------------------------------------
@dataclass
class PVReport(TrainingReport):
    """Per step: the training loss and the fraction of code groups the V step changed; held-out
    perplexity at ``eval_every`` steps; the wall time."""

    mode: str = ""
    steps: int = 0
    windows_per_step: int = 0
    code_change: list[float] = field(default_factory=list)
    tuned: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.history:
            return ""
        s = (f"PV-Tuning ({self.mode}): {len(self.history)} steps of {self.windows_per_step} windows, "
             f"{len(self.tuned)} quantized linears; {self.trend()}")
        if self.code_change:
            mean = sum(self.code_change) / len(self.code_change)  # may be tiny under a trust ratio: 2 digits
            s += f"; codes changed per step {100 * mean:.2g}% of groups on average"
        return s + f"; {self.seconds:.0f} s"


# -- the stage -----------------------------------------------------------------------------
@register_method("pv_tuning")
@dataclass(kw_only=True)
class PVTuning(TeacherStage):
    """PV-Tuning of every quantized linear the model holds (see the module docstring).

    Runs after AQLM, GPTQ or RTN in a recipe. ``steps`` optimizer steps of ``batch_size``
    calibration windows (processed ``microbatch_size`` at a time); ``lr`` for the P step,
    ``code_lr``, ``max_code_change`` and ``code_trust_ratio`` (None: unbounded) for the V step,
    ``beam_size`` for AQLM's re-encoding.
    ``loss="kl"`` distils from the dense teacher (the model the recipe started from, or
    ``teacher_model``); ``loss="ce"`` is next-token cross-entropy on the windows (no teacher).
    """

    mode: str = "pv"
    steps: int = 100
    batch_size: int = 8
    microbatch_size: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    code_lr: float = 1e-2
    code_betas: tuple[float, float] = (0.0, 0.95)
    max_code_change: float = 0.01
    code_trust_ratio: float | None = 0.01
    beam_size: int = 5
    delta_decay: float = 0.0
    loss: str = "kl"
    train_non_quantized: bool = True

    # -- checks --------------------------------------------------------------------------
    def uses_start(self) -> bool:
        return self.loss == "kl" and self.teacher_model is None

    def validate(self, model: nn.Module) -> None:
        self.check_settings()
        self._targets(model)
        if self.uses_start() and self._start is None:
            raise ConfigError(
                "pv_tuning distils from the dense model: run it in a recipe after the quantizer (the recipe keeps "
                "the model it started from), or pass teacher_model=<the dense model>, or use loss='ce'")
        teacher = self.teacher_model if self.teacher_model is not None else self._start
        if isinstance(teacher, nn.Module):
            self.check_teacher_vocabulary(teacher, model)

    def check_settings(self) -> None:
        super().check_settings()
        if self.mode not in MODES:
            raise ConfigError(f"pv_tuning: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.loss not in ("kl", "ce"):
            raise ConfigError(f"pv_tuning: loss must be 'kl' (distil from the dense teacher) or 'ce', got {self.loss!r}")
        if self.steps < 1 or self.batch_size < 1 or self.microbatch_size < 1:
            raise ConfigError("pv_tuning: steps, batch_size and microbatch_size must be >= 1")
        if not 0 < self.max_code_change <= 1:
            raise ConfigError(f"pv_tuning: max_code_change is a fraction of code groups in (0, 1], got "
                              f"{self.max_code_change}")
        if self.code_trust_ratio is not None and not self.code_trust_ratio > 0:
            raise ConfigError(f"pv_tuning: code_trust_ratio bounds each step's change of a quantized weight relative to "
                              f"its norm and must be > 0 (or None for no bound), got {self.code_trust_ratio}")
        if self.lr < 0 or self.code_lr <= 0 or self.beam_size < 1 or not 0 <= self.delta_decay <= 1:
            raise ConfigError("pv_tuning: lr must be >= 0, code_lr > 0, beam_size >= 1, 0 <= delta_decay <= 1")

    def _targets(self, model: nn.Module) -> dict[str, Representation]:
        """A representation per quantized linear PV-Tuning can tune; ConfigError when there is none."""
        targets, skipped = {}, {}
        for name, mod in compressed_modules(model).items():
            rep = REPRESENTATIONS.get(type(mod))
            if rep is None:
                skipped[name] = f"PV-Tuning has no representation for {type(mod).__name__} (it tunes AQLM, GPTQ, RTN)"
            else:
                targets[name] = rep
        if not targets and not skipped:
            raise ConfigError("pv_tuning: the model holds no quantized linear; run it after aqlm, gptq or rtn")
        require_targets("pv_tuning", targets, skipped)
        self._skipped = skipped
        return targets

    # -- the run -------------------------------------------------------------------------
    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        device = torch.device(self.device) if self.device else next(model.parameters()).device
        home = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        model.to(device)
        if dtype != torch.float32:
            model.float()  # train in float32 (bf16 Adam updates round to nothing), cast back at the end
        teacher, cache = self._teacher(calib, device)
        kinds = self._targets(model)
        reps = {name: kinds[name](model.get_submodule(name)) for name in kinds}
        report = self.report_ = PVReport(mode=self.mode, steps=self.steps, windows_per_step=self.batch_size,
                                         tuned={n: type(r.module).__name__ for n, r in reps.items()},
                                         skipped=dict(self._skipped))
        flags = {id(p): p.requires_grad for p in model.parameters()}
        originals = {name: rep.module for name, rep in reps.items()}
        plain = self._swap_in_plain_linears(model, reps)
        p_on, v_on = self.mode in ("pv", "ste", "p_only"), self.mode in ("pv", "ste", "v_only")
        p_params: list[torch.Tensor] = []
        if p_on:
            for rep in reps.values():
                p_params += rep.continuous()
            if self.train_non_quantized:  # not the tuned weights, nor what other compressed modules hold
                frozen = {id(lin.weight) for lin in plain.values()}
                frozen |= {id(q) for m in compressed_modules(model).values() for q in m.parameters()}
                p_params += [p for p in model.parameters() if p.is_floating_point() and id(p) not in frozen]
            p_params = list({id(p): p for p in p_params}.values())
        for p in model.parameters():
            p.requires_grad_(False)
        for p in p_params:
            p.requires_grad_(True)
        for lin in plain.values():
            lin.weight.requires_grad_(True)
        opt_p = torch.optim.Adam(p_params, lr=self.lr, betas=tuple(self.betas)) if p_params else None
        ste = {name: rep.dequantize().detach().clone() for name, rep in reps.items()} if v_on else {}
        opt_v = torch.optim.Adam(list(ste.values()), lr=self.code_lr, betas=tuple(self.code_betas)) if ste else None
        order = batch_order(calib.shape[0], self.steps, self.batch_size, self.seed)
        store = TrainingState(self.checkpoint_dir, run_fingerprint(self.to_dict(), model, calib), "PV-Tuning") \
            if self.checkpoint_dir else None
        start = self._restore(store, reps, model, p_params, ste, opt_p, opt_v, report) if self.resume else 0
        if start:
            self._refresh(reps, plain)
            log.info("pv_tuning: resuming at step %d from %s", start, self.checkpoint_dir)
        report.resumed_at = start
        use_gc = self.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
        if use_gc:
            _checkpointing(model, True)
        t0, before = time.perf_counter(), report.seconds

        def seconds() -> float:
            return before + time.perf_counter() - t0

        save = (lambda done: self._save(store, done, reps, model, p_params, ste, opt_p, opt_v, report)) \
            if store is not None else None
        try:
            if self.eval_every and start == 0:
                self.evaluate(model, 0, report)
            for step in tqdm(range(start, self.steps), desc=f"PV-Tuning ({self.mode})", leave=False,
                             initial=start, total=self.steps):
                model.train()
                rows = order[step * self.batch_size:(step + 1) * self.batch_size]
                loss = self._gradients(model, calib, rows, teacher, cache, device)
                if not math.isfinite(loss):
                    raise TrainingDivergedError(f"pv_tuning: the loss became {loss} at step {step}; lower lr "
                                                f"({self.lr}) or code_lr ({self.code_lr})")
                grads = {name: plain[name].weight.grad for name in reps}
                if opt_p is not None:  # P: back through each decoding into codebooks / scales
                    with torch.enable_grad():
                        for name, rep in reps.items():
                            rep.dequantize().backward(grads[name])
                    opt_p.step()
                    opt_p.zero_grad(set_to_none=True)
                if opt_v is not None:  # V: the buffers' Adam step, then the restricted projection
                    for name, buf in ste.items():
                        buf.grad = grads[name]
                    opt_v.step()
                    opt_v.zero_grad(set_to_none=True)
                    report.code_change.append(self._project(reps, ste))
                self._refresh(reps, plain)
                self.end_of_step(step, loss, model, report, save, seconds)
        finally:
            report.seconds = seconds()
            if use_gc:
                _checkpointing(model, False)
            model.eval()
            for name, rep in reps.items():  # codes and scales into the storage, modules back in place
                rep.finish()
                model.set_submodule(name, originals[name])
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), False))
            if cache is not None:
                cache.close()
            self.release_start()
            if dtype != torch.float32:
                model.to(dtype)
            model.to(home)
        return model

    # -- pieces of a step ----------------------------------------------------------------
    def _teacher(self, calib: torch.Tensor, device: torch.device) -> tuple[nn.Module | None, TopKCache | None]:
        """(teacher model on the fly, or None; top-k cache, or None)."""
        if self.loss != "kl":
            return None, None
        kept = self._start
        if isinstance(kept, TopKCache):
            return None, kept
        teacher = self.teacher_model if self.teacher_model is not None else kept
        teacher.to(device).eval()
        if self.teacher_top_k is not None:
            return None, TopKCache(teacher, calib, self.teacher_top_k, self.teacher_cache, self.microbatch_size)
        return teacher, None

    @staticmethod
    def _swap_in_plain_linears(model: nn.Module, reps: dict[str, Representation]) -> dict[str, nn.Linear]:
        """Replace every tuned module by a linear whose weight is its dequantized weight (the
        straight-through point the loss is differentiated at); the bias is the module's own."""
        plain = {}
        for name, rep in reps.items():
            w = rep.dequantize().detach()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
            lin.weight = nn.Parameter(w.clone())
            lin.bias = getattr(rep.module, "bias", None)
            model.set_submodule(name, lin)
            plain[name] = lin
        return plain

    @staticmethod
    def _refresh(reps: dict[str, Representation], plain: dict[str, nn.Linear]) -> None:
        with torch.no_grad():
            for name, rep in reps.items():
                plain[name].weight.copy_(rep.dequantize())
                plain[name].weight.grad = None

    def _gradients(self, model: nn.Module, calib: torch.Tensor, rows: torch.Tensor, teacher: nn.Module | None,
                   cache: TopKCache | None, device: torch.device) -> float:
        """Accumulate the step's gradients over micro-batches; return the step's mean loss."""
        total = 0.0
        for s in range(0, len(rows), self.microbatch_size):
            mb = rows[s:s + self.microbatch_size]
            ids = calib[mb].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = self._loss(logits, ids, mb, teacher, cache) * (len(mb) / len(rows))
            loss.backward()
            total += loss.item()
        return total

    def _loss(self, logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, teacher: nn.Module | None,
              cache: TopKCache | None) -> torch.Tensor:
        if self.loss == "ce":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if cache is not None:
            logp, top = cache[rows]
            return kl_topk(logits, logp.to(logits.device), top.to(logits.device))
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        return kl_full(logits, t)

    def _project(self, reps: dict[str, Representation], ste: dict[str, torch.Tensor]) -> float:
        """Re-encode, per weight, the code groups farthest from the buffer (all of them for STE),
        then undo the changes beyond the trust ratio; return the fraction of all code groups that
        changed."""
        changed = total = 0
        trust = self.code_trust_ratio
        with torch.no_grad():
            for name, rep in reps.items():
                buf = ste[name]
                frac = 1.0 if self.mode == "ste" else self.max_code_change
                k = min(rep.n_groups, math.ceil(frac * rep.n_groups))
                if k == rep.n_groups and trust is None:
                    groups = torch.arange(rep.n_groups, device=buf.device)
                else:  # farthest first: the trust ratio keeps a prefix of this order
                    before = rep.dequantize()
                    groups = torch.topk(rep.group_errors(buf - before), k, sorted=trust is not None).indices
                if trust is None:
                    changed += rep.encode(buf, groups, self.beam_size)
                else:
                    changed += self._encode_within_trust(rep, buf, groups, before, trust)
                total += rep.n_groups
                if self.delta_decay:
                    buf.mul_(1 - self.delta_decay).add_(rep.dequantize(), alpha=self.delta_decay)
        return changed / max(total, 1)

    @torch.no_grad()
    def _encode_within_trust(self, rep: Representation, buf: torch.Tensor, groups: torch.Tensor,
                             before: torch.Tensor, trust: float) -> int:
        """Re-encode ``groups`` (farthest first), then keep only the longest prefix of their changes
        whose norm stays within ``trust`` times the weight's norm, plus one more group (so that a
        step can always change something): ‖Ŵ_new − Ŵ_prev‖ ≤ trust · ‖Ŵ_prev‖, as the reference's
        ``code_trust_ratio``. Returns how many groups changed."""
        old = rep.group_codes(groups)
        rep.encode(buf, groups, self.beam_size)
        moved = rep.group_errors(rep.dequantize() - before)[groups]  # squared change per group, in order
        keep = 1 + int(torch.searchsorted(moved.cumsum(0).sqrt(), trust * before.norm()))
        if keep < len(groups):
            rep.set_group_codes(groups[keep:], old[keep:])
        new = rep.group_codes(groups[:keep])
        return int((new != old[:keep]).reshape(len(new), -1).any(-1).sum())

    # -- checkpoints ---------------------------------------------------------------------
    @staticmethod
    def _named_trainables(model: nn.Module, p_params: list[torch.Tensor], reps) -> dict[str, torch.Tensor]:
        """Non-quantized trained parameters by name (continuous parts of the representations are
        saved with them)."""
        owned = {id(t) for r in reps.values() for t in r.continuous()}
        wanted = {id(p) for p in p_params if id(p) not in owned}
        return {n: p for n, p in model.named_parameters() if id(p) in wanted}

    def _save(self, store: TrainingState, step: int, reps, model, p_params, ste, opt_p, opt_v,
              report: PVReport) -> None:
        tensors = {f"rep.{n}.{k}": v for n, r in reps.items() for k, v in r.state().items()}
        tensors.update({f"param.{n}": p for n, p in self._named_trainables(model, p_params, reps).items()})
        tensors.update({f"ste.{n}": b for n, b in ste.items()})
        optim = {"p": None if opt_p is None else opt_p.state_dict(), "v": None if opt_v is None else opt_v.state_dict()}
        progress = {k: getattr(report, k) for k in ("history", "code_change", "eval_steps", "eval_ppl", "seconds")}
        store.save(step, tensors, optim, progress)

    def _restore(self, store: TrainingState | None, reps, model, p_params, ste, opt_p, opt_v,
                 report: PVReport) -> int:
        saved = store.load() if store is not None else None
        if saved is None:
            return 0
        step, tensors, optim, progress = saved
        with torch.no_grad():
            for n, r in reps.items():
                r.load_state({k: tensors[f"rep.{n}.{k}"] for k in r.state()})
            for n, p in self._named_trainables(model, p_params, reps).items():
                p.copy_(tensors[f"param.{n}"])
            for n, b in ste.items():
                b.copy_(tensors[f"ste.{n}"])
        if opt_p is not None:
            opt_p.load_state_dict(optim["p"])
        if opt_v is not None:
            opt_v.load_state_dict(optim["v"])
        for k, v in progress.items():
            setattr(report, k, v)
        return step
