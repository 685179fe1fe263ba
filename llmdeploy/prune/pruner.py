"""Base of the weight-pruning compressors (magnitude, Wanda, SparseGPT, SparseLLM).

Every decoder-block linear is pruned to the same pattern (embeddings and the head stay dense,
as in the papers). Calibrated methods walk the blocks through the shared engine. As in the
papers' code, a block's linears are calibrated together on the block's input (one pass); with
``sequential=True`` they are pruned group by group in computation order instead (q/k/v, then o,
then the MLP inputs, then its output), each group calibrated on the outputs of the
already-pruned groups before it (GPTQ's "true sequential": a little more accurate, 2.5x the
block passes). With ``compact=True`` the pruned linears are finally stored as
:class:`SparseLinear` (bitmask or N:M layout); ``compact=False`` leaves dense ``nn.Linear``
layers holding zeros, e.g. to quantize them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..compress.base import Compressor, Report, engine_field
from ..compress.engine import BlockContext, LinearStats, run_blockwise, walk_blocks
from ..compress.modules import CompressedModule
from ..errors import ConfigError
from ..models.adapters import get_adapter
from .masks import SparsityPattern, check_divisible, parse_pattern
from .sparse_linear import SparseLinear


@dataclass
class PruningReport(Report):
    """The fraction of zero weights of every pruned linear, as realised."""

    sparsity: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.sparsity:
            return ""
        values = list(self.sparsity.values())
        return f"{len(values)} linears pruned to {min(values):.3f}–{max(values):.3f} sparsity"


@dataclass(kw_only=True)
class WeightPruner(Compressor):
    """Shared fields: target ``sparsity``, ``pattern`` ("unstructured", "2:4", "4:8", ...),
    ``compact`` storage, ``sequential`` calibration, and the engine's ``device``/``batch_size``."""

    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    compact: bool = True
    sequential: bool = False
    device: str | None = engine_field(None)
    batch_size: int = engine_field(8)
    streamable: ClassVar[bool] = True
    supports_distributed: ClassVar[bool] = True

    def pattern_(self) -> SparsityPattern:
        return parse_pattern(self.pattern, self.sparsity)

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the linears to prune (dense decoder-block linears)."""
        adapter = get_adapter(model)
        names = []
        for name in adapter.linear_names():
            mod = model.get_submodule(name)
            if isinstance(mod, CompressedModule):
                raise ConfigError(
                    f"{name} is already compressed ({type(mod).__name__}); prune before quantizing "
                    "(with compact=False the pruned layers stay dense and can be quantized next)"
                )
            names.append(name)
        return names

    def validate(self, model: nn.Module) -> None:
        pattern = self.pattern_()
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in self.targets(model):
            check_divisible(name, model.get_submodule(name).in_features, pattern)

    # -- the work ------------------------------------------------------------------
    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        pattern = self.pattern_()
        wanted = set(self.targets(model))
        if not isinstance(self.report_, PruningReport):  # a subclass may have started its own
            self.report_ = PruningReport()
        report = self.report_

        def finish(name: str, block: nn.Module) -> None:
            """Measure what was realised, then store the pruned linears compactly (what the block
            computes does not change; a streamed block is written right after)."""
            for path, lin in get_adapter(model).block_linears(block).items():
                if f"{name}.{path}" in wanted:
                    report.sparsity[f"{name}.{path}"] = 1.0 - int((lin.weight != 0).sum()) / lin.weight.numel()
                    if self.compact:
                        block.set_submodule(path, SparseLinear.from_linear(lin, pattern.n, pattern.m))

        if self.needs_calibration:
            run_blockwise(model, calib, lambda ctx: self.prune_block(ctx, pattern),
                          finish=lambda ctx: finish(ctx.name, ctx.block), device=self.device,
                          batch_size=self.batch_size, desc=type(self).__name__, key=self.to_dict(), report=report)
        else:
            def prune(_i: int, name: str, block: nn.Module) -> None:
                for path, lin in get_adapter(model).block_linears(block).items():
                    if f"{name}.{path}" in wanted:
                        with torch.no_grad():
                            lin.weight.copy_(self.prune_weight(lin.weight, pattern, None))
                finish(name, block)

            walk_blocks(model, prune, desc=type(self).__name__)
        return model

    def prune_block(self, ctx: BlockContext, pattern: SparsityPattern) -> None:
        """Prune one block's linears on calibration stats."""
        self.prune_groups(ctx, pattern, ctx.adapter.linear_groups(ctx.block))

    def prune_groups(self, ctx: BlockContext, pattern: SparsityPattern, groups: list[list[str]]) -> None:
        """Prune the linears of ``groups`` (paths, in computation order) with :meth:`prune_weight`:
        group by group when ``sequential``, else all on one pass of stats."""
        if not self.sequential:
            groups = [[n for g in groups for n in g]]
        linears = ctx.linears()
        for group in groups:
            stats = ctx.collect_stats(group)
            for path in group:
                lin = linears[path]
                with torch.no_grad():
                    lin.weight.copy_(self.prune_weight(lin.weight, pattern, stats[path]))

    def prune_weight(self, weight: torch.Tensor, pattern: SparsityPattern,
                     stats: LinearStats | None) -> torch.Tensor:
        """The pruned version of one weight matrix (out, in)."""
        raise NotImplementedError


def compact(model: nn.Module, pattern: SparsityPattern, names: list[str]) -> None:
    """Replace the named (pruned) linears by :class:`SparseLinear` in the smaller format."""
    for name in names:
        lin = model.get_submodule(name)
        model.set_submodule(name, SparseLinear.from_linear(lin, pattern.n, pattern.m))


def realised_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every decoder-block linear (dense or ``SparseLinear``)."""
    out = {}
    for name in get_adapter(model).linear_names():
        w = model.get_submodule(name).weight
        out[name] = 1.0 - int((w != 0).sum()) / w.numel()
    return out
