"""Architecture adapters: the one place that knows where each model family keeps its parts.

Algorithms ask an adapter for the decoder blocks, the linears inside a block, the norms,
embeddings and head; they never test ``model_type`` themselves. A new family is supported
by adding one adapter class and registering it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class LinearSpec:
    """A linear inside a decoder block: its path relative to the block and its role."""

    path: str  # e.g. "self_attn.q_proj"
    role: str  # "attn_in", "attn_out", "mlp_in", "mlp_out"


#: the order in which the linear groups of a block compute (inputs of later groups depend on
#: the outputs of earlier ones): what "sequential" calibration walks through
ROLE_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class MLPParts:
    """A block's MLP, ``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))`` (plain)."""

    up: nn.Linear
    down: nn.Linear
    act: nn.Module
    gate: nn.Linear | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None


class ModelAdapter:
    """Where a causal LM of one family keeps its parts. Subclasses fill in the paths."""

    model_types: ClassVar[tuple[str, ...]] = ()
    blocks_path: ClassVar[str]
    embedding_paths: ClassVar[tuple[str, ...]]
    final_norm_path: ClassVar[str]
    head_path: ClassVar[str] = "lm_head"
    input_norm_path: ClassVar[str]
    post_attn_norm_path: ClassVar[str]
    linear_specs: ClassVar[tuple[LinearSpec, ...]]
    # the MLP: gate (None for a plain MLP), up (first linear), down (second), activation
    mlp_gate_path: ClassVar[str | None] = None
    mlp_up_path: ClassVar[str]
    mlp_down_path: ClassVar[str]
    mlp_act_path: ClassVar[str]
    # what rotating the residual stream (SliceGPT) needs to know
    attn_path: ClassVar[str] = "self_attn"
    #: the modules a block's MLP branch applies in order, from the normed input to the output
    mlp_call_paths: ClassVar[tuple[str, ...]]
    #: embeddings whose outputs add up to block 0's input (token and, where learned, position)
    residual_embedding_paths: ClassVar[tuple[str, ...]]
    #: the norms subtract the mean (LayerNorm) rather than only rescaling (RMSNorm)
    norm_subtracts_mean: ClassVar[bool] = False
    #: norms inside a block besides the two residual-branch norms (e.g. Qwen3's q/k norms)
    extra_norm_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- whole model ---------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return self.model.get_submodule(self.blocks_path)

    def blocks_prefix(self) -> str:
        return self.blocks_path

    def embeddings(self) -> list[nn.Module]:
        """Modules that run before the first block (token and, where present, position embeddings)."""
        return [self.model.get_submodule(p) for p in self.embedding_paths if _has(self.model, p)]

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    # -- one block -----------------------------------------------------------------
    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linears by path relative to the block (order: as computed)."""
        out: dict[str, nn.Linear] = {}
        for spec in self.linear_specs:
            if _has(block, spec.path):
                out[spec.path] = block.get_submodule(spec.path)
        return out

    def linear_names(self) -> list[str]:
        """Fully qualified names of every decoder-block linear of the model."""
        names = []
        for i, block in enumerate(self.blocks()):
            for path in self.block_linears(block):
                names.append(f"{self.blocks_path}.{i}.{path}")
        return names

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """The block's linears grouped by role, in computation order (see ``ROLE_ORDER``); a
        group's inputs depend only on earlier groups."""
        groups = []
        for role in ROLE_ORDER:
            group = [s.path for s in self.linear_specs if s.role == role and _has(block, s.path)]
            if group:
                groups.append(group)
        return groups

    def mlp_parts(self, block: nn.Module) -> MLPParts:
        """The block's MLP linears and activation."""
        gate = block.get_submodule(self.mlp_gate_path) if self.mlp_gate_path else None
        return MLPParts(
            up=block.get_submodule(self.mlp_up_path),
            down=block.get_submodule(self.mlp_down_path),
            act=block.get_submodule(self.mlp_act_path),
            gate=gate,
        )

    @property
    def pre_norm(self) -> bool:
        """True when blocks compute ``h + attn(norm(h))`` then ``+ mlp(norm(·))`` (the norms sit
        inside the residual branches), so a branch's output adds to the block output."""
        return True

    def input_norm(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.input_norm_path)

    def post_attn_norm(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.post_attn_norm_path)

    def block_norms(self, block: nn.Module) -> dict[str, nn.Module]:
        """Every norm of a block by path: the residual-branch norms and any others (q/k norms)."""
        paths = (self.input_norm_path, self.post_attn_norm_path, *self.extra_norm_paths)
        return {p: block.get_submodule(p) for p in paths if _has(block, p)}

    def linear_paths_by_role(self, role: str) -> tuple[str, ...]:
        """Paths (relative to a block) of the linears with ``role`` (see ``ROLE_ORDER``)."""
        if role not in ROLE_ORDER:
            raise ValueError(f"unknown linear role {role!r}; roles are {', '.join(ROLE_ORDER)}")
        return tuple(s.path for s in self.linear_specs if s.role == role)

    @staticmethod
    def norm_affine(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """A norm's scale, shift (None when absent) and epsilon."""
        eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            eps = norm.eps
        return getattr(norm, "weight", None), getattr(norm, "bias", None), float(eps)

    def check_rotatable(self) -> None:
        """Raise :class:`UnsupportedArchitectureError` unless the residual stream can be rotated
        (pre-norm blocks, embeddings that write straight into the residual stream)."""
        if not self.pre_norm:
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__} normalises after the residual additions (post-norm); "
                "rotating the residual stream needs pre-norm blocks"
            )

    def rotation_layout(self) -> dict:
        """Where a block's parts sit, for code that rebuilds sliced models without llmdeploy."""
        roles = {r: [s.path for s in self.linear_specs if s.role == r] for r in ROLE_ORDER}
        return {
            "blocks": self.blocks_path,
            "embeddings": list(self.residual_embedding_paths),
            "final_norm": self.final_norm_path,
            "head": self.head_path,
            "attn": self.attn_path,
            "attn_norm": self.input_norm_path,
            "mlp_norm": self.post_attn_norm_path,
            "mlp": list(self.mlp_call_paths),
            "attn_in": roles["attn_in"],
            "attn_out": roles["attn_out"][0],
            "mlp_in": roles["mlp_in"],
            "mlp_out": roles["mlp_out"][0],
        }

    @staticmethod
    def block_output(out: object):
        """The hidden states a block returns (tuple or bare tensor, depending on the version)."""
        return out[0] if isinstance(out, (tuple, list)) else out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class LlamaAdapter(ModelAdapter):
    """Llama-like pre-RMSNorm decoders: Llama, Mistral, Qwen2, SmolLM."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    blocks_path = "model.layers"
    embedding_paths = ("model.embed_tokens",)
    final_norm_path = "model.norm"
    input_norm_path = "input_layernorm"
    post_attn_norm_path = "post_attention_layernorm"
    linear_specs = (
        LinearSpec("self_attn.q_proj", "attn_in"),
        LinearSpec("self_attn.k_proj", "attn_in"),
        LinearSpec("self_attn.v_proj", "attn_in"),
        LinearSpec("self_attn.o_proj", "attn_out"),
        LinearSpec("mlp.gate_proj", "mlp_in"),
        LinearSpec("mlp.up_proj", "mlp_in"),
        LinearSpec("mlp.down_proj", "mlp_out"),
    )
    mlp_gate_path = "mlp.gate_proj"
    mlp_up_path = "mlp.up_proj"
    mlp_down_path = "mlp.down_proj"
    mlp_act_path = "mlp.act_fn"
    mlp_call_paths = ("mlp",)
    residual_embedding_paths = ("model.embed_tokens",)
    extra_norm_paths = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3


class OPTAdapter(ModelAdapter):
    """OPT: pre-LayerNorm decoder with learned positions and a fc1/fc2 MLP."""

    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    embedding_paths = (
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.project_in",
    )
    final_norm_path = "model.decoder.final_layer_norm"
    input_norm_path = "self_attn_layer_norm"
    post_attn_norm_path = "final_layer_norm"
    linear_specs = (
        LinearSpec("self_attn.q_proj", "attn_in"),
        LinearSpec("self_attn.k_proj", "attn_in"),
        LinearSpec("self_attn.v_proj", "attn_in"),
        LinearSpec("self_attn.out_proj", "attn_out"),
        LinearSpec("fc1", "mlp_in"),
        LinearSpec("fc2", "mlp_out"),
    )
    mlp_up_path = "fc1"
    mlp_down_path = "fc2"
    mlp_act_path = "activation_fn"
    mlp_call_paths = ("fc1", "activation_fn", "fc2")
    residual_embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    norm_subtracts_mean = True

    @property
    def pre_norm(self) -> bool:
        # OPT-350m normalises after the residual additions
        return bool(getattr(self.model.config, "do_layer_norm_before", True))

    def check_rotatable(self) -> None:
        super().check_rotatable()
        decoder = self.model.get_submodule("model.decoder")
        if getattr(decoder, "project_in", None) is not None or getattr(decoder, "project_out", None) is not None:
            raise UnsupportedArchitectureError(
                "this OPT projects its embeddings (word_embed_proj_dim != hidden_size); rotating the "
                "residual stream is supported only without project_in/project_out"
            )


ADAPTERS: list[type[ModelAdapter]] = [LlamaAdapter, OPTAdapter]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter for more model types (usable as a class decorator)."""
    ADAPTERS.insert(0, cls)
    return cls


def context_length(model: nn.Module) -> int | None:
    """How many positions the model can attend over (``max_position_embeddings``), or None."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or a clear error naming the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitectureError(
        f"llmdeploy has no adapter for model_type={model_type!r} "
        f"({type(model).__name__}). Supported model types: {', '.join(supported_model_types())}. "
        "Add one by subclassing llmdeploy.models.ModelAdapter and calling register_adapter."
    )
