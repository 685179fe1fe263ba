"""Training drafters on the model's own continuations (self-distillation), resumably.

:func:`self_distill_data` takes prompts from a corpus's split (random windows, as calibration
does) and lets the model continue each greedily — the data recipe Medusa's authors recommend, so
the drafters learn what *this* model says, not what a dataset says (cached on disk by a hash of
model, corpus and settings). :func:`train_drafter` trains Medusa heads, a ReDrafter or hidden-
transfer maps with the model frozen, saving a :class:`~llmdeploy.compress.state.TrainingState`
every ``checkpoint_every`` steps so an interrupted run continues where it stopped;
:func:`measure_accuracy` records, on held-out continuations, how often each rank of each future
position is right — what :func:`~.tree.best_tree` builds trees from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..compress.state import TrainingReport, TrainingState, run_fingerprint
from ..data.calibration import calibration
from ..errors import ConfigError, TrainingDivergedError
from ..models import get_adapter
from .base import Drafter
from .engine import generate
from .hidden_transfer import HiddenTransfer
from .medusa import MedusaHeads
from .redrafter import ReDrafter

log = logging.getLogger(__name__)


@dataclass
class SelfDistillData:
    """``tokens`` (N, prompt_len + new_tokens): prompts followed by the model's greedy continuation."""

    tokens: torch.Tensor
    prompt_len: int

    def anchors(self, ahead: int) -> range:
        """Positions whose next token is the model's own and that have ``ahead`` more after it."""
        return range(self.prompt_len - 1, self.tokens.shape[1] - 1 - ahead)


def _model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def self_distill_data(model: torch.nn.Module, tokenizer, *, corpus: str = "shakespeare", n: int = 64,
                      prompt_len: int = 32, new_tokens: int = 64, seed: int = 0, batch: int = 16,
                      cache_dir: str | os.PathLike | None = None) -> SelfDistillData:
    """``n`` prompts of ``prompt_len`` tokens from ``corpus`` (train split, seeded windows), each
    continued by ``new_tokens`` greedy tokens of ``model``; cached in ``cache_dir`` when given."""
    if n < 1 or prompt_len < 1 or new_tokens < 2:
        raise ConfigError(f"need n >= 1, prompt_len >= 1, new_tokens >= 2; got {n}, {prompt_len}, {new_tokens}")
    key = hashlib.sha256(f"{_model_hash(model)}|{corpus}|{n}|{prompt_len}|{new_tokens}|{seed}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"selfdistill-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists():
        return SelfDistillData(load_file(str(path))["tokens"], prompt_len)
    prompts = calibration(tokenizer, corpus, n_samples=n, seq_len=prompt_len, seed=seed)
    rows = []
    for at in tqdm(range(0, n, batch), desc="self-distillation data", disable=n <= batch):
        chunk = prompts[at : at + batch].tolist()
        out = generate(model, None, chunk, new_tokens, eos_token_id=None).sequences
        rows.extend(torch.tensor(p + o) for p, o in zip(chunk, out))
    data = SelfDistillData(torch.stack(rows), prompt_len)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": data.tokens.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return data


class _HeadReached(Exception):
    """Raised by :func:`final_hidden`'s hook to end a forward at the LM head."""


@torch.no_grad()
def final_hidden(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(N, S, d): the hidden states the LM head sees, for every position (model frozen). Each
    forward stops at the head: its logits (vocabulary-wide at every position, the largest matmul
    and tensor of the pass) are not needed."""
    head = get_adapter(model).head()
    seen: list[torch.Tensor] = []

    def stop(_m, args):
        seen.append(args[0].detach())
        raise _HeadReached

    hook = head.register_forward_pre_hook(stop)
    dev = next(model.parameters()).device
    try:
        for at in range(0, len(tokens), batch):
            try:
                model(input_ids=tokens[at : at + batch].to(dev), use_cache=False)
            except _HeadReached:
                pass
    finally:
        hook.remove()
    if len(seen) != -(-len(tokens) // batch):
        raise ConfigError("final_hidden: the model's forward did not reach its LM head once per batch")
    return torch.cat(seen)


def _ahead(drafter: Drafter) -> int:
    if isinstance(drafter, MedusaHeads):
        return drafter.n_heads + 1
    if isinstance(drafter, ReDrafter):
        return drafter.beam_length + 1
    if isinstance(drafter, HiddenTransfer):
        return drafter.n_future + 1
    raise ConfigError(f"{type(drafter).__name__} is not trainable here (Medusa, ReDrafter, HiddenTransfer are)")


def _loss(drafter: Drafter, model, tokens: torch.Tensor, hidden: torch.Tensor | None, anchors: torch.Tensor,
          soft: bool = True, draft_vocab: bool = False) -> torch.Tensor:
    """The drafter's loss at ``anchors`` of ``tokens``; ``soft``: against the model's distribution
    at each predicted position (from its cached last hidden states), else its tokens;
    ``draft_vocab``: both over the drafter's drafting vocabulary only (see :func:`train_drafter`)."""
    lm_head = get_adapter(model).head()
    if isinstance(drafter, HiddenTransfer):
        return drafter.training_loss(model, tokens, anchors.tolist(), soft=soft)

    def teacher(idx: torch.Tensor) -> torch.Tensor:  # p(token at idx), from the hidden state before it
        with torch.no_grad():
            h = hidden[:, idx - 1].flatten(0, 1)
            # over the drafting vocabulary: the model's distribution conditioned on that subset
            return torch.softmax(drafter.draft_logits(lm_head, h) if draft_vocab else lm_head(h).float(), dim=-1)

    h = hidden[:, anchors].flatten(0, 1)  # (B*A, d)
    if isinstance(drafter, MedusaHeads):
        idx = anchors[:, None] + 2 + torch.arange(drafter.n_heads)[None, :]
        targets = teacher(idx) if soft else tokens[:, idx].flatten(0, 1).to(h.device)
        return drafter.training_loss(lm_head, h, targets, draft=draft_vocab)
    idx = anchors[:, None] + 1 + torch.arange(drafter.beam_length + 1)[None, :]
    probs = teacher(idx[:, 1:]) if soft else None
    return drafter.training_loss(lm_head, model.get_input_embeddings(), h, tokens[:, idx].flatten(0, 1).to(h.device),
                                 probs, draft=draft_vocab)


def train_drafter(drafter: Drafter, model: torch.nn.Module, data: SelfDistillData, *, steps: int = 200,
                  lr: float = 1e-3, batch: int = 4, anchors_per_seq: int = 16, seed: int = 0,
                  soft: bool = True, draft_vocab: bool = False, checkpoint_dir: str | os.PathLike | None = None,
                  checkpoint_every: int = 25, progress: bool = True) -> TrainingReport:
    """Train ``drafter`` (the model frozen) for ``steps`` AdamW steps (cosine schedule) of
    ``batch`` sequences × ``anchors_per_seq`` random anchors; ``soft``: distil the model's full
    distribution at each predicted position (Medusa-2's self-distillation), else its tokens;
    resumes from ``checkpoint_dir``.

    ``draft_vocab``: train over the drafting vocabulary the drafter has (``set_draft_vocab``),
    the one it will draft from — its logits and the model's distribution both cover only those
    tokens (the model's renormalized over them; with ``soft=False`` a token outside the subset is
    not a target). The LM head is read for those rows only, so on SmolLM2 with 8192 of 49,152
    tokens a step costs a fraction of a full-vocabulary one. Not in the papers: FR-Spec restricts
    the vocabulary of a drafter trained over all of it; this trains the drafter it deploys."""
    if draft_vocab and getattr(drafter, "draft_vocab", None) is None:
        raise ConfigError(f"draft_vocab=True trains over a drafting vocabulary: call set_draft_vocab(ids) on the "
                          f"{type(drafter).__name__} first (frequent_tokens(data.tokens, 8192, vocab_size))")
    if draft_vocab and drafter.quantized is not None:
        raise ConfigError("a quantized drafter is not trainable: train it, save it, then quantize")
    ahead = _ahead(drafter)
    if draft_vocab:  # the subset's rows cut again, from this model's head, on first use
        drafter.set_draft_vocab(drafter.draft_vocab)
    anchors = data.anchors(ahead)
    if len(anchors) < 1:
        raise ConfigError(f"continuations of {data.tokens.shape[1] - data.prompt_len} tokens are too short for a "
                          f"drafter looking {ahead} tokens ahead: generate longer ones")
    for p in model.parameters():
        p.requires_grad_(False)
    drafter.train()
    dev = next(model.parameters()).device
    drafter.to(dev)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / steps)).item()))
    report = TrainingReport()
    start = 0
    state = None
    if checkpoint_dir is not None:
        cfg = {"drafter": drafter.kind, **drafter.config(), "steps": steps, "lr": lr, "batch": batch,
               "anchors": anchors_per_seq, "seed": seed, "soft": soft}
        if draft_vocab:  # (a key only when set: earlier runs' fingerprints stay valid)
            cfg["draft_vocab_ids"] = hashlib.sha256(drafter.draft_vocab.cpu().numpy().tobytes()).hexdigest()[:16]
        state = TrainingState(checkpoint_dir, run_fingerprint(cfg, model, data.tokens), f"{drafter.kind} training")
        saved = state.load()
        if saved is not None:
            start, tensors, opt_state, prog = saved
            drafter.load_state_dict(tensors)
            opt.load_state_dict(opt_state["opt"])
            sched.load_state_dict(opt_state["sched"])
            report.history = list(prog.get("history", []))
            report.resumed_at = start
            log.info("%s training resumed at step %d", drafter.kind, start)
    hidden = None if isinstance(drafter, HiddenTransfer) else final_hidden(model, data.tokens)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):  # replay the draws of the steps already done
        torch.randint(len(data.tokens), (batch,), generator=gen)
        torch.randperm(len(anchors), generator=gen)
    t0 = time.perf_counter()
    for step in tqdm(range(start, steps), desc=f"train {drafter.kind}", disable=not progress, initial=start, total=steps):
        rows = torch.randint(len(data.tokens), (batch,), generator=gen)
        pick = torch.randperm(len(anchors), generator=gen)[:anchors_per_seq]
        at = torch.tensor([anchors[i] for i in sorted(pick.tolist())])
        loss = _loss(drafter, model, data.tokens[rows], None if hidden is None else hidden[rows], at, soft,
                     draft_vocab)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"{drafter.kind} training loss became {loss.item()} at step {step}: lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        report.history.append(loss.item())
        if state is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            state.save(step + 1, drafter.state_dict(), {"opt": opt.state_dict(), "sched": sched.state_dict()},
                       {"history": report.history})
    report.seconds = time.perf_counter() - t0
    drafter.eval()
    return report


@torch.no_grad()
def measure_accuracy(drafter: Drafter, model: torch.nn.Module, data: SelfDistillData, *, max_anchors: int = 64
                     ) -> torch.Tensor:
    """(K, topk): how often the rank-``r`` prediction for future position ``k`` is the model's
    token, over held-out ``data``; stored as ``drafter.accuracy`` (trees are built from it)."""
    if not isinstance(drafter, (MedusaHeads, HiddenTransfer)):
        raise ConfigError("measure_accuracy applies to drafters with per-position predictions (Medusa, hidden transfer)")
    K = drafter.n_heads if isinstance(drafter, MedusaHeads) else drafter.n_future
    anchors = list(data.anchors(K + 1))
    step = max(1, len(anchors) // max_anchors)
    at = torch.tensor(anchors[::step][:max_anchors])
    idx = at[:, None] + 2 + torch.arange(K)[None, :]
    targets = data.tokens[:, idx]  # (N, A, K)
    if isinstance(drafter, MedusaHeads):
        h = final_hidden(model, data.tokens)[:, at]
        logits = drafter.future_logits(get_adapter(model).head(), h)  # (N, A, K, V)
    else:
        logits = torch.cat([drafter.future_logits(model, data.tokens[i : i + 1], at.tolist())
                            for i in range(len(data.tokens))])
    top = logits.topk(drafter.topk, dim=-1).indices.cpu()  # (N, A, K, R)
    hit = (top == targets[..., None]).float().mean(dim=(0, 1))  # (K, R)
    drafter.accuracy.copy_(hit)
    return hit
