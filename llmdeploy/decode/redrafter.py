"""Recurrent Drafter (Cheng et al., Apple, 2024): a small RNN over the model's own embeddings.

From the last hidden state ``h`` (at the position that predicted the root) and a recurrent state
``s_t = SiLU(U s_{t-1} + W e(y_{t-1}))`` (``s_0 = 0``, ``y_0`` the root, ``e`` the model's input
embedding table, shared), the drafter's distribution for the next token is the model's LM head
applied to ``P · R2(R1([h ⊕ s_t]))`` — two residual SiLU blocks over the concatenation, then a
projection back to the model's width. **Deviation**: the reference ends in its own vocabulary
projection; here the model's LM head is shared through ``P`` (on SmolLM2-135M an own head would
be 57M parameters, 42% of the model). Candidates come from beam search (``beam_width`` beams of
``beam_length`` tokens), deduplicated into a prefix tree before one verification forward.

At ``temperature > 0`` the beams are instead ``beam_width`` chains *sampled* from the drafter's
distribution (the same temperature and nucleus as the model), merged into a prefix tree that
keeps each token's draw count and the drafter's distribution at every node, so the engine's
rejection sampling is exact (the reference's beam-search sampling is not, as its README warns).
Trained by distillation on the model's own greedy continuations, against the model's full
distribution at each position (soft KD, default) or its tokens, the model frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Drafter, DraftVocabMixin, distill_loss, register_drafter
from .engine import target_probs
from .medusa import ResBlock
from .tree import TokenTree


@register_drafter
class ReDrafter(DraftVocabMixin, Drafter):
    """Recurrent drafter for a model of width ``hidden_size`` with embeddings of ``embed_dim``;
    ``draft_vocab``: the size of a drafting vocabulary set by :meth:`set_draft_vocab` (0: all)."""

    kind = "redrafter"
    acceptance = "rejection"

    def __init__(self, hidden_size: int, embed_dim: int | None = None, *, beam_width: int = 4,
                 beam_length: int = 4, n_blocks: int = 2, draft_vocab: int = 0) -> None:
        super().__init__()
        self._init_draft_vocab(draft_vocab)
        embed_dim = embed_dim or hidden_size
        self.hidden_size, self.embed_dim, self.n_blocks = hidden_size, embed_dim, n_blocks
        self.beam_width, self.beam_length = beam_width, beam_length
        self.U = nn.Linear(embed_dim, embed_dim, bias=False)
        self.W = nn.Linear(embed_dim, embed_dim)
        self.blocks = nn.Sequential(*[ResBlock(hidden_size + embed_dim, zero=False) for _ in range(n_blocks)])
        self.proj = nn.Linear(hidden_size + embed_dim, hidden_size)
        with torch.no_grad():  # start as "the model's next-token guess": P [h ⊕ s] = h
            self.proj.weight.zero_()
            self.proj.weight[:, :hidden_size] = torch.eye(hidden_size)
            self.proj.bias.zero_()
            for blk in self.blocks:
                blk.linear.weight.mul_(0.1)

    @classmethod
    def for_model(cls, model: nn.Module, **kw) -> ReDrafter:
        return cls(model.get_output_embeddings().in_features, model.get_input_embeddings().embedding_dim, **kw)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "embed_dim": self.embed_dim, "beam_width": self.beam_width,
                "beam_length": self.beam_length, "n_blocks": self.n_blocks, "draft_vocab": self._draft_vocab_size()}

    def step(self, s: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return F.silu(self.U(s) + self.W(emb))

    def logits(self, lm_head: nn.Module, h: torch.Tensor, s: torch.Tensor, draft: bool = False) -> torch.Tensor:
        """Next-token logits over the vocabulary (``draft``: over the drafting vocabulary)."""
        x = self.proj(self.blocks(torch.cat([h, s], dim=-1)))
        return self.draft_logits(lm_head, x) if draft else lm_head(x).float()

    @torch.no_grad()
    def propose(self, keys: Sequence, roots: Sequence[int], hidden: torch.Tensor) -> list[TokenTree]:
        lm_head = self._runner.adapter.head()
        embed = self._runner.model.get_input_embeddings()
        h = hidden.to(self.compute_dtype())
        if self._temperature > 0:
            return [self._sampled(lm_head, embed, h[b], root) for b, root in enumerate(roots)]
        return self._beams(lm_head, embed, h, roots)

    def _beams(self, lm_head, embed, h: torch.Tensor, roots: Sequence[int]) -> list[TokenTree]:
        """Beam search for every row at once: each of the ``beam_length`` steps runs the drafter
        and the LM head once over all rows' beams (not once per row)."""
        B, W, dev = len(roots), self.beam_width, h.device
        s = self.step(torch.zeros(B, self.embed_dim, device=dev, dtype=h.dtype),
                      embed(torch.tensor(list(roots), device=dev)).to(h.dtype))  # (B * n, e), n beams per row
        seqs = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)
        score = torch.zeros(B, 1, device=dev)
        rows = torch.arange(B, device=dev)[:, None]
        for step in range(self.beam_length):
            n = score.shape[1]
            logp = torch.log_softmax(self.logits(lm_head, h.repeat_interleave(n, 0), s, draft=True), dim=-1)
            total = (score[..., None] + logp.view(B, n, -1)).flatten(1)  # (B, n * V)
            score, flat = total.topk(min(W, total.shape[1]), dim=1)
            parent, tok = flat // logp.shape[1], self.vocab_ids(flat % logp.shape[1])
            seqs = torch.cat([seqs[rows, parent], tok[..., None]], dim=2)
            if step + 1 < self.beam_length:  # the last tokens need no recurrent state
                s = self.step(s.view(B, n, -1)[rows, parent].flatten(0, 1), embed(tok.flatten()).to(h.dtype))
        return [TokenTree.from_paths(root, seqs[b].tolist()) for b, root in enumerate(roots)]

    def _sampled(self, lm_head, embed, h: torch.Tensor, root: int) -> TokenTree:
        W, dev = self.beam_width, h.device
        s = self.step(torch.zeros(W, self.embed_dim, device=dev, dtype=h.dtype),
                      embed(torch.full((W,), root, device=dev)).to(h.dtype))
        seqs: list[list[int]] = [[] for _ in range(W)]
        dists: dict[tuple[int, ...], torch.Tensor] = {}
        for _ in range(self.beam_length):
            q = target_probs(self.logits(lm_head, h.expand(W, -1), s, draft=True), self._temperature, self._top_p).cpu()
            tok = self.vocab_ids(torch.multinomial(q, 1, generator=self._gen)[:, 0])
            q = self.full_distribution(q, self._vocab_size)
            for i in range(W):
                dists.setdefault(tuple(seqs[i]), q[i])
                seqs[i].append(int(tok[i]))
            if len(seqs[0]) < self.beam_length:
                s = self.step(s, embed(tok.to(dev)).to(h.dtype))
        tree = TokenTree.from_paths(root, seqs)
        # the distribution each node's children were drawn from, by the node's path
        prefix: dict[int, tuple[int, ...]] = {0: ()}
        for i in range(1, len(tree)):
            prefix[i] = prefix[tree.parents[i]] + (tree.tokens[i],)
        tree.q = {i: dists[p] for i, p in prefix.items() if p in dists}
        return tree

    def training_loss(self, lm_head: nn.Module, embed: nn.Module, hidden: torch.Tensor,
                      tokens: torch.Tensor, soft: torch.Tensor | None = None, draft: bool = False) -> torch.Tensor:
        """``hidden`` (N, d) at anchors; ``tokens`` (N, 1 + n): the anchor's next token then the
        ``n`` tokens to predict, teacher-forced through the recurrence; mean cross-entropy against
        those tokens, or against the model's probabilities ``soft`` (N, n, V) there. ``draft``:
        logits over the drafting vocabulary (``soft`` over it too; a token outside it is no target)."""
        logits = self.future_logits(lm_head, embed, hidden, tokens[:, :-1], draft=draft)
        if soft is not None:
            return distill_loss(logits, soft)
        return distill_loss(logits, self.subset_index(tokens[:, 1:]) if draft else tokens[:, 1:])

    def future_logits(self, lm_head: nn.Module, embed: nn.Module, hidden: torch.Tensor,
                      inputs: torch.Tensor, draft: bool = False) -> torch.Tensor:
        """(N, n, V): the drafter's prediction after each teacher-forced prefix of ``inputs``
        (``draft``: over the drafting vocabulary)."""
        h = hidden.to(self.compute_dtype())
        s = torch.zeros(len(h), self.embed_dim, device=h.device, dtype=h.dtype)
        out = []
        for t in range(inputs.shape[1]):
            s = self.step(s, embed(inputs[:, t]).to(h.dtype))
            out.append(self.logits(lm_head, h, s, draft=draft))
        return torch.stack(out, dim=1)
