"""RTN for the token embedding and the LM head, so that a low-bit model is low-bit end to end.

Every quantization method here (as GPTQ/AWQ/AQLM's protocols) compresses only the decoder
linears, which is the honest default: on ``smollm2-135m`` the tied 49152x576 embedding is a fifth
of the parameters and, left in fp32, holds a 2-bit model at ~8.6 bits per parameter, and its
matmul as the head is a third of a decode step on this machine's CPU. ``EmbeddingRTN(bits=8)``
stores that matrix the way :class:`~llmdeploy.quant.RTNLinear` stores a weight (codes packed
along the hidden dimension, one fp16 scale and zero point per group of ``group_size`` values of a
row):

- the embedding (:class:`RTNEmbedding`) looks up a token's codes and dequantizes that row only —
  exactly the dequantized matrix's row;
- a head tied to it (:class:`RTNTiedHead`) reads the same codes through the quantized-matmul
  kernel (:mod:`llmdeploy.kernels.quant`): the tie survives, the matrix is stored once;
- an untied head becomes an :class:`~llmdeploy.quant.RTNLinear` of its own.

Not part of any paper's method: an option, applied as its own recipe step, and reported as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import Compressor, Report, register_method
from ..compress.modules import CompressedModule, register_module
from ..errors import ConfigError
from ..kernels import forced_reference
from ..kernels import quant as quant_kernel
from ..kernels.opaque import opaque_forward
from .packing import pack, unpack
from .rtn import SUPPORTED_BITS, GroupCodes, RTNLinear, quantize_groupwise

log = logging.getLogger(__name__)


@register_module
class RTNEmbedding(GroupCodes, CompressedModule):
    """A token embedding stored as RTN codes (rows: vocabulary, groups along the hidden size)."""

    fixed_dtype_buffers = ("qweight", "scales", "zeros")

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 symmetric: bool = False, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS or group_size <= 0 or embedding_dim % group_size or embedding_dim % 8:
            raise ConfigError(f"RTNEmbedding: {bits}-bit codes in groups of {group_size} do not fit an embedding "
                              f"of width {embedding_dim} (bits in {SUPPORTED_BITS}; the group size must divide "
                              "the width, a multiple of 8)")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        # GroupCodes' names for the matrix (out, in) = (vocabulary, hidden)
        self.out_features, self.in_features = num_embeddings, embedding_dim
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = embedding_dim // group_size
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(num_embeddings, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", None if symmetric else torch.zeros(num_embeddings, n_groups, dtype=torch.uint8))
        # the dtype of the outputs (the model's): an empty floating buffer follows model.to(dtype)
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype), persistent=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int, symmetric: bool) -> RTNEmbedding:
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, symmetric, emb.padding_idx,
                  dtype=emb.weight.dtype)
        q, scale, zero = quantize_groupwise(emb.weight, bits, group_size, symmetric)
        mod.qweight, mod.scales = pack(q, bits), scale
        if not symmetric:
            mod.zeros = zero
        return mod.to(emb.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix (vocabulary, hidden), for code that reads ``.weight``."""
        return self.dequantize(self.dtype_ref.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the dequantized matrix, dequantizing only those rows."""
        n_g = self.embedding_dim // self.group_size
        codes = unpack(self.qweight[ids], self.bits, self.embedding_dim).float()
        zeros = self.zeros[ids].float() if self.zeros is not None else torch.full(
            (*ids.shape, n_g), float(2 ** (self.bits - 1)), device=codes.device)
        g = codes.reshape(*ids.shape, n_g, self.group_size)
        rows = (g - zeros[..., None]) * self.scales[ids].float()[..., None]
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype_ref.dtype)

    def init_kwargs(self) -> dict[str, Any]:
        return dict(num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim, bits=self.bits,
                    group_size=self.group_size, symmetric=self.symmetric, padding_idx=self.padding_idx)

    def nominal_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


@register_module
class RTNTiedHead(CompressedModule):
    """An LM head tied to an :class:`RTNEmbedding`: ``x · Ŵᵀ`` with the embedding's codes, which
    it reads (it stores nothing; the checkpoint holds the matrix once, under the embedding)."""

    def __init__(self, in_features: int, out_features: int, tied_to: str,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tied_to = in_features, out_features, tied_to
        self._source: tuple[RTNEmbedding, ...] = ()  # a tuple: not a submodule, not in the state dict

    def bind(self, model: nn.Module) -> None:
        emb = model.get_submodule(self.tied_to)
        if not isinstance(emb, RTNEmbedding) or (emb.num_embeddings, emb.embedding_dim) != (
                self.out_features, self.in_features):
            raise ConfigError(f"RTNTiedHead: {self.tied_to} is not the {self.out_features}x{self.in_features} "
                              f"RTNEmbedding this head is tied to (found {type(emb).__name__})")
        self._source = (emb,)

    @property
    def embedding(self) -> RTNEmbedding:
        if not self._source:
            raise ConfigError("RTNTiedHead: not bound to its embedding yet (call bind(model))")
        return self._source[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @opaque_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        if x.is_cpu and x.dtype is torch.float32 and emb._kernel_ok() and not forced_reference() and \
                not (torch.is_grad_enabled() and x.requires_grad):
            w = emb.kernel_weights()
            if w is not None:
                return quant_kernel.wonly_matmul(x, w)
        return F.linear(x, emb.dequantize(x.dtype))

    def init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, tied_to=self.tied_to)

    def nominal_params(self) -> int:
        return 0  # the tied matrix is counted once, by the embedding

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied_to={self.tied_to}"


@dataclass
class EmbeddingQuantReport(Report):
    """What :class:`EmbeddingRTN` replaced, and whether the head was tied to the embedding."""

    embedding: str = ""
    head: str | None = None
    tied: bool = False

    def summary(self) -> str:
        what = "embedding and tied head" if self.tied else ("embedding and head" if self.head else "embedding")
        return f"{what} quantized"


@register_method("embedding_rtn")
@dataclass(kw_only=True)
class EmbeddingRTN(Compressor):
    """RTN of the token embedding and the LM head (an extension; see the module docstring).

    ``head=True`` quantizes the head too: tied to the embedding it reads the embedding's codes
    (:class:`RTNTiedHead`), untied it becomes an :class:`~llmdeploy.quant.RTNLinear`. A tied head
    cannot stay dense on its own (``head=False`` on a tied model is refused: it would untie and
    store the matrix twice).
    """

    bits: int = 8
    group_size: int = 64
    symmetric: bool = False
    head: bool = True

    def _targets(self, model: nn.Module) -> tuple[str, nn.Embedding, str | None, nn.Module | None, bool]:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"embedding_rtn: bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
        emb = get_in() if get_in else None
        head = get_out() if get_out else None
        names = {id(m): n for n, m in model.named_modules()}
        if isinstance(emb, RTNEmbedding):
            raise ConfigError("embedding_rtn: the embedding is already quantized; apply this step once")
        if type(emb) is not nn.Embedding:
            raise ConfigError(f"embedding_rtn: the input embedding is a {type(emb).__name__}, not a plain "
                              "nn.Embedding (an earlier step replaced it); apply embedding_rtn before that step")
        d = emb.embedding_dim
        if d % self.group_size or d % 8:
            raise ConfigError(f"embedding_rtn: group_size={self.group_size} must divide the hidden size {d} "
                              "(a multiple of 8); choose a divisor such as 64 or 32")
        tied = isinstance(head, nn.Linear) and head.weight is emb.weight
        if tied and not self.head:
            raise ConfigError("embedding_rtn: the head is tied to the embedding, so it cannot stay dense alone; "
                              "use head=True (one quantized matrix for both)")
        if self.head and not isinstance(head, (nn.Linear, RTNLinear)):
            raise ConfigError(f"embedding_rtn: the output head is a {type(head).__name__}, not an nn.Linear; "
                              "use head=False to quantize only the embedding")
        if self.head and isinstance(head, RTNLinear):
            raise ConfigError("embedding_rtn: the head is already quantized; use head=False")
        head_name = names.get(id(head)) if self.head else None
        return names[id(emb)], emb, head_name, head if self.head else None, tied

    def validate(self, model: nn.Module) -> None:
        self._targets(model)

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        emb_name, emb, head_name, head, tied = self._targets(model)
        new_emb = RTNEmbedding.from_embedding(emb, self.bits, self.group_size, self.symmetric)
        model.set_submodule(emb_name, new_emb)
        if head is not None:
            if tied:
                new_head: nn.Module = RTNTiedHead(head.in_features, head.out_features, emb_name)
                new_head.bind(model)
            else:
                new_head = RTNLinear.from_linear(head, self.bits, self.group_size, self.symmetric)
            model.set_submodule(head_name, new_head)
        self.report_ = EmbeddingQuantReport(embedding=emb_name, head=head_name, tied=tied)
        log.info("embedding_rtn: %s", self.report_.summary())
        return model
