"""``Distill``: recover a compressed model from one or several teachers (a recipe stage).

The student is the model the recipe has made so far (pruned, sliced, layer-removed, quantized) —
or a smaller architecture initialised from the teacher by an earlier step (``drop_layers`` of
every other layer). Each optimizer step takes ``batch_size`` calibration windows and minimises

    (1 − ce_weight) · D(teacher ‖ student) + ce_weight · cross-entropy on the window's tokens,

with D one of :data:`~llmdeploy.distill.losses.LOSSES` at ``temperature`` (times T²).

* **Teachers**: by default the model as the recipe received it (``Compose`` hands it over
  through ``before_recipe``: kept on the side, or reduced to a memory-mapped top-k cache with
  ``teacher_top_k``); ``teachers=[...]`` names loadable models sharing the tokenizer (``"start"``
  is the recipe's starting model); in Python ``teacher_model=`` takes a model or a list.
* **Several teachers** combine per token: ``teacher_combine="mean_prob"`` (Σ wᵢ pᵢ) or
  ``"mean_logprob"`` (normalised Π pᵢ^wᵢ) with ``teacher_weights`` (default equal, normalised to
  sum to one), or ``"uncertainty"`` — the dynamic teacher adoption of Li et al. (2021): per
  window, the student's normalised predictive entropy u ∈ [0, 1] gives weight u to the *last*
  teacher and 1 − u to the first (two teachers; uncertain windows learn from the last one);
  or ``"confidence"`` — per window, each teacher weighted by how well it predicts the window's
  own tokens, as CA-MKD (Zhang et al., 2022): wₖ = (1 − softmaxₖ(CE))/(K − 1) with CEₖ
  teacher k's cross-entropy on the window (:func:`confidence_weights`); teachers that are experts
  of different domains take the windows of their own domain.
* **Dynamic data selection** (Li et al., 2021): ``select_fraction < 1`` keeps, in every batch,
  that fraction of windows on which the student is most uncertain (highest mean entropy).
* **On-policy data** (GKD's λ): ``on_policy`` of each batch's windows are replaced by the
  student's own continuation of their first ``prompt_len`` tokens (sampled at
  ``sample_temperature``; 0 is greedy), scored by the teacher on the generated positions only.
* **What trains**: ``train="all"`` — every parameter outside compressed modules (quantized or
  sparse storage stays frozen; ``tune_compressed=True`` adds their continuous parameters, e.g.
  AQLM's codebooks and scales); ``train="lora"`` — LoRA adapters on the decoder linears, merged
  into dense linears afterwards (kept beside compressed ones).

AdamW with linear warm-up and cosine decay, gradient clipping, transformers' gradient
checkpointing; ``checkpoint_dir`` / ``resume=True`` continue an interrupted run and end where an
uninterrupted one does (the data order and every sample are seeded per step).

* **Teacher correction** (``teacher_correction_steps > 0``; the Minitron recipe, Sreenivas et al.,
  2024): before distilling, each teacher is first fine-tuned on the stage's own windows with
  next-token cross-entropy for that many steps — the same optimizer, schedule, batch, seed and
  ``train`` (LoRA merged back, or all parameters) as the distillation — so that it matches the
  distribution of the data it teaches on. A teacher that never saw the fine-tuning domain can
  only pull the student towards its own, unadapted predictions, while plain cross-entropy
  training adapts the student to the domain. The correction runs on a copy (a teacher passed in
  is left as it is), before a top-k cache is made, costs the teacher's own training (recorded in
  the report), and resumes from ``checkpoint_dir/teacher-correction``.
* **Hidden-state matching** (``hidden_weight > 0``; TinyBERT's intermediate-layer loss): pairs
  (student layer, teacher layer) of residual-stream states — ``hidden_layers``, indices into
  transformers' ``hidden_states`` (0 = embeddings, i = after block i), by default every student
  block mapped to the teacher block at the same relative depth, round(i·Lₜ/Lₛ) — are compared
  through a learned linear projection per pair (student width → teacher width, so a sliced
  student of width 432 matches a 576-wide teacher): normalised MSE ‖P hₛ − hₜ‖² / ‖hₜ‖², averaged
  over pairs and counted positions, added with weight ``hidden_weight``. Projections start at
  the least-squares fit on the first batch (identity when the student equals the teacher), train
  with the student at ``lr``, are checkpointed with it, and are dropped afterwards. One teacher,
  on the fly (a top-k cache holds no hidden states).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import load_model, register_method
from ..compress.modules import compressed_modules
from ..compress.state import TrainingReport, TrainingState, run_fingerprint
from ..errors import ConfigError, TrainingDivergedError
from ..finetune.full import _checkpointing, batch_order, cosine_schedule
from ..finetune.lora import LoRALinear, merge_adapters
from ..models.adapters import get_adapter
from .losses import LOSSES, distill_loss
from .teacher import TeacherStage, TopKCache

log = logging.getLogger(__name__)

COMBINE = ("mean_prob", "mean_logprob", "uncertainty", "confidence")


@dataclass
class DistillReport(TrainingReport):
    """Training loss per step, held-out perplexity at ``eval_every`` steps, the teachers, wall time."""

    loss: str = ""
    teachers: int = 0
    steps: int = 0
    windows_per_step: int = 0
    trained_params: int = 0
    teacher_correction_seconds: float = 0.0

    def summary(self) -> str:
        if not self.history:
            return ""
        return (f"distillation ({self.loss}, {self.teachers} teacher{'s' if self.teachers != 1 else ''}): "
                f"{len(self.history)} steps of {self.windows_per_step} windows, {self.trained_params:,} parameters "
                f"trained; {self.trend()}; {self.seconds:.0f} s"
                + (f" (+ {self.teacher_correction_seconds:.0f} s correcting the teacher)"
                   if self.teacher_correction_seconds else ""))


def student_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean predictive entropy per sequence, normalised by log(vocabulary) into [0, 1]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1).mean(-1)
    return h / math.log(logits.shape[-1])


def confidence_weights(teacher_logprobs: list[torch.Tensor], targets: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """CA-MKD's per-sample teacher weights (Zhang et al., 2022, eq. 3): with Lₖ the mean
    cross-entropy of teacher k on the window's tokens (where ``mask`` counts),
    wₖ = (1 − exp(Lₖ) / Σⱼ exp(Lⱼ)) / (K − 1) — the teacher that predicts the window better
    weighs more; the weights sum to one over teachers. Returns (n_teachers, batch)."""
    m = mask.to(teacher_logprobs[0].dtype)
    ce = torch.stack([-(lp.gather(-1, targets[..., None])[..., 0] * m).sum(-1) / m.sum(-1).clamp(min=1)
                      for lp in teacher_logprobs])
    k = ce.shape[0]
    return (1 - torch.softmax(ce, dim=0)) / (k - 1)


def combine_teachers(logprobs: list[torch.Tensor], weights: torch.Tensor, how: str) -> torch.Tensor:
    """Per-token log-probabilities of the combined teacher. ``weights``: (n_teachers,) or
    (n_teachers, batch) summing to one over teachers."""
    w = weights.to(logprobs[0].dtype)
    w = w.view(*w.shape, *([1] * (logprobs[0].dim() - w.dim() + 1)))  # broadcast over positions/vocab
    stack = torch.stack(logprobs)
    if how == "mean_logprob":
        return F.log_softmax((w * stack).sum(0), dim=-1)
    return torch.logsumexp(stack + torch.log(w.clamp(min=1e-30)), dim=0)


@register_method("distill")
@dataclass(kw_only=True)
class Distill(TeacherStage):
    """Knowledge distillation into the model the recipe has made so far (see the module docstring)."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    ce_weight: float = 0.0
    steps: int = 100
    batch_size: int = 8
    microbatch_size: int = 1
    lr: float = 5e-5
    warmup: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train: str = "all"
    tune_compressed: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    teachers: list[str] | None = None
    teacher_combine: str = "mean_prob"
    teacher_weights: list[float] | None = None
    select_fraction: float = 1.0
    on_policy: float = 0.0
    prompt_len: int = 32
    sample_temperature: float = 1.0
    hidden_weight: float = 0.0
    hidden_layers: list[list[int]] | None = None
    teacher_correction_steps: int = 0
    _correction_seconds = 0.0  # the teacher correction's training time, for the report

    # -- checks --------------------------------------------------------------------------
    def uses_start(self) -> bool:
        return self.teacher_model is None and (not self.teachers or "start" in self.teachers) and \
            (self.ce_weight < 1 or self.hidden_weight > 0)

    def check_settings(self) -> None:
        super().check_settings()
        if self.loss not in LOSSES:
            raise ConfigError(f"distill: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.train not in ("all", "lora"):
            raise ConfigError(f"distill: train must be 'all' or 'lora', got {self.train!r}")
        if self.teacher_combine not in COMBINE:
            raise ConfigError(f"distill: teacher_combine must be one of {', '.join(COMBINE)}, got "
                              f"{self.teacher_combine!r}")
        if self.steps < 1 or self.batch_size < 1 or self.microbatch_size < 1 or self.lr <= 0:
            raise ConfigError("distill: steps, batch_size and microbatch_size must be >= 1 and lr > 0")
        if not 0 <= self.ce_weight <= 1 or not 0 <= self.on_policy <= 1 or not 0 < self.select_fraction <= 1:
            raise ConfigError("distill: ce_weight and on_policy must be in [0, 1], select_fraction in (0, 1]")
        if self.temperature <= 0 or self.sample_temperature < 0:
            raise ConfigError("distill: temperature must be > 0 and sample_temperature >= 0")
        if self.hidden_weight < 0:
            raise ConfigError(f"distill: hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.teacher_correction_steps < 0:
            raise ConfigError(f"distill: teacher_correction_steps must be >= 0 (0: the teacher as it is), got "
                              f"{self.teacher_correction_steps}")
        if self.hidden_weight and self.teacher_top_k is not None:
            raise ConfigError("distill: hidden-state matching needs the teacher on the fly (a top-k cache holds no "
                              "hidden states); drop teacher_top_k or hidden_weight")
        if self.on_policy and self.teacher_top_k is not None:
            raise ConfigError("distill: on-policy windows need the teacher on the fly (a top-k cache holds the corpus "
                              "windows only); drop teacher_top_k or on_policy")

    def _n_teachers(self) -> int:
        if self.teacher_model is not None:
            return len(self.teacher_model) if isinstance(self.teacher_model, (list, tuple)) else 1
        return len(self.teachers) if self.teachers else 1

    def validate(self, model: nn.Module) -> None:
        self.check_settings()
        n = self._n_teachers()
        if self.teacher_weights is not None and (len(self.teacher_weights) != n or min(self.teacher_weights) < 0
                                                 or sum(self.teacher_weights) <= 0):
            raise ConfigError(f"distill: teacher_weights needs {n} non-negative weights (one per teacher), "
                              f"got {self.teacher_weights}")
        if self.teacher_combine == "uncertainty" and n != 2:
            raise ConfigError(f"distill: teacher_combine='uncertainty' needs two teachers, got {n}")
        if self.teacher_combine == "confidence" and n < 2:
            raise ConfigError(f"distill: teacher_combine='confidence' weighs several teachers, got {n}")
        if self.hidden_weight and n != 1:
            raise ConfigError(f"distill: hidden-state matching compares the student with one teacher, got {n}; "
                              "set hidden_weight=0 with several teachers")
        if self.teacher_top_k is not None and n != 1:
            raise ConfigError("distill: teacher_top_k caches one teacher; with several, compute them on the fly")
        if self.uses_start() and self._start is None:
            raise ConfigError("distill needs a teacher: run it in a recipe (the model the recipe started from is the "
                              "default teacher), name loadable teachers in teachers=[...], or pass teacher_model=")
        if self.train == "all" and not self._trainable(model):
            raise ConfigError("distill: with train='all' nothing would train (every weight is compressed); use "
                              "train='lora' or tune_compressed=True")

    # -- the teachers --------------------------------------------------------------------
    def before_recipe(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        if self.teacher_correction_steps and self.uses_start() and calib is not None:
            self.check_settings()
            model = self.correct_teacher(model, calib)  # a copy already: kept as it is, or cached
            if self.teacher_top_k is None:
                self._start = model.eval()
                return
        super().before_recipe(model, calib)

    def correct_teacher(self, teacher: nn.Module, calib: torch.Tensor) -> nn.Module:
        """A copy of ``teacher`` fine-tuned on ``calib`` with next-token cross-entropy for
        ``teacher_correction_steps`` steps (Minitron's teacher correction): this stage's optimizer,
        schedule, batches, seed and ``train``; ``teacher`` itself is left unchanged."""
        fix = replace(self, ce_weight=1.0, hidden_weight=0.0, on_policy=0.0, select_fraction=1.0,
                      steps=self.teacher_correction_steps, teacher_correction_steps=0, teacher_model=None,
                      teachers=None, teacher_top_k=None, teacher_cache=None, eval_every=0, eval_windows=None,
                      checkpoint_dir=str(Path(self.checkpoint_dir) / "teacher-correction") if self.checkpoint_dir
                      else None)
        was = teacher.training
        log.info("distill: teacher correction, %d steps of cross-entropy on the stage's windows",
                 self.teacher_correction_steps)
        corrected = fix(copy.deepcopy(teacher), calib).train(was).requires_grad_(False)
        self._correction_seconds += fix.report_.seconds
        return corrected

    # -- the run -------------------------------------------------------------------------
    def _trainable(self, model: nn.Module) -> list[nn.Parameter]:
        inside = {id(p) for m in compressed_modules(model).values() for p in m.parameters()}
        params = [p for p in model.parameters() if p.is_floating_point() and id(p) not in inside]
        if self.tune_compressed:
            params += [p for m in compressed_modules(model).values() for p in m.trainable_parameters()]
        return list({id(p): p for p in params}.values())

    def _resolve_teachers(self, calib: torch.Tensor, device: torch.device) -> tuple[list[nn.Module], TopKCache | None]:
        if self.ce_weight == 1 and not self.hidden_weight:
            return [], None
        if self.teacher_model is not None:
            models = list(self.teacher_model) if isinstance(self.teacher_model, (list, tuple)) else [self.teacher_model]
        else:
            models = []
            for name in self.teachers or ["start"]:
                if name == "start":
                    if isinstance(self._start, TopKCache):
                        return [], self._start
                    models.append(self._start)
                else:
                    models.append(load_model(name))
        for m in models:  # forwards run under no_grad: the teachers' own flags are left as they are
            m.to(device).eval()
        if self.teacher_correction_steps:  # teachers passed in or loaded (the start was corrected before)
            models = [self.correct_teacher(m, calib).eval() for m in models]
        if self.teacher_top_k is not None:
            return [], TopKCache(models[0], calib, self.teacher_top_k, self.teacher_cache, self.microbatch_size,
                                 self.temperature)
        return models, None

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        device = torch.device(self.device) if self.device else next(model.parameters()).device
        home = next(model.parameters()).device
        model.to(device)
        teachers, cache = self._resolve_teachers(calib, device)
        correction_seconds, self._correction_seconds = self._correction_seconds, 0.0
        for t in teachers:
            self.check_teacher_vocabulary(t, model)
        flags = {id(p): p.requires_grad for p in model.parameters()}
        wrappers: dict[str, LoRALinear] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.train == "lora":
                for name in get_adapter(model).linear_names():
                    wrappers[name] = LoRALinear.wrap(model.get_submodule(name), self.lora_rank, self.lora_alpha,
                                                     self.lora_dropout)
                    model.set_submodule(name, wrappers[name])
        params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)] if wrappers else self._trainable(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        n_teachers = max(1, len(teachers)) if cache is None else 1
        label = (self.loss if self.ce_weight < 1 else "cross-entropy") + (" + hidden" if self.hidden_weight else "")
        report = self.report_ = DistillReport(loss=label,
                                              teachers=len(teachers) or int(cache is not None), steps=self.steps,
                                              windows_per_step=self.batch_size, trained_params=sum(p.numel() for p in params),
                                              teacher_correction_seconds=correction_seconds)
        weights = torch.tensor(self.teacher_weights or [1.0] * n_teachers, dtype=torch.float32, device=device)
        weights = weights / weights.sum()
        order = batch_order(calib.shape[0], self.steps, self.batch_size, self.seed)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        hidden = None
        if self.hidden_weight:  # projections fitted on the first batch, trained with the student
            hidden = HiddenMatch.fit(model, teachers[0], calib[order[: self.batch_size]].to(device), self.hidden_layers,
                                     self.microbatch_size)
            named.update({f"hidden_match.{n}": p for n, p in hidden.named_parameters()})
        opt = torch.optim.AdamW(params + (list(hidden.parameters()) if hidden else []), lr=self.lr, betas=(0.9, 0.95),
                                weight_decay=self.weight_decay)
        warm = max(1, int(self.warmup * self.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cosine_schedule(i, self.steps, warm))
        store = TrainingState(self.checkpoint_dir, run_fingerprint(self.to_dict(), model, calib), "distillation") \
            if self.checkpoint_dir else None
        start = 0
        saved = store.load() if store is not None and self.resume else None
        if saved is not None:
            start, tensors, extra, progress = saved
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(tensors[n])
            opt.load_state_dict(extra["opt"])
            sched.load_state_dict(extra["sched"])
            for k, v in progress.items():
                setattr(report, k, v)
            log.info("distill: resuming at step %d from %s", start, self.checkpoint_dir)
        report.resumed_at = start
        use_gc = self.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
        t0, before = time.perf_counter(), report.seconds

        def seconds() -> float:
            return before + time.perf_counter() - t0

        def save(done: int) -> None:
            progress = {k: getattr(report, k) for k in ("history", "eval_steps", "eval_ppl", "seconds")}
            store.save(done, named, {"opt": opt.state_dict(), "sched": sched.state_dict()}, progress)

        try:
            if self.eval_every and start == 0:
                self.evaluate(model, 0, report)
            for step in tqdm(range(start, self.steps), desc=f"distill ({report.loss})", leave=False,
                             initial=start, total=self.steps):
                ids, mask = self._batch(model, calib, order, step, device)
                if use_gc:
                    _checkpointing(model, True)
                model.train()
                with torch.random.fork_rng(devices=[]):  # dropout masks seeded per step: resumable
                    torch.manual_seed(self.seed * 7919 + step)
                    loss = self._step_gradients(model, ids, mask, order[step * self.batch_size:(step + 1) * self.batch_size],
                                                teachers, cache, weights, hidden)
                if use_gc:
                    _checkpointing(model, False)
                if not math.isfinite(loss):
                    raise TrainingDivergedError(f"distill: the loss became {loss} at step {step}; lower lr ({self.lr})")
                torch.nn.utils.clip_grad_norm_(params + (list(hidden.parameters()) if hidden else []), self.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.end_of_step(step, loss, model, report, save if store is not None else None, seconds)
        except BaseException:
            for name, w in wrappers.items():  # no half-trained adapters left in the model
                model.set_submodule(name, w.base)
            raise
        finally:
            report.seconds = seconds()
            if use_gc:
                _checkpointing(model, False)
            model.eval()
            if cache is not None and cache is not self._start:  # a cache of its own (not the recipe's)
                cache.close()
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), False))
        if wrappers:
            merge_adapters(model, wrappers)
        self.release_start()
        return model.to(home)

    # -- pieces of a step ----------------------------------------------------------------
    def _batch(self, model: nn.Module, calib: torch.Tensor, order: torch.Tensor, step: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's windows, the first ``on_policy`` fraction of them continued by the student
        from their first ``prompt_len`` tokens, and the mask of positions the loss counts (a
        generated window counts only the positions predicting generated tokens)."""
        rows = order[step * self.batch_size:(step + 1) * self.batch_size]
        ids = calib[rows].to(device).clone()
        mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
        n_gen = round(self.on_policy * len(rows))
        if n_gen:
            p = min(self.prompt_len, ids.shape[1] - 1)
            ids[:n_gen] = self.generate(model, ids[:n_gen, :p], ids.shape[1] - p, seed=self.seed * 1_000_003 + step)
            mask[:n_gen, : p - 1] = False
        return ids, mask

    def generate(self, model: nn.Module, prompts: torch.Tensor, new_tokens: int, seed: int) -> torch.Tensor:
        """The student's continuations of ``prompts`` (exactly ``new_tokens`` each; sampled at
        ``sample_temperature`` with a seeded generator, greedy at 0)."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                kw = {"do_sample": False} if self.sample_temperature == 0 else \
                    {"do_sample": True, "temperature": self.sample_temperature, "top_k": 0, "top_p": 1.0}
                return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0, **kw)
        finally:
            model.train(was)

    def _step_gradients(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                        teachers: list[nn.Module], cache: TopKCache | None, weights: torch.Tensor,
                        hidden: HiddenMatch | None = None) -> float:
        total = 0.0
        n = ids.shape[0]
        for s in range(0, n, self.microbatch_size):
            sl = slice(s, s + self.microbatch_size)
            x, m = ids[sl], mask[sl]
            out = model(input_ids=x, use_cache=False, output_hidden_states=hidden is not None)
            logits = out.logits[:, :-1]
            if self.select_fraction < 1:  # dynamic data selection: the most uncertain windows
                m = m & self._selected(logits)[:, None]
            loss = self._loss(logits, x, m, rows[sl], teachers, cache, weights, hidden, out.hidden_states)
            loss = loss * (x.shape[0] / n)
            loss.backward()
            total += loss.item()
        return total

    def _selected(self, logits: torch.Tensor) -> torch.Tensor:
        """The ``select_fraction`` of windows (rounded up) with the highest student entropy, ranked
        within the micro-batch (``microbatch_size = batch_size`` ranks the whole batch)."""
        u = student_entropy(logits.detach())
        k = max(1, math.ceil(self.select_fraction * len(u)))
        keep = torch.zeros_like(u, dtype=torch.bool)
        keep[torch.topk(u, k).indices] = True
        return keep

    def _loss(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
              teachers: list[nn.Module], cache: TopKCache | None, weights: torch.Tensor,
              hidden: HiddenMatch | None = None, student_hidden: tuple | None = None) -> torch.Tensor:
        targets = ids[:, 1:]
        out = logits.new_zeros(())
        if self.ce_weight > 0:
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
            out = out + self.ce_weight * (ce * mask).sum() / mask.sum().clamp(min=1)
        if cache is not None:
            logp, top = cache[rows]
            teacher = (logp[:, :-1].to(logits.device), top[:, :-1].to(logits.device))
        elif teachers:
            with torch.no_grad():
                touts = [t(input_ids=ids, use_cache=False, output_hidden_states=hidden is not None and k == 0)
                         for k, t in enumerate(teachers)]
                tl = [F.log_softmax(o.logits[:, :-1].float() / self.temperature, -1) for o in touts]
            if hidden is not None:
                out = out + self.hidden_weight * hidden.loss(student_hidden, touts[0].hidden_states, mask)
            if len(tl) == 1:
                combined = tl[0]
            elif self.teacher_combine == "uncertainty":
                u = student_entropy(logits.detach())  # per window, in [0, 1]
                combined = combine_teachers(tl, torch.stack([1 - u, u]), "mean_prob")
            elif self.teacher_combine == "confidence":  # teachers scored on the window's tokens at T = 1
                scored = tl if self.temperature == 1 else [F.log_softmax(t * self.temperature, -1) for t in tl]
                combined = combine_teachers(tl, confidence_weights(scored, targets, mask), "mean_prob")
            else:
                combined = combine_teachers(tl, weights, self.teacher_combine)
            # the combined teacher is already at temperature: pass it as logits at T=1 scaled back
            teacher = combined * self.temperature
        if self.ce_weight == 1:
            return out
        kd = distill_loss(logits, teacher, self.loss, temperature=self.temperature, beta=self.beta, skew=self.skew,
                          mask=mask)
        return out + (1 - self.ce_weight) * kd


class HiddenMatch(nn.Module):
    """Learned linear maps from student hidden states to teacher hidden states, one per matched
    pair of layers (indices into transformers' ``hidden_states``), and the normalised MSE between
    them — the intermediate-layer loss of TinyBERT, usable when the widths differ."""

    def __init__(self, pairs: list[tuple[int, int]], widths: list[tuple[int, int]]) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.proj = nn.ModuleList(nn.Linear(ds, dt, bias=False) for ds, dt in widths)

    @staticmethod
    def default_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        """Every student block to the teacher block at the same relative depth."""
        return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]

    @classmethod
    def fit(cls, student: nn.Module, teacher: nn.Module, windows: torch.Tensor,
            pairs: list[list[int]] | None = None, batch_size: int = 1, ridge: float = 1e-4) -> HiddenMatch:
        """Projections initialised by ridge least squares on ``windows`` (min ‖Hₛ W − Hₜ‖²)."""
        ls, lt = len(get_adapter(student).blocks()), len(get_adapter(teacher).blocks())
        pairs = [tuple(p) for p in pairs] if pairs is not None else cls.default_pairs(ls, lt)
        bad = [p for p in pairs if len(p) != 2 or not (0 <= p[0] <= ls and 0 <= p[1] <= lt)]
        if bad or not pairs:
            raise ConfigError(f"distill: hidden_layers must be pairs [student, teacher] of hidden-state indices in "
                              f"0..{ls} and 0..{lt} (0 = embeddings, i = after block i), got {bad or pairs}")
        gram: dict[int, torch.Tensor] = {}
        cross: dict[int, torch.Tensor] = {}
        was = student.training
        student.eval()
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                x = windows[s:s + batch_size]
                hs = student(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
                ht = teacher(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
                for k, (i, j) in enumerate(pairs):
                    a, b = hs[i].flatten(0, 1).double(), ht[j].flatten(0, 1).double()
                    gram[k] = gram.get(k, 0) + a.T @ a
                    cross[k] = cross.get(k, 0) + a.T @ b
        student.train(was)
        match = cls(pairs, [(gram[k].shape[0], cross[k].shape[1]) for k in range(len(pairs))])
        dtype = next(student.parameters()).dtype
        with torch.no_grad():
            for k, proj in enumerate(match.proj):
                g = gram[k]
                lam = ridge * g.diagonal().mean().clamp(min=1e-12)
                w = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device), cross[k])
                proj.weight.copy_(w.T.to(proj.weight.dtype))
        return match.to(device=windows.device, dtype=dtype)

    def loss(self, student_hidden: tuple, teacher_hidden: tuple, mask: torch.Tensor) -> torch.Tensor:
        """Mean over pairs of ‖P hₛ − hₜ‖² / ‖hₜ‖² over the positions ``mask`` counts."""
        m = mask[..., None].float()
        total = 0.0
        for (i, j), proj in zip(self.pairs, self.proj):
            a = proj(student_hidden[i][:, :-1]).float()
            b = teacher_hidden[j][:, :-1].float()
            total = total + (((a - b) ** 2) * m).sum() / ((b ** 2) * m).sum().clamp(min=1e-12)
        return total / len(self.pairs)
