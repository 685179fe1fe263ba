"""Delta checkpoints and multi-tenant serving of many BitDelta fine-tunes over one base.

- :func:`save_delta` writes only what a fine-tune adds to its base: the packed signs and the scale
  of every :class:`~llmdeploy.delta.bitdelta.BitDeltaLinear` (safetensors, written atomically) and
  the base's SHA-256; :func:`load_delta` rebuilds the model over a base and refuses any other base.
- :class:`MultiTenant` holds one base and the signs/scales of N fine-tunes. A batch whose rows
  belong to different fine-tunes runs in one forward: every linear computes the base matmul once
  for the whole batch and adds, per row, that row's binary delta (one kernel call with a tenant
  index per row, :func:`llmdeploy.kernels.binary.multi_binary_linear`). Long prefills (more than
  256 token rows) on CPU run instead one dense matmul per tenant with its merged weight, the
  cheaper of the two there. Token-embedding deltas (``BitDelta(embeddings=True)``) are looked up
  per row the same way, and a tied head shares one stacked copy of the embedding's signs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels.binary import multi_binary_linear, unpack_signs
from .bitdelta import (
    BitDeltaEmbedding,
    BitDeltaLinear,
    model_hash,
    own_tensors,
    replace_parameters,
    shallow_clone,
)

FORMAT = "llmdeploy-bitdelta-1"


def delta_modules(model: nn.Module) -> dict[str, BitDeltaLinear | BitDeltaEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (BitDeltaLinear, BitDeltaEmbedding))}


def _tied(mods: dict[str, nn.Module]) -> dict[str, str]:
    """Delta modules that share another's signs and scale (a tied head): name -> the owner's name."""
    owner: dict[tuple[int, int], str] = {}
    tied = {}
    embeddings_first = sorted(mods.items(), key=lambda kv: not isinstance(kv[1], BitDeltaEmbedding))
    for name, m in embeddings_first:
        key = (id(m.signs), id(m.scale))
        if key in owner:
            tied[name] = owner[key]
        else:
            owner[key] = name
    return tied


def save_delta(model: nn.Module, path: str | os.PathLike, base: nn.Module) -> Path:
    """Write the delta of a BitDelta ``model`` over ``base`` to ``path`` (a ``.safetensors`` file)."""
    mods = delta_modules(model)
    if not mods:
        raise ConfigError("save_delta: the model has no BitDelta linears (apply llmdeploy.delta.BitDelta first)")
    for name, m in mods.items():
        if m.base is not base.get_submodule(name):
            raise ConfigError(f"save_delta: {name} was not compressed against this base")
    tied = _tied(mods)
    tensors = {}
    for name, m in mods.items():
        if name in tied:
            continue
        tensors[f"{name}.signs"] = m.signs.detach().cpu().contiguous()
        tensors[f"{name}.scale"] = m.scale.detach().float().cpu().reshape(-1)
    others = own_tensors(model, base)  # others="finetune": the fine-tune's tensors outside the linears
    for name, p in others.items():
        tensors[f"other.{name}"] = p.detach().to(torch.float16).cpu().contiguous()
    linears = {n: m for n, m in mods.items() if isinstance(m, BitDeltaLinear)}
    meta = {"format": FORMAT, "base_sha256": model_hash(base),
            "in_features": json.dumps({n: m.in_features for n, m in linears.items()}),
            "per_row": json.dumps(sorted(n for n, m in linears.items() if m.per_row)),
            "embeddings": json.dumps(sorted(n for n, m in mods.items() if isinstance(m, BitDeltaEmbedding))),
            "tied": json.dumps(tied), "others": json.dumps(sorted(others))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def load_delta(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The BitDelta model stored at ``path``, built over ``base`` (shared, not copied); raises
    :class:`CheckpointError` when ``base`` is not the model the delta was made against."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no delta file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an llmdeploy BitDelta file (format {meta.get('format')!r})")
        if meta["base_sha256"] != model_hash(base):
            raise CheckpointError(f"{path} was made against another base model (sha256 {meta['base_sha256'][:12]}…); "
                                  "load it over the base the fine-tune started from")
        model = shallow_clone(base)
        tied, per_row = json.loads(meta.get("tied", "{}")), set(json.loads(meta.get("per_row", "[]")))
        built: dict[str, nn.Module] = {}
        for name in json.loads(meta.get("embeddings", "[]")):
            emb = base.get_submodule(name)
            built[name] = BitDeltaEmbedding(emb, f.get_tensor(f"{name}.signs").to(emb.weight.device),
                                            f.get_tensor(f"{name}.scale").to(emb.weight.device))
        for name in json.loads(meta["in_features"]):
            lin = base.get_submodule(name)
            if name in tied:
                owner = built[tied[name]]
                built[name] = BitDeltaLinear(lin, owner.signs, owner.scale)
                continue
            scale = f.get_tensor(f"{name}.scale")
            built[name] = BitDeltaLinear(lin, f.get_tensor(f"{name}.signs"),
                                         scale if name in per_row else float(scale[0])).to(lin.weight.device)
        for name, mod in built.items():
            model.set_submodule(name, mod)
        base_params = dict(base.named_parameters(remove_duplicate=False))
        replace_parameters(model, {
            id(base_params[name]): nn.Parameter(f.get_tensor(f"other.{name}").to(base_params[name].dtype).to(
                base_params[name].device), requires_grad=False)
            for name in json.loads(meta.get("others", "[]"))})
    return model


class _Rows:
    """The tenant of each row of the batch being run (shared by every linear)."""

    tenant: torch.Tensor | None = None


class MultiTenantLinear(nn.Module):
    """``base(x)`` for every row plus ``scale[t] · x · signs[t]ᵀ`` for a row of tenant ``t``."""

    def __init__(self, base: nn.Linear, signs: torch.Tensor, scales: torch.Tensor, rows: _Rows):
        super().__init__()
        self._base = (base,)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("signs", signs)  # (T, out, in/8)
        self.register_buffer("scales", scales)  # (T,)
        self._rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tenant = self._rows.tenant
        if tenant is None:
            raise ConfigError("MultiTenant: run the model through MultiTenant.forward/generate (tenants per row)")
        B = x.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        per_row = tenant.repeat_interleave(flat.shape[0] // B)
        y = multi_binary_linear(flat, self._base[0], self.signs, self.scales, per_row)
        return y.reshape(*x.shape[:-1], self.out_features)


class MultiTenantEmbedding(nn.Module):
    """``base(ids)`` plus, for a row of tenant ``t``, ``scales[t, id] · signs[t, id]``."""

    def __init__(self, base: nn.Embedding, signs: torch.Tensor, scales: torch.Tensor, rows: _Rows):
        super().__init__()
        self._base = (base,)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.register_buffer("signs", signs)  # (T, vocab, dim/8)
        self.register_buffer("scales", scales)  # (T, vocab)
        self._rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tenant = self._rows.tenant
        if tenant is None:
            raise ConfigError("MultiTenant: run the model through MultiTenant.forward/generate (tenants per row)")
        y = self._base[0](ids)
        t = tenant.to(ids.device).reshape(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        d = unpack_signs(self.signs[t, ids], self.embedding_dim, y.dtype)
        return y + self.scales[t, ids].to(y.dtype)[..., None] * d


class MultiTenant(nn.Module):
    """One base model serving several BitDelta fine-tunes, mixed within a batch."""

    def __init__(self, base: nn.Module, tenants: dict[str, nn.Module], base_name: str | None = None):
        """``base_name``: also serve the base itself under that name (a tenant whose delta is zero)."""
        super().__init__()
        if not tenants:
            raise ConfigError("MultiTenant needs at least one tenant")
        if base_name is not None and base_name in tenants:
            raise ConfigError(f"the base's name {base_name!r} is also a tenant's")
        self.names = list(tenants) + ([base_name] if base_name is not None else [])
        per = {name: delta_modules(m) for name, m in tenants.items()}
        layers = set(next(iter(per.values())))
        for name, mods in per.items():
            if set(mods) != layers or not layers:
                raise ConfigError(f"tenant {name!r} does not hold BitDelta linears on the same layers as the others")
            for path, m in mods.items():
                if m.base is not base.get_submodule(path):
                    raise ConfigError(f"tenant {name!r} was not compressed against this base ({path})")
            own = own_tensors(tenants[name], base)
            if own:
                raise ConfigError(f"tenant {name!r} carries its own {sorted(own)[:3]}… (BitDelta others='finetune'); "
                                  "tenants share every tensor outside the linears: compress with others='base' "
                                  "or serve this fine-tune on its own")
        self._rows = _Rows()
        self.model = shallow_clone(base)
        stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # a tied head reuses its embedding's
        for path in sorted(layers):
            mods = [per[n][path] for n in tenants]
            kinds = {type(m) for m in mods}
            if len(kinds) > 1 or len({tuple(m.signs.shape) for m in mods}) > 1:
                raise ConfigError(f"tenants hold different kinds or shapes of delta at {path}")
            key = tuple(id(m.signs) for m in mods)
            if key not in stacked:
                scales = [m.scale.detach().float() for m in mods]
                if any(s.dim() for s in scales):  # one scale per row for some tenant: per row for all
                    rows_n = next(s.numel() for s in scales if s.dim())
                    scales = [s.expand(rows_n) for s in scales]
                signs = [m.signs for m in mods]
                if base_name is not None:  # the base: any signs, zero scale
                    signs.append(torch.zeros_like(signs[0]))
                    scales.append(torch.zeros_like(scales[0]))
                stacked[key] = torch.stack(signs), torch.stack(scales)
            signs, scales = stacked[key]
            cls = MultiTenantEmbedding if kinds == {BitDeltaEmbedding} else MultiTenantLinear
            self.model.set_submodule(path, cls(base.get_submodule(path), signs, scales, self._rows))

    def tenant_ids(self, tenants: Sequence[str]) -> torch.Tensor:
        unknown = [t for t in tenants if t not in self.names]
        if unknown:
            raise ConfigError(f"unknown tenant(s) {unknown}; this server holds {self.names}")
        return torch.tensor([self.names.index(t) for t in tenants], dtype=torch.long)

    @contextlib.contextmanager
    def rows(self, tenant_ids: Sequence[int]):
        """Run ``self.model`` inside this context with row ``i`` belonging to tenant
        ``self.names[tenant_ids[i]]`` (what a batching engine uses)."""
        self._rows.tenant = torch.as_tensor(list(tenant_ids), dtype=torch.long)
        try:
            yield self.model
        finally:
            self._rows.tenant = None

    def forward(self, input_ids: torch.Tensor, tenants: Sequence[str], **kwargs):
        if len(tenants) != input_ids.shape[0]:
            raise ConfigError(f"{len(tenants)} tenants for {input_ids.shape[0]} rows")
        self._rows.tenant = self.tenant_ids(tenants)
        try:
            return self.model(input_ids=input_ids, **kwargs)
        finally:
            self._rows.tenant = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, tenants: Sequence[str], **kwargs) -> torch.Tensor:
        """``model.generate`` with row ``i`` decoded by fine-tune ``tenants[i]``."""
        if len(tenants) != input_ids.shape[0]:
            raise ConfigError(f"{len(tenants)} tenants for {input_ids.shape[0]} rows")
        self._rows.tenant = self.tenant_ids(tenants)
        try:
            return self.model.generate(input_ids=input_ids, **kwargs)
        finally:
            self._rows.tenant = None

    def delta_bytes(self) -> int:
        """Bytes of every tenant's signs and scales (what N tenants add to the base; shared ones once)."""
        seen = {b.data_ptr(): b.numel() * b.element_size() for m in self.model.modules()
                if isinstance(m, (MultiTenantLinear, MultiTenantEmbedding)) for b in (m.signs, m.scales)}
        return sum(seen.values())
