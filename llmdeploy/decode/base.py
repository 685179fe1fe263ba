"""What every drafter does for the engine, and how trainable drafters are saved and loaded.

A drafter is an ``nn.Module`` holding only its own parameters (the model's LM head and embeddings
it shares are passed in, never registered, so a saved drafter is small). The engine calls, per
generation: :meth:`Drafter.begin` once, then per forward :meth:`~Drafter.extend` (add pseudo
nodes), :meth:`~Drafter.forward_context` (hooks during the model's forward), and after it
:meth:`~Drafter.observe` (what was accepted); :meth:`~Drafter.propose` builds each step's trees
and :meth:`~Drafter.release` forgets finished sequences. Sequences are named by ``keys`` (row
indices in :func:`~.engine.generate`, request ids in a serving engine), so rows may come and go.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels import rows
from .tree import TokenTree, best_tree, static_tree

DRAFTERS: dict[str, type[Drafter]] = {}


def distill_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., V) against token ids (...) or, for soft
    distillation, the model's probabilities (..., V) — then it is the KL divergence up to the
    model's (constant) entropy."""
    logits = logits.flatten(0, -2)
    if targets.is_floating_point():
        return torch.nn.functional.cross_entropy(logits, targets.flatten(0, -2).to(logits))
    return torch.nn.functional.cross_entropy(logits, targets.flatten().to(logits.device))


def register_drafter(cls: type[Drafter]) -> type[Drafter]:
    DRAFTERS[cls.kind] = cls
    return cls


class Drafter(nn.Module):
    """Base class (see the module docstring)."""

    kind: ClassVar[str] = ""
    #: the acceptance rule at ``temperature > 0``: "rejection" (exact, needs sampled drafts) or "typical"
    acceptance: ClassVar[str] = "typical"

    def config(self) -> dict[str, Any]:
        """Constructor arguments, saved next to the weights."""
        raise NotImplementedError

    # --- engine hooks (defaults: nothing to do) ------------------------------------------------
    #: whether the drafter works in a continuous-batching engine (without begin()'s prompts)
    continuous: ClassVar[bool] = True

    def begin(self, runner, prompts: Sequence[Sequence[int]] | None = None, *, temperature: float = 0.0,
              top_p: float = 1.0, generator: torch.Generator | None = None) -> None:
        """``runner``: anything with the verifier's ``model`` and ``adapter``."""
        self._runner, self._temperature, self._top_p, self._gen = runner, temperature, top_p, generator

    def extend(self, trees: Sequence[TokenTree], anchors: Sequence[Sequence[int]]) -> None:
        pass

    def networks(self) -> list[nn.Module]:
        """The modules this drafter runs while drafting (the engine routes their few-row linears
        through the row kernel): itself, by default."""
        return [self]

    def forward_context(self, trees: Sequence[TokenTree]) -> contextlib.AbstractContextManager | None:
        return None

    def observe(self, keys: Sequence, trees: Sequence[TokenTree], logits: torch.Tensor, hidden: torch.Tensor,
                paths: Sequence[Sequence[int]], lasts: Sequence[int], *, prefill: bool = False) -> None:
        """After a forward: ``paths[b]`` the accepted nodes of row ``b``, ``lasts[b]`` the node whose
        prediction is the next root (``prefill``: the forward was the prompts')."""

    def release(self, keys: Sequence) -> None:
        """Forget the state of finished sequences."""

    def propose(self, keys: Sequence, roots: Sequence[int], hidden: torch.Tensor) -> list[TokenTree]:
        """One tree per sequence, rooted at ``roots[b]``; ``hidden[b]`` is the last hidden state
        at the node that predicted it."""
        raise NotImplementedError

    # --- compression -------------------------------------------------------------------------
    #: ``(bits, group_size)`` once :meth:`quantize` ran, else None
    quantized: tuple[int, int] | None = None

    def compute_dtype(self) -> torch.dtype:
        """The dtype the drafter computes in: its first floating parameter's (float32 once
        quantized: the quantized kernels take float32 inputs)."""
        if self.quantized is not None:
            return torch.float32
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def quantize(self, bits: int = 8, group_size: int = 64) -> Drafter:
        """Store this drafter's linears — and the cut of the LM head it drafts from, when it drafts
        from a vocabulary subset (:meth:`DraftVocabMixin.set_draft_vocab`) — as weight-only RTN codes
        (:class:`~llmdeploy.quant.rtn.RTNLinear`: ``bits`` bits, asymmetric groups of
        ``group_size`` inputs) computed by the library's quantized CPU kernels, so that drafting,
        which reads the drafter's weights at every drafting pass, reads a quarter (int8) or an
        eighth (int4) of the bytes. The model still verifies every candidate: greedy output stays
        plain greedy decoding's and rejection sampling stays exact (it uses the quantized drafter's
        own distribution); only the proposals, and so acceptance, can change. For inference after
        training: a quantized drafter is neither saved (save it first, quantize after
        :func:`load_drafter`) nor trained. Returns ``self``."""
        # the only user of quant here: not imported before it is asked for
        from ..quant.rtn import RTNLinear

        if self.quantized is not None:
            raise ConfigError(f"this drafter is already quantized ({self.quantized[0]} bits); quantize a freshly "
                              "loaded one for other settings")
        if bits not in (2, 3, 4, 8) or group_size < 1:
            raise ConfigError(f"quantize() takes bits in (2, 3, 4, 8) and group_size >= 1, got {bits} and {group_size}")
        targets = [(parent, name, child) for parent in self.modules() for name, child in parent.named_children()
                   if type(child) is nn.Linear]
        if not targets:
            raise ConfigError(f"{type(self).__name__} has no nn.Linear layers to quantize")
        for _parent, _name, child in targets:
            if child.in_features % group_size:
                raise ConfigError(f"quantize(): a linear of this drafter takes {child.in_features} inputs, not a "
                                  f"multiple of group_size={group_size}; pick a group size that divides it")
        for parent, name, child in targets:
            setattr(parent, name, RTNLinear.from_linear(child, bits, group_size, symmetric=False).eval())
        self.quantized = (bits, group_size)
        if hasattr(self, "_sub_head"):
            self._sub_head = None  # cut (and quantized) again on first use
        return self

    # --- save / load --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``drafter.json`` (kind and config) and ``drafter.safetensors`` into ``path``
        (e.g. the model's own checkpoint folder), each atomically."""
        if self.quantized is not None:
            raise ConfigError("this drafter was quantized (quantize()); save it before quantizing and quantize "
                              "again after load_drafter()")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path / ".drafter.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / "drafter.safetensors")
        tmp = path / ".drafter.json.tmp"
        tmp.write_text(json.dumps({"kind": self.kind, "config": self.config()}, indent=1))
        os.replace(tmp, path / "drafter.json")


def load_drafter(path: str | os.PathLike) -> Drafter:
    """The drafter saved in ``path`` by :meth:`Drafter.save` (weights via safetensors)."""
    path = Path(path)
    meta = path / "drafter.json"
    if not meta.exists():
        raise CheckpointError(f"{path} holds no drafter (no drafter.json): save one with drafter.save(path)")
    info = json.loads(meta.read_text())
    cls = DRAFTERS.get(info.get("kind", ""))
    if cls is None:
        raise CheckpointError(f"{meta} names an unknown drafter kind {info.get('kind')!r}; known: {sorted(DRAFTERS)}")
    drafter = cls(**info["config"])
    drafter.load_state_dict(load_file(str(path / "drafter.safetensors")))
    return drafter


def frequent_tokens(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``tokens`` (most frequent first, ties by id; ids never
    seen fill the rest in id order): a drafting vocabulary for :meth:`DraftVocabMixin.set_draft_vocab`."""
    if not 1 <= size <= vocab_size:
        raise ConfigError(f"a drafting vocabulary needs 1 <= size <= {vocab_size} tokens, got {size}")
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size)[:vocab_size]
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))
    return torch.tensor(order[:size], dtype=torch.long)


class DraftVocabMixin:
    """Drafting over a frequent-token subset of the vocabulary (FR-Spec, Zhao et al., 2025).

    A drafter that scores tokens with the model's LM head reads the whole head (vocabulary x width)
    at every drafting pass — on SmolLM2 a 49,152 x 576 matrix, as many bytes as a fifth of the
    model. With ``set_draft_vocab(ids)`` drafting scores only the rows ``ids`` (their sub-matrix is
    cut on first use and kept while the model's head stays the same object with the same weight), so drafts come from that subset; verification still
    uses the full head, so greedy output is unchanged and rejection sampling stays exact (the
    drafter's distribution is zero outside the subset). Training uses the full vocabulary unless
    ``train_drafter(..., draft_vocab=True)`` trains over the subset.
    """

    draft_vocab: torch.Tensor | None

    def _init_draft_vocab(self, size: int = 0) -> None:
        self.register_buffer("draft_vocab", torch.zeros(size, dtype=torch.long) if size else None)
        self._sub_head = None

    def begin(self, runner, prompts=None, **kw) -> None:
        super().begin(runner, prompts, **kw)
        head = runner.adapter.head()
        self._vocab_size = getattr(head, "out_features", None) or head.weight.shape[0]
        weight = head._parameters.get("weight")  # None for a compressed head (its .weight decodes)
        key = (id(head), None if weight is None else (weight.data_ptr(), weight._version))
        if key != getattr(self, "_sub_key", None):  # another head, or its weight changed: cut again on first use
            self._sub_head, self._sub_key = None, key

    def set_draft_vocab(self, ids: torch.Tensor | Sequence[int] | None) -> None:
        """Draft from these token ids only (None: the whole vocabulary)."""
        if ids is None:
            self.draft_vocab = None
        else:
            ids = torch.as_tensor(ids, dtype=torch.long).flatten()
            if ids.numel() == 0 or ids.unique().numel() != ids.numel() or int(ids.min()) < 0:
                raise ConfigError("a drafting vocabulary is a non-empty list of distinct token ids")
            self.draft_vocab = ids.to(next(iter(self.parameters())).device)
        self._sub_head = None

    def _draft_vocab_size(self) -> int:
        return 0 if self.draft_vocab is None else int(self.draft_vocab.numel())

    def _cut_head(self, head: nn.Module) -> None:
        """The LM head's rows of the drafting vocabulary (a compressed head gives its decoded weight)."""
        if self.draft_vocab is None:
            self._sub_head = None
            return
        w = head.weight
        if int(self.draft_vocab.max()) >= w.shape[0]:
            raise ConfigError(f"the drafting vocabulary names token {int(self.draft_vocab.max())}, beyond the "
                              f"model's {w.shape[0]}")
        bias = getattr(head, "bias", None)
        ids = self.draft_vocab.to(w.device)
        w, b = w.detach()[ids].contiguous(), None if bias is None else bias.detach()[ids]
        if self.quantized is not None:  # the cut stored as codes too (Drafter.quantize)
            from ..quant.rtn import RTNLinear

            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b, requires_grad=False)
            self._sub_head = RTNLinear.from_linear(lin, *self.quantized, symmetric=False).eval()
            return
        self._sub_head = (w, b)

    def draft_logits(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Float logits of ``x`` (..., d) over the drafting vocabulary (..., |subset| or V)."""
        if self.draft_vocab is None:
            return head(x).float()
        if self._sub_head is None:
            self._cut_head(head)
        if isinstance(self._sub_head, nn.Module):
            return self._sub_head(x.float()).float()
        w, b = self._sub_head
        return rows.linear(x.to(w.dtype), w, b).float()  # the row kernel when generate() routes linears

    def vocab_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into :meth:`draft_logits`' last dimension."""
        return idx if self.draft_vocab is None else self.draft_vocab.to(idx.device)[idx]

    def subset_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids as indices into :meth:`draft_logits`' last dimension; -100 (cross-entropy's
        ignore index) for ids outside the drafting vocabulary."""
        if self.draft_vocab is None:
            return ids
        vocab = self.draft_vocab.to(ids.device)
        lookup = torch.full((max(int(vocab.max()), int(ids.max())) + 1,), -100, dtype=torch.long, device=ids.device)
        lookup[vocab] = torch.arange(len(vocab), device=ids.device)
        return lookup[ids]

    def full_distribution(self, q: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """A distribution over the drafting vocabulary as one over all ``vocab_size`` tokens."""
        if self.draft_vocab is None:
            return q
        out = q.new_zeros(*q.shape[:-1], vocab_size)
        return out.index_copy_(-1, self.draft_vocab.to(q.device), q)


class RankedTreeMixin:
    """For drafters that predict a distribution per future position (Medusa, hidden transfer):
    the tree takes the top-ranked tokens of each position along ``choices``; an int ``tree`` picks
    the best tree of that many nodes for the measured per-rank accuracy ``self.accuracy``."""

    accuracy: torch.Tensor

    def _init_tree(self, n_future: int, tree: int | Sequence[Sequence[int]], topk: int) -> None:
        if isinstance(tree, int):
            if tree < 1:
                raise ConfigError(f"tree size must be >= 1, got {tree}")
        else:
            tree = [list(c) for c in static_tree(tree)]
        self.tree, self.topk = tree, topk
        # a prior until measured: rank r of position k right with probability 0.6^(k+1) / (r+1)
        k = torch.arange(n_future, dtype=torch.float32)[:, None]
        r = torch.arange(topk, dtype=torch.float32)[None, :]
        self.register_buffer("accuracy", 0.6 ** (k + 1) / (r + 1))

    def choices(self) -> list[tuple[int, ...]]:
        """The tree's rank tuples (recomputed only when the tree or the accuracy changes)."""
        key = (str(self.tree), tuple(self.accuracy.flatten().tolist()))
        cached = self.__dict__.get("_choices")
        if cached is None or cached[0] != key:
            tree = best_tree(self.accuracy, self.tree) if isinstance(self.tree, int) else [tuple(c) for c in self.tree]
            self.__dict__["_choices"] = cached = (key, tree)
        return cached[1]

    def set_tree(self, tree: int | Sequence[Sequence[int]]) -> None:
        """Use another tree (a node count, or explicit choices) from now on."""
        if isinstance(tree, int):
            if tree < 1:
                raise ConfigError(f"tree size must be >= 1, got {tree}")
            self.tree = tree
        else:
            self.tree = [list(c) for c in static_tree(tree)]
