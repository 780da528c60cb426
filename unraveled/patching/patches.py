"""What a patch is: which activation, which head and which positions, in TransformerLens hooks.

Also the hook names the patching functions read (every component's output, the embeddings) and
the patch sets of whole components: one head, one MLP, one residual-stream point.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from jaxtyping import Bool
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.components import EMBEDDINGS, HeadComponent, MLPComponent, parse_component
from unraveled.logits import residual_hook_names


@dataclass(frozen=True)
class Patch:
    """Replace one activation by the source's.

    Attributes:
        hook: Full hook name, e.g. ``blocks.3.attn.hook_z`` or ``blocks.3.hook_resid_pre``.
        head: For per-head hooks (``hook_z``, ``hook_q_input``...), which head; else every one.
        positions: Which positions of each prompt; ``None`` for all of them.
    """

    hook: str
    head: int | None = None
    positions: Bool[Tensor, "batch pos"] | None = None


def hook_layer(hook: str) -> int | None:
    """The block a hook belongs to; ``None`` for hooks before the first block (embeddings)."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    return int(found.group(1)) if found else None


def embedding_hooks(model: HookedTransformer) -> list[str]:
    """The hooks whose sum is the residual stream before the first block.

    The token embeddings, and the position embeddings where the model adds them.
    """
    return [
        "hook_embed",
        *(["hook_pos_embed"] if model.cfg.positional_embedding_type == "standard" else []),
    ]


def patchable_hooks(model: HookedTransformer) -> list[str]:
    """Every head's output (``hook_z``), every MLP's output, the residual stream at each layer."""
    n_layers = model.cfg.n_layers
    return [
        *[f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)],
        *[f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
        *residual_hook_names(n_layers),
    ]


def component_patches(name: str, model: HookedTransformer) -> list[Patch]:
    """What replacing one component's whole output means, in hooks: ``embed``, ``L.H`` or ``mL``.

    Raises:
        ValueError: ``name`` is not the name of a component that writes to the residual stream.
    """
    component = parse_component(name)
    if component == EMBEDDINGS:
        return [Patch(hook) for hook in embedding_hooks(model)]
    if isinstance(component, MLPComponent):
        return [Patch(f"blocks.{component.layer}.hook_mlp_out")]
    if isinstance(component, HeadComponent) and component.input is None:
        return [Patch(f"blocks.{component.layer}.attn.hook_z", head=component.head)]
    raise ValueError(f"{name!r} writes nothing to the residual stream: it has no output to patch")


def head_patches(model: HookedTransformer) -> list[list[Patch]]:
    """One patch set per head (its output at every position), layer by layer."""
    return [
        [Patch(f"blocks.{layer}.attn.hook_z", head=head)]
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
    ]


def mlp_patches(model: HookedTransformer) -> list[list[Patch]]:
    """One patch set per MLP (its output at every position)."""
    return [[Patch(f"blocks.{layer}.hook_mlp_out")] for layer in range(model.cfg.n_layers)]


def residual_patches(
    model: HookedTransformer, groups: Sequence[Bool[Tensor, "batch pos"]]
) -> list[list[Patch]]:
    """One patch set per residual-stream point and group of positions, point-major.

    The points are ``residual_hook_names``.
    """
    return [
        [Patch(hook, positions=group)]
        for hook in residual_hook_names(model.cfg.n_layers)
        for group in groups
    ]


@contextmanager
def split_head_inputs(model: HookedTransformer) -> Iterator[None]:
    """Give every head its own query, key and value input hooks and every MLP an input hook.

    Grouped-query attention is ungrouped, so each query head has its own key and value input.
    The model's settings are restored afterwards (the runner shares one model between configs).
    """
    cfg = model.cfg
    saved = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    if cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention = saved
