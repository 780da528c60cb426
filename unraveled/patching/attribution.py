"""Attribution patching (Nanda 2023): every patch estimated at once from one gradient.

The estimate of patching an activation from a source into the base run is the difference source
minus base of the activation times the gradient of the metric at the base run: one forward of
each prompt set and one backward pass, whatever the number of components.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.logits import residual_hook_names
from unraveled.patching.metrics import Metric, last_token_logits, logit_difference
from unraveled.patching.pairs import Cache, PromptPairs, Which
from unraveled.patching.patches import embedding_hooks

GRADIENT_TOKENS = 16
"""Tokens per forward-and-backward pass. Autograd keeps every intermediate activation of the pass
(with split head inputs, each head's own copy of the residual stream), so a gradient pass holds
many times what a plain forward pass does; rows are independent, so passes over fewer rows give
the same gradients."""


def attribution(
    model: HookedTransformer,
    pairs: PromptPairs,
    hooks: Sequence[str],
    source: Cache,
    base: Which = "corrupted",
    metric: Metric = logit_difference,
    tokens_per_pass: int = GRADIENT_TOKENS,
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor]]:
    """Attribution patching: (source - base activation) x gradient of the metric at the base run.

    Summed over any set of elements, this is the first-order estimate of patching those elements
    from the source into the base run: with ``base="corrupted"`` and a clean source, of restoring
    them (as activation patching does); with ``base="clean"`` and a corrupted source, of corrupting
    them. It is exact when the metric is linear in the activation, and fails where it is not
    (an attention pattern that saturates, a norm whose scale changes).

    Args:
        model: The model.
        pairs: The prompt pairs.
        hooks: The activations to estimate patches of.
        source: Activations to patch in, for every hook of ``hooks`` (batch first).
        base: Which prompts run.
        metric: The score of each prompt from its last token's logits (``patching.metrics``).
        tokens_per_pass: Tokens per forward-and-backward pass (at least one prompt): bounds
            memory; the estimates don't depend on it.

    Returns:
        The base run's metric per prompt, and per hook the elementwise estimate (same shape as
        the activation, batch first).
    """
    base_scores = torch.empty(pairs.size)
    estimates: dict[str, Tensor] = {}
    for rows in gradient_passes(pairs, tokens_per_pass):
        part = pairs.rows(rows)
        base_scores[rows], activations, grads = forward_and_gradients(
            model, part.tokens(base), part, hooks, metric
        )
        for name in hooks:
            estimate = (source[name][rows] - activations[name]) * grads[name]
            estimates.setdefault(name, torch.empty(pairs.size, *estimate.shape[1:]))[rows] = (
                estimate
            )
    return base_scores, estimates


def forward_and_gradients(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    pairs: PromptPairs,
    hooks: Sequence[str],
    metric: Metric = logit_difference,
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor], dict[str, Tensor]]:
    """One forward and one backward pass: the metric, and each hook's activation and gradient.

    The loaded models' weights don't require gradients, so the embeddings are made to: every
    later activation then carries a gradient, and no weight gradient is ever computed.
    """
    kept: dict[str, Tensor] = {}

    def track(activation: Tensor, hook: HookPoint) -> Tensor:
        if not activation.requires_grad:
            activation = activation.detach().requires_grad_(True)
        return activation

    def keep(activation: Tensor, hook: HookPoint) -> Tensor:
        kept[hook.name] = activation
        return activation

    tracked = [(name, track) for name in embedding_hooks(model)]
    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[*tracked, *[(name, keep) for name in hooks]]
        )
        scores = metric(last_token_logits(logits, pairs), pairs)
        grads = torch.autograd.grad(scores.sum(), [kept[name] for name in hooks])
    return (
        scores.detach(),
        {name: kept[name].detach() for name in hooks},
        dict(zip(hooks, grads, strict=True)),
    )


def gradient_passes(pairs: PromptPairs, tokens_per_pass: int = GRADIENT_TOKENS) -> list[slice]:
    """The rows of each gradient pass: at most ``tokens_per_pass`` tokens, at least one row."""
    rows = max(1, tokens_per_pass // pairs.clean.shape[1])
    return [slice(start, start + rows) for start in range(0, pairs.size, rows)]


def estimates_per_component(
    model: HookedTransformer,
    estimates: dict[str, Tensor],
    groups: Sequence[Bool[Tensor, "batch pos"]],
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, " layer"], Float[Tensor, "point group"]]:
    """Attribution estimates summed per component, averaged over prompts.

    Per head, per MLP and per residual point and group of positions: the same components as
    ``head_patches``, ``mlp_patches`` and ``residual_patches``.
    """
    n_layers = model.cfg.n_layers
    heads = torch.stack(
        [
            estimates[f"blocks.{layer}.attn.hook_z"].sum(dim=(1, 3)).mean(0)
            for layer in range(n_layers)
        ]
    )
    mlps = torch.stack(
        [
            estimates[f"blocks.{layer}.hook_mlp_out"].sum(dim=(1, 2)).mean(0)
            for layer in range(n_layers)
        ]
    )
    residual = torch.stack(
        [
            torch.stack([(estimates[hook].sum(-1) * group).sum(-1).mean(0) for group in groups])
            for hook in residual_hook_names(n_layers)
        ]
    )
    return heads, mlps, residual
