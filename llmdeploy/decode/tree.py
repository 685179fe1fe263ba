"""Token trees: the candidates one verification forward checks, and their attention layout.

A tree's node 0 is the *root*, the token already decided (the model's choice at the previous
step) whose key/value is not yet cached; every other node is a candidate continuation of its
parent. Nodes are stored parents-first (``parents[i] < i``), so a node's ancestors come before it.
One forward over the nodes, where node ``i`` sees the cached context and exactly its ancestors and
itself, gives at every node the model's next-token distribution after that node's path — the same
numbers a plain decoding of that path would give (Medusa's and SpecInfer's *tree attention*).

Drafters may also hang *pseudo* nodes under a node (hidden transfer's placeholders for future
positions): they follow the same rules, are never candidates, and no real node sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass
class TokenTree:
    """Nodes of one row's verification forward (see the module docstring).

    ``count[i]`` is how many drafted paths reached node ``i`` (kept by prefix deduplication so
    that rejection sampling can try a token as often as it was drawn); ``q[i]`` is the drafter's
    distribution over node ``i``'s children (set by drafters that sample, for exact rejection
    sampling); ``draws[i]`` lists node ``i``'s children in the order they were drawn, a child
    repeated once per draw (rejection sampling must try drafts in draw order: trying equal tokens
    together would reorder the draws by their values and bias the result); ``pseudo[i]`` marks
    placeholder nodes that are not candidates.
    """

    tokens: list[int]
    parents: list[int]
    count: list[int] = field(default_factory=list)
    pseudo: list[bool] = field(default_factory=list)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    draws: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0 or len(self.parents) != n:
            raise ConfigError("a token tree needs a root and one parent per node")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ConfigError("tree nodes must come parents-first: parents[0] == -1 and 0 <= parents[i] < i")
        if not self.count:
            self.count = [1] * n
        if not self.pseudo:
            self.pseudo = [False] * n

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_candidates(self) -> int:
        """Real (non-root, non-pseudo) nodes: what the tree asks the model to verify."""
        return sum(1 for i in range(1, len(self)) if not self.pseudo[i])

    def depths(self) -> list[int]:
        d = [0] * len(self)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return d

    def children(self, i: int) -> list[int]:
        return [j for j in range(i + 1, len(self)) if self.parents[j] == i and not self.pseudo[j]]

    def ancestor_mask(self) -> torch.Tensor:
        """(N, N) bool: ``[i, j]`` is True when node ``j`` is ``i`` or one of its ancestors."""
        n = len(self)
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            m[i, i] = True
            if i:
                m[i] |= m[self.parents[i]]
        return m

    def path(self, i: int) -> list[int]:
        """Node indices from the root to ``i``."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def add(self, token: int, parent: int, *, pseudo: bool = False) -> int:
        """Append a node (its parent must exist); returns its index."""
        if not 0 <= parent < len(self):
            raise ConfigError(f"parent {parent} is not a node of this tree")
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.count.append(1)
        self.pseudo.append(pseudo)
        return len(self) - 1

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> TokenTree:
        """A path: the root followed by ``tokens[1:]``."""
        return cls(list(map(int, tokens)), [-1] + list(range(len(tokens) - 1)))

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[Sequence[int]]) -> TokenTree:
        """The prefix tree of candidate continuations of ``root``: equal prefixes merge into one
        node (ReDrafter's beam deduplication), ``count`` keeps how many paths passed each node and
        ``draws`` the order in which the paths reached each child."""
        tree = cls([int(root)], [-1])
        index: dict[tuple[int, ...], int] = {}
        for path in paths:
            node, key = 0, ()
            for tok in path:
                key = key + (int(tok),)
                parent = node
                if key in index:
                    node = index[key]
                    tree.count[node] += 1
                else:
                    node = index[key] = tree.add(int(tok), node)
                tree.draws.setdefault(parent, []).append(node)
        return tree


def static_tree(choices: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Validate and sort a Medusa-style tree: each choice ``(r_1, ..., r_d)`` is the path taking
    the ``r_k``-th most likely token of future position ``k``; every prefix of a choice must be a
    choice too. Returned sorted by depth then ranks (parents first)."""
    out = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
    have = set(out)
    for c in out:
        if not c or any(r < 0 for r in c):
            raise ConfigError(f"tree choice {c} must be a non-empty tuple of ranks >= 0")
        if len(c) > 1 and c[:-1] not in have:
            raise ConfigError(f"tree choice {c} has no parent {c[:-1]} in the tree")
    return out


def best_tree(accuracy: torch.Tensor, size: int) -> list[tuple[int, ...]]:
    """The ``size``-node tree of ranks with the largest expected number of accepted tokens, when
    ``accuracy[k, r]`` is the probability that the rank-``r`` candidate for future position ``k``
    is right (measured on held-out data), assuming positions independent (Medusa's construction).

    A path's value is the product of its ranks' accuracies; adding nodes greedily by value is
    optimal because a child's value never exceeds its parent's."""
    K, R = accuracy.shape
    acc = accuracy.double().clamp(0, 1)
    chosen: list[tuple[int, ...]] = []
    value: dict[tuple[int, ...], float] = {(): 1.0}
    frontier = {(r,): float(acc[0, r]) for r in range(R)}
    while len(chosen) < size and frontier:
        c = max(frontier, key=lambda k: (frontier[k], [-x for x in k]))
        v = frontier.pop(c)
        chosen.append(c)
        value[c] = v
        if len(c) < K:
            for r in range(R):
                frontier[c + (r,)] = v * float(acc[len(c), r])
    return static_tree(chosen)


def tree_from_choices(root: int, topk: torch.Tensor, choices: Sequence[tuple[int, ...]]) -> TokenTree:
    """A :class:`TokenTree` from ranked candidates ``topk`` (K positions, R ranks) and validated
    ``choices`` (see :func:`static_tree`); choices deeper or wider than ``topk`` are skipped."""
    K, R = topk.shape
    tree = TokenTree([int(root)], [-1])
    node_of: dict[tuple[int, ...], int] = {(): 0}
    for c in choices:
        if len(c) > K or max(c) >= R or c[:-1] not in node_of:
            continue
        node_of[c] = tree.add(int(topk[len(c) - 1, c[-1]]), node_of[c[:-1]])
    return tree


def tree_inputs(trees: Sequence[TokenTree], lengths: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs of one verification forward: ``input_ids`` and ``position_ids`` (B, T) and the
    additive 4-D attention mask (B, 1, T, max(lengths) + T) for trees appended after each row's
    ``lengths[b]`` cached tokens (rows right-padded to ``T = max len(tree)``; a padding query sees
    only the context and itself). Cache slot ``lengths[b] + i`` holds node ``i``."""
    B = len(trees)
    T = max(len(t) for t in trees)
    L = int(lengths.max()) + T
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    visible = torch.zeros(B, T, L, dtype=torch.bool)
    kpos = torch.arange(L)
    for b, tree in enumerate(trees):
        n, start = len(tree), int(lengths[b])
        ids[b, :n] = torch.tensor(tree.tokens)
        pos[b, :n] = start + torch.tensor(tree.depths())
        pos[b, n:] = start
        visible[b] = kpos[None, :] < start
        visible[b, :n, start : start + n] = tree.ancestor_mask()
        for i in range(n, T):
            visible[b, i, start + i] = True
    mask = torch.zeros(B, 1, T, L, dtype=dtype)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return ids, pos, mask
