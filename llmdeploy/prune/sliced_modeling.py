"""SliceGPT-sliced causal LMs for transformers, loadable with ``trust_remote_code=True``.

This file depends on torch and transformers only: ``llmdeploy.save`` copies it next to a sliced
checkpoint as ``modeling_slicegpt.py`` and names its classes in ``config.json``'s ``auto_map``,
so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` rebuilds the model
without llmdeploy. llmdeploy uses the same classes in memory.

A sliced model is its family's transformers model with three changes, all described by the
config's ``slicegpt`` entry:

- every norm is :class:`RMSN`, ``x / sqrt(sum(x²) / d + eps)`` with the *original* width ``d``
  (the norms' scales and biases were folded into the linears that read them);
- the residual stream of block ``i`` is narrower (``layers[i] = [attention input, MLP input,
  block output]`` widths), so linears, embeddings and the head have sliced shapes;
- each block carries two shortcut matrices, ``attn_shortcut_Q`` (Q_inᵀ Q_mid) and
  ``mlp_shortcut_Q`` (Q_midᵀ Q_out), that carry the residual from one rotation to the next:
  ``h = x @ attn_shortcut_Q + attn(norm(x))``, ``y = h @ mlp_shortcut_Q + mlp(norm(h))``.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

#: the transformers causal-LM classes a sliced model can be built on
BASES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "OPTForCausalLM")

if int(transformers.__version__.split(".")[0]) < 5:  # decoder layers returned tuples before 5.0
    raise ImportError(
        f"sliced models need transformers>=5.0 (installed: {transformers.__version__}); "
        "upgrade with: pip install -U 'transformers>=5'"
    )


class RMSN(nn.Module):
    """``x / sqrt(sum(x²) / mean_dim + eps)`` over the last (possibly sliced) dimension.

    ``mean_dim`` stays the width of the unsliced model, so slicing away low-variance directions
    leaves the normalisation of the kept ones (nearly) unchanged. No scale: it was folded into
    the following linears. fp16/bf16 inputs are normalised in fp32.
    """

    def __init__(self, dim: int, mean_dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.mean_dim, self.eps = dim, mean_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var = y.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (y * torch.rsqrt(var + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, mean_dim={self.mean_dim}, eps={self.eps}"


class SlicedLayerMixin:
    """Forward of a sliced decoder layer; mixed in front of the family's own layer class."""

    slicegpt_layout: dict[str, Any]
    attn_shortcut_Q: nn.Parameter | None
    mlp_shortcut_Q: nn.Parameter | None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("sliced decoder layers take everything after hidden_states by keyword")
        lay = self.slicegpt_layout
        h = self.get_submodule(lay["attn_norm"])(hidden_states)
        h = self.get_submodule(lay["attn"])(hidden_states=h, **kwargs)[0]
        hidden_states = _shortcut(hidden_states, self.attn_shortcut_Q) + h
        h = self.get_submodule(lay["mlp_norm"])(hidden_states)
        for path in lay["mlp"]:
            h = self.get_submodule(path)(h)
        return _shortcut(hidden_states, self.mlp_shortcut_Q) + h


def _shortcut(x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    return x if q is None else x @ q.to(x.dtype)


_LAYER_CLASSES: dict[type, type] = {}


def sliced_layer_class(base: type) -> type:
    """The sliced variant of a decoder-layer class (created once per class)."""
    if issubclass(base, SlicedLayerMixin):
        return base
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"Sliced{base.__name__}", (SlicedLayerMixin, base), {"__module__": __name__})
    return _LAYER_CLASSES[base]


def convert_layer(layer: nn.Module, layout: dict[str, Any]) -> None:
    """Turn a decoder layer into its sliced class, shortcuts unset (identity)."""
    layer.__class__ = sliced_layer_class(type(layer))
    layer.slicegpt_layout = layout
    if "attn_shortcut_Q" not in layer._parameters:
        layer.register_parameter("attn_shortcut_Q", None)
        layer.register_parameter("mlp_shortcut_Q", None)


def _empty_param(like: torch.Tensor, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


def _resize_linear(lin: nn.Linear, in_features: int | None = None, out_features: int | None = None,
                   bias: bool | None = None) -> None:
    out_f = lin.out_features if out_features is None else out_features
    in_f = lin.in_features if in_features is None else in_features
    if (out_f, in_f) != tuple(lin.weight.shape):
        lin.weight = _empty_param(lin.weight, out_f, in_f)
    lin.in_features, lin.out_features = in_f, out_f
    want_bias = lin.bias is not None if bias is None else bias
    if want_bias and (lin.bias is None or lin.bias.shape[0] != out_f):
        lin.bias = _empty_param(lin.weight, out_f)
    elif not want_bias:
        lin.bias = None


def build_sliced_block(block: nn.Module, lay: dict[str, Any], d: int, eps: float, dims) -> None:
    """Give one full-width decoder layer the shapes of its sliced version (weights to be loaded)."""
    d_in, d_mid, d_out = dims
    for path in lay["attn_in"]:
        _resize_linear(block.get_submodule(path), in_features=d_in)
    _resize_linear(block.get_submodule(lay["attn_out"]), out_features=d_mid)
    for path in lay["mlp_in"]:
        _resize_linear(block.get_submodule(path), in_features=d_mid)
    _resize_linear(block.get_submodule(lay["mlp_out"]), out_features=d_out)
    block.set_submodule(lay["attn_norm"], RMSN(d_in, d, eps))
    block.set_submodule(lay["mlp_norm"], RMSN(d_mid, d, eps))
    convert_layer(block, lay)
    like = block.get_submodule(lay["attn_out"]).weight
    block.attn_shortcut_Q = _empty_param(like, d_in, d_mid)
    block.mlp_shortcut_Q = _empty_param(like, d_mid, d_out)


def build_sliced_structure(model: nn.Module, spec: dict[str, Any]) -> None:
    """Give a freshly built full-width model the shapes of the sliced one (weights to be loaded)."""
    lay = spec["layout"]
    d, eps = spec["hidden_size"], spec["eps"]
    for path in lay["embeddings"]:
        emb = model.get_submodule(path)
        emb.weight = _empty_param(emb.weight, emb.weight.shape[0], spec["embedding_dim"])
        emb.embedding_dim = spec["embedding_dim"]
    blocks = model.get_submodule(lay["blocks"])
    if len(blocks) != len(spec["layers"]):
        raise ValueError(f"slicegpt config describes {len(spec['layers'])} layers, the model has {len(blocks)}")
    for block, dims in zip(blocks, spec["layers"]):
        build_sliced_block(block, lay, d, eps, dims)
    d_head = spec["layers"][-1][2] if spec["layers"] else spec["embedding_dim"]
    model.set_submodule(lay["final_norm"], RMSN(d_head, d, eps))
    head = model.get_submodule(lay["head"])
    if head.weight is model.get_submodule(lay["embeddings"][0]).weight:
        head.weight = _empty_param(head.weight, *head.weight.shape)  # untie
    _resize_linear(head, in_features=d_head, bias=spec["head_bias"])


class SlicedCausalLMMixin:
    """Builds the sliced shapes from ``config.slicegpt`` after the family's own ``__init__``."""

    #: (module, file name): ``llmdeploy.save`` copies this module next to the weights
    remote_code = ("llmdeploy.prune.sliced_modeling", "modeling_slicegpt.py")

    def __init__(self, config, *args, **kwargs) -> None:
        spec = getattr(config, "slicegpt", None)
        if not isinstance(spec, dict):
            raise ValueError("this config has no 'slicegpt' entry: it is not a SliceGPT-sliced checkpoint")
        config.tie_word_embeddings = False
        super().__init__(config, *args, **kwargs)
        build_sliced_structure(self, spec)


_MODEL_CLASSES: dict[str, type] = {}


def sliced_model_class(base: type | str) -> type:
    """The sliced variant of a transformers causal-LM class (e.g. ``LlamaForCausalLM``)."""
    name = base if isinstance(base, str) else base.__name__
    if name.startswith("Sliced"):
        name = name.removeprefix("Sliced")
    if name not in BASES:
        raise ValueError(f"no sliced variant of {name}; supported: {', '.join(BASES)}")
    if name not in _MODEL_CLASSES:
        cls = getattr(transformers, name)
        _MODEL_CLASSES[name] = type(f"Sliced{name}", (SlicedCausalLMMixin, cls), {"__module__": __name__})
    return _MODEL_CLASSES[name]


def __getattr__(name: str) -> type:  # transformers looks classes up by name in this module
    if name.startswith("Sliced") and name.removeprefix("Sliced") in BASES:
        return sliced_model_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
