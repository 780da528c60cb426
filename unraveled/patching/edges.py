"""Edge attribution patching (Syed, Rager and Conmy 2023): a score for every edge.

Every edge between components is scored from one forward and one backward pass. An edge runs
from a component that writes to the residual stream (the embeddings, a head, an MLP) to one that
reads it later (a head's query, key or value input, an MLP's input, the logits). Its score is the
change the upstream component's output would make (source minus base) dotted with the gradient
of the metric at the downstream input, summed over positions, at the base run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.components import EMBEDDINGS, LOGITS, HeadComponent, MLPComponent
from unraveled.patching.attribution import GRADIENT_TOKENS, forward_and_gradients, gradient_passes
from unraveled.patching.metrics import Metric, logit_difference
from unraveled.patching.pairs import Cache, PromptPairs, Which
from unraveled.patching.patches import embedding_hooks, split_head_inputs


@dataclass(frozen=True)
class EdgeScores:
    """Edge attribution scores: upstream components' outputs into downstream components' inputs.

    Attributes:
        upstream: ``embed``, heads ``L.H`` and MLPs ``mL``, in the order they write
            (``unraveled.components``).
        downstream: heads' inputs ``L.H.q``/``L.H.k``/``L.H.v``, MLP inputs ``mL`` and ``logits``.
        scores: Mean over prompts of the estimated change of the metric when the edge alone is
            patched from the source; NaN where the upstream component does not feed the
            downstream one.
        nodes: Per upstream component, the estimate of patching its whole output (the same
            as the sum of its edges' scores, but computed from its own gradient).
        base_difference: The base run's mean metric.
    """

    upstream: list[str]
    downstream: list[str]
    scores: Float[Tensor, "upstream downstream"]
    nodes: Float[Tensor, " upstream"]
    base_difference: float


def upstream_names(model: HookedTransformer) -> list[str]:
    """Components that write to the residual stream, in order.

    The embeddings, then per layer its heads and its MLP.
    """
    names = [EMBEDDINGS]
    for layer in range(model.cfg.n_layers):
        names += [str(HeadComponent(layer, head)) for head in range(model.cfg.n_heads)]
        names.append(str(MLPComponent(layer)))
    return names


def downstream_names(model: HookedTransformer) -> list[str]:
    """Edge targets in ``EdgeScores.scores``' column order.

    Every head's q, k and v input layer by layer, then every MLP's input, then the logits.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [
        str(HeadComponent(layer, head, kind))
        for layer in range(n_layers)
        for head in range(n_heads)
        for kind in ("q", "k", "v")
    ]
    return [*heads, *[str(MLPComponent(layer)) for layer in range(n_layers)], LOGITS]


def output_hooks(model: HookedTransformer) -> list[str]:
    """Every upstream component's output: the embeddings, each layer's ``hook_z`` and MLP output.

    A source cache for ``edge_attribution`` holds these.
    """
    n_layers = model.cfg.n_layers
    return [
        *embedding_hooks(model),
        *[f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)],
        *[f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
    ]


def _input_hooks(model: HookedTransformer) -> list[str]:
    """Every downstream component's input, with split head inputs."""
    n_layers = model.cfg.n_layers
    return [
        *[f"blocks.{layer}.hook_{kind}_input" for layer in range(n_layers) for kind in "qkv"],
        *[f"blocks.{layer}.hook_mlp_in" for layer in range(n_layers)],
        f"blocks.{n_layers - 1}.hook_resid_post",
    ]


def edge_attribution(
    model: HookedTransformer,
    pairs: PromptPairs,
    source: Cache,
    base: Which = "clean",
    metric: Metric = logit_difference,
    tokens_per_pass: int = GRADIENT_TOKENS,
) -> EdgeScores:
    """Edge attribution patching: a score for every edge, and for every upstream component.

    For every edge u -> v, (source - base output of u) . gradient of the metric with respect to
    v's input, summed over positions, at the base run.

    Args:
        model: The model.
        pairs: The prompt pairs.
        source: Activations to patch in: every hook of ``output_hooks``.
        base: Which prompts run.
        metric: The score of each prompt from its last token's logits (``patching.metrics``).
        tokens_per_pass: Tokens per forward-and-backward pass (at least one prompt): bounds
            memory; the scores don't depend on it.

    Returns:
        The scores of every edge and every upstream component.
    """
    outputs = output_hooks(model)
    base_scores = torch.empty(pairs.size)
    scores: Tensor | None = None
    nodes: Tensor | None = None
    # Every score is a sum over prompts: each gradient pass adds its rows' share.
    for rows in gradient_passes(pairs, tokens_per_pass):
        part = pairs.rows(rows)
        with split_head_inputs(model):
            base_scores[rows], activations, grads = forward_and_gradients(
                model, part.tokens(base), part, [*outputs, *_input_hooks(model)], metric
            )
        deltas = {name: source[name][rows] - activations[name] for name in outputs}
        del activations
        part_scores, part_nodes = _edge_score_sums(model, deltas, grads)
        del deltas, grads
        scores = part_scores if scores is None else scores + part_scores
        nodes = part_nodes if nodes is None else nodes + part_nodes
    assert scores is not None and nodes is not None  # every batch has a row
    return EdgeScores(
        upstream=upstream_names(model),
        downstream=downstream_names(model),
        scores=scores / pairs.size,
        nodes=nodes / pairs.size,
        base_difference=float(base_scores.mean()),
    )


def _edge_score_sums(
    model: HookedTransformer, deltas: dict[str, Tensor], grads: dict[str, Tensor]
) -> tuple[Float[Tensor, "upstream downstream"], Float[Tensor, " upstream"]]:
    """Edge and node scores summed over the rows of one gradient pass (not yet averaged)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    # What each upstream component adds to the residual stream, source minus base, one row per
    # component: [up, batch * pos * d_model]. Every edge score is then a matrix product with the
    # gradients laid out as [batch * pos * d_model, input] (einsum would permute ``up`` anew per
    # input).
    upstream = [sum(deltas[name] for name in embedding_hooks(model))]
    for layer in range(n_layers):
        z = deltas[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        upstream += list(torch.einsum("bphd,hdm->hbpm", z, model.blocks[layer].attn.W_O))
        upstream.append(deltas[f"blocks.{layer}.hook_mlp_out"])
    up = torch.stack(upstream).flatten(1)
    del upstream
    up_layers = torch.tensor(
        [-1] + [layer for layer in range(n_layers) for _ in range(n_heads + 1)]
    )
    up_is_mlp = torch.tensor(
        [False] + [h == n_heads for _ in range(n_layers) for h in range(n_heads + 1)]
    )

    columns = []
    for layer in range(n_layers):
        # Per layer: [batch, pos, 3 * head, d_model] in the order head 0 q, k, v, head 1 q, ...
        qkv = torch.stack(
            [grads[f"blocks.{layer}.hook_{kind}_input"] for kind in ("q", "k", "v")], dim=3
        ).flatten(2, 3)
        scores = up @ qkv.movedim(2, 3).reshape(up.shape[1], -1)
        feeds = up_layers < layer
        scores[~feeds] = torch.nan
        columns.append(scores)
    for layer in range(n_layers):
        scores = (up @ grads[f"blocks.{layer}.hook_mlp_in"].reshape(-1))[:, None]
        feeds = (up_layers < layer) | ((up_layers == layer) & ~up_is_mlp)
        scores[~feeds] = torch.nan
        columns.append(scores)
    columns.append((up @ grads[f"blocks.{n_layers - 1}.hook_resid_post"].reshape(-1))[:, None])

    # Each component's own attribution, from the gradient at its output.
    node_scores = [(sum(deltas[name] * grads[name] for name in embedding_hooks(model))).sum()]
    for layer in range(n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        node_scores += list((deltas[name] * grads[name]).sum(dim=(0, 1, 3)))
        name = f"blocks.{layer}.hook_mlp_out"
        node_scores.append((deltas[name] * grads[name]).sum())
    return torch.cat(columns, dim=1), torch.stack([torch.as_tensor(s) for s in node_scores])
