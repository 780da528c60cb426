"""Shared computations on activations: attention statistics and residual-stream geometry.

Pure functions of tensors, unit-tested on inputs with known answers; experiments combine them.
Attention patterns follow TransformerLens's layout ``[layer, head, query_pos, key_pos]``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer


def stack_patterns(
    cache: ActivationCache, n_layers: int, batch_index: int = 0
) -> Float[Tensor, "layer head query_pos key_pos"]:
    """Every layer's attention pattern for one prompt of the batch."""
    return torch.stack(
        [cache[f"blocks.{layer}.attn.hook_pattern"][batch_index] for layer in range(n_layers)]
    )


def attention_to_first_token(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer query_pos"]:
    """How much each query position attends to position 0, averaged over heads."""
    return patterns[..., 0].mean(dim=1)


def last_token_attention(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer key_pos"]:
    """How much the last query position attends to each key position, averaged over heads."""
    return patterns[:, :, -1, :].mean(dim=1)


def attention_sink_by_head(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer head"]:
    """Mean attention to the first token (the attention sink) over queries 1.., per head.

    Query 0 can attend only to itself under causal masking, so counting it would add a floor of
    1/n to every head's score; it is left out. A one-token pattern has no other query: NaN.
    """
    if patterns.shape[-2] < 2:
        return torch.full(patterns.shape[:2], float("nan"), dtype=patterns.dtype)
    return patterns[..., 1:, 0].mean(dim=-1)


def attention_entropy_by_head(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer head"]:
    """Mean entropy (nats) of each head's attention distribution over the query positions.

    Query 0 can only attend to itself (entropy 0) under causal masking; it is kept, like every
    other query, so that entropies are comparable across prompts of the same length.
    """
    entropy = -(patterns * torch.log(patterns.clamp_min(1e-12))).sum(dim=-1)
    return entropy.mean(dim=-1)


# Blocks count from 0. State 0 is the embeddings (the input to block 0), state i the residual stream
# after block i-1, so a model with n blocks has states 0..n. Every experiment labels states so.
STATE_CONVENTION = "blocks count from 0; state 0 = embeddings; state i = after block i-1"
STATE_AXIS_LABEL = "State (0 = embeddings, i = after block i-1)"


def state_labels(n_layers: int, final_norm: bool = False) -> list[str]:
    """Names of the ``n_layers + 1`` residual-stream states, following ``STATE_CONVENTION``.

    Args:
        n_layers: Number of blocks.
        final_norm: Whether the last state has the final norm applied (Hugging Face's
            ``hidden_states`` do; TransformerLens's ``hook_resid_post`` does not).
    """
    last = f"after block {n_layers - 1}" + (" + final norm" if final_norm else "")
    return ["embeddings", *[f"after block {block}" for block in range(n_layers - 1)], last]


def hidden_states(
    model: HookedTransformer, cache: ActivationCache
) -> Float[Tensor, "state batch pos d_model"]:
    """The residual stream in Hugging Face's ``output_hidden_states`` convention.

    Index 0 is the embedding sum, index i the residual stream after block i-1 (blocks count from
    0, see ``STATE_CONVENTION``), and the last index has the final LayerNorm applied, as
    transformers returns it. Needs the cache to hold
    ``blocks.0.hook_resid_pre`` and every ``blocks.{i}.hook_resid_post``, and unprocessed weights
    for the final LayerNorm to match the checkpoint's.
    """
    n_layers = model.cfg.n_layers
    states = [cache["blocks.0.hook_resid_pre"]]
    states += [cache[f"blocks.{layer}.hook_resid_post"] for layer in range(n_layers - 1)]
    states.append(model.ln_final(cache[f"blocks.{n_layers - 1}.hook_resid_post"]))
    return torch.stack(states)


def hidden_state_hook_names(n_layers: int) -> list[str]:
    """The hooks ``hidden_states`` reads."""
    return [
        "blocks.0.hook_resid_pre",
        *[f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)],
    ]


def cosine_to_targets(
    states: Float[Tensor, "state pos d_model"], targets: Float[Tensor, "pos d_model"]
) -> Float[Tensor, "state pos"]:
    """Cosine similarity of each position's state, at every layer, to that position's target."""
    return torch.nn.functional.cosine_similarity(states, targets.unsqueeze(0), dim=-1)


def spread_across_layers(
    states: Float[Tensor, "state batch pos d_model"], mask: Bool[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "state batch"], Float[Tensor, "state batch"]]:
    """Per layer and sentence: the token states' mean distance from their centroid, and spread.

    The spread is the trace of their covariance. Padding positions (``mask`` False) are left out.
    """
    weights = mask.to(states.dtype)[None, :, :, None]
    counts = mask.sum(dim=1).to(states.dtype)[None, :]
    centroid = (states * weights).sum(dim=2) / counts[..., None]
    offsets = (states - centroid[:, :, None, :]) * weights
    distance = offsets.norm(dim=-1).sum(dim=2) / counts
    # Unbiased covariance, as numpy.cov computes it; its trace is the summed per-dimension variance.
    trace = (offsets**2).sum(dim=(2, 3)) / (counts - 1).clamp_min(1)
    return distance, trace
