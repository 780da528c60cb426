"""Attention: patterns, attention to the first token and from the last, entropy, sinks.

The figures and views show one head's pattern in every layer, attention to the first token and
from the last, and per-head entropy and attention-sink strength.

It reads raw weights, as the original analysis does: folding and centring change no attention
pattern and no next-token loss (the folded LayerNorm and the centred residual give the same
queries, keys and log-probabilities), so the processed copy would only cost a second conversion
when the other seed-parity configs already hold the raw one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    HeadIndex,
    Params,
    Prompt,
    View,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from matplotlib.colors import ListedColormap
    from transformer_lens import HookedTransformer


class AttentionParams(Params):
    """The attention experiment's params: the prompt, the head drawn, and whether to add BOS."""

    prompt: Prompt = "Alice gave Bob a goose, and he gave her a duck."
    head: HeadIndex = Field(0, description="The head drawn in every layer's heatmap.")
    # The original analysis tokenises without BOS: position 0 is the prompt's first word.
    prepend_bos: bool = Field(
        False, description="Prepend the BOS token (the original analysis does not)."
    )


@dataclass(frozen=True)
class AttentionResult:
    """The prompt's attention patterns in every layer, and what the figures and metrics take.

    Attributes:
        tokens: The prompt's tokens, as strings.
        head: The head drawn in every layer's heatmap.
        patterns: Every head's attention pattern.
        to_first_token: Attention each query pays to position 0, mean over heads.
        from_last_token: Attention the last query pays to each key, mean over heads.
        entropy: Per head, the entropy of its attention (nats), mean over queries.
        sink: Per head, attention to position 0, mean over queries 1 onward.
        next_token_loss: The loss of predicting each token after the first from the ones before.
        prompt: The prompt.
        prepend_bos: Whether a BOS token was prepended.
    """

    tokens: list[str]
    head: int
    patterns: Float[NDArray, "layer head query_pos key_pos"]
    to_first_token: Float[NDArray, "layer query_pos"]
    from_last_token: Float[NDArray, "layer key_pos"]
    entropy: Float[NDArray, "layer head"]
    sink: Float[NDArray, "layer head"]
    next_token_loss: Float[NDArray, " pos_minus_1"]
    prompt: str
    prepend_bos: bool

    @property
    def tokenisation(self) -> str:
        """How the prompt was tokenised, in words, for titles and captions."""
        return (
            f"with BOS: position 0 is {self.tokens[0]!r}"
            if self.prepend_bos
            else "without BOS, as the original"
        )

    def metrics(self) -> dict[str, Any]:
        """The patterns' summaries, per-head entropy and sink, the strongest heads, the loss."""
        from unraveled.heads import top_heads

        return {
            "prepend_bos": self.prepend_bos,
            "first_token": self.tokens[0],
            "tokens": self.tokens,
            "head_drawn": self.head,
            "attention_to_first_token_per_layer": self.to_first_token,
            "last_token_attention_per_layer": self.from_last_token,
            "entropy_by_head": self.entropy,
            "attention_sink_by_head": self.sink,
            "attention_sink_means": (
                "mean attention to position 0 over queries 1.. (query 0 can only attend to itself)"
            ),
            "mean_attention_sink": float(self.sink.mean()),
            "strongest_sink_heads": top_heads(self.sink, 5),
            "lowest_entropy_heads": top_heads(self.entropy, 5, lowest=True),
            "next_token_loss": self.next_token_loss,
            "mean_next_token_loss": float(self.next_token_loss.mean())
            if len(self.next_token_loss)
            else None,
        }


def layer_colours(cmap_name: str, n_layers: int) -> ListedColormap:
    """One colour per layer from ``cmap_name``, pale for early layers but never white."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, Normalize

    # Start the gradient a little below layer 0 so that early layers are pale but visible.
    shade = Normalize(vmin=-0.3 * n_layers, vmax=n_layers - 1)
    return ListedColormap(
        colormaps[cmap_name](shade(np.arange(n_layers))), name=f"{cmap_name}_{n_layers}_layers"
    )


def compute(model: HookedTransformer, params: AttentionParams, seed: int) -> AttentionResult:
    """Run the prompt once, keeping every layer's attention pattern and the next-token loss."""
    from unraveled.activations import collect_activations
    from unraveled.analysis import (
        attention_entropy_by_head,
        attention_sink_by_head,
        attention_to_first_token,
        last_token_attention,
        stack_patterns,
    )

    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    acts = collect_activations(model, [params.prompt], hooks, prepend_bos=params.prepend_bos)
    patterns = stack_patterns(acts.cache, n_layers)
    log_probs = acts.logits[0, :-1].log_softmax(dim=-1)
    next_token_loss = -log_probs.gather(-1, acts.tokens[0, 1:, None])[:, 0]
    return AttentionResult(
        tokens=acts.str_tokens[0],
        head=params.head,
        patterns=patterns.numpy(),
        to_first_token=attention_to_first_token(patterns).numpy(),
        from_last_token=last_token_attention(patterns).numpy(),
        entropy=attention_entropy_by_head(patterns).numpy(),
        sink=attention_sink_by_head(patterns).numpy(),
        next_token_loss=next_token_loss.numpy(),
        prompt=params.prompt,
        prepend_bos=params.prepend_bos,
    )


def render(result: AttentionResult) -> Iterator[Artifact]:
    """The heatmaps, the layer-wise curves, per-head entropy and sink, and the views."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    from unraveled.render.figures import heatmap, layer_grid, panels, token_label

    n_layers = len(result.patterns)
    labels = [token_label(token) for token in result.tokens]
    figure, axes_list = layer_grid(n_layers)
    causal_future = np.triu(np.ones((len(labels), len(labels)), dtype=bool), k=1)
    for layer, axes in enumerate(axes_list):
        image = axes.imshow(
            np.ma.masked_array(result.patterns[layer, result.head], causal_future),
            cmap="viridis",
            vmin=0,
            vmax=1,
        )
        axes.set_title(f"Layer {layer}, head {result.head}", fontsize=9)
        axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axes.set_yticks(range(len(labels)), labels, fontsize=6)
    figure.colorbar(image, ax=axes_list, shrink=0.6, label="attention weight")
    figure.suptitle(
        "Attention pattern of one head in every layer (rows: queries, columns: keys); "
        f"prompt tokenised {result.tokenisation}"
    )
    yield Figure(
        "04_attention_heatmaps",
        figure,
        f"Head {result.head} of every layer on the prompt, tokenised {result.tokenisation}",
    )

    figure, (axes,) = panels(1)
    figure.set_size_inches(12, 6)
    blues, reds = layer_colours("Blues", n_layers), layer_colours("Reds", n_layers)
    for layer in range(n_layers):
        axes.plot(result.to_first_token[layer], color=blues.colors[layer])
        axes.plot(result.from_last_token[layer], color=reds.colors[layer], linestyle="--")
    axes.set(
        title="Layer by layer: attention every token pays to the first token (blue) "
        "and the last token pays to each token (red, dashed)"
        f"\nprompt tokenised {result.tokenisation}",
        xlabel="Token index",
        ylabel="Attention weight, mean over heads",
    )
    axes.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
    # The colour bars use the very colours of the lines: one discrete colour per layer.
    layers = BoundaryNorm(np.arange(-0.5, n_layers), n_layers)
    ticks = range(0, n_layers, max(1, n_layers // 10))
    for cmap, label in (
        (reds, "layer (attention of the last token)"),
        (blues, "layer (attention to the first token)"),
    ):
        figure.colorbar(ScalarMappable(norm=layers, cmap=cmap), ax=axes, label=label, ticks=ticks)
    yield Figure(
        "05_layer_wise_attention",
        figure,
        "Attention to the first token and from the last token, per layer; "
        f"tokenised {result.tokenisation}",
    )

    figure, (left, right) = panels(2)
    heatmap(
        left,
        result.entropy,
        "Attention entropy per head (nats)",
        "Head",
        "Layer",
        cmap="viridis",
        colorbar_label="mean entropy over queries",
    )
    heatmap(
        right,
        result.sink,
        "Attention to the first token per head (sink)",
        "Head",
        "Layer",
        cmap="magma",
        colorbar_label="mean attention to position 0, queries 1..",
    )
    figure.suptitle(f"Prompt tokenised {result.tokenisation}")
    yield Figure(
        "06_head_entropy_and_sink",
        figure,
        f"Per-head attention entropy and attention-sink strength; tokenised {result.tokenisation}",
    )
    yield from attention_views(result)


def attention_views(result: AttentionResult) -> Iterator[View]:
    """Interactive circuitsvis pages: each layer's heads, all layers on one page, per-token loss."""
    from unraveled.render import views

    n_layers, n_heads = result.patterns.shape[:2]
    names = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    per_layer = [
        views.attention_heads(
            result.patterns[layer],
            result.tokens,
            f"Layer {layer}",
            names[layer * n_heads : (layer + 1) * n_heads],
        )
        for layer in range(n_layers)
    ]
    for layer, element in enumerate(per_layer):
        yield View(
            f"attention_layer_{layer:02d}",
            f"Attention heads of layer {layer}",
            [element],
            {"prompt": result.prompt, "tokenised": result.tokenisation, "layer": str(layer)},
        )
    yield View(
        "attention_all_layers",
        "Attention heads of every layer",
        per_layer,
        {"prompt": result.prompt, "tokenised": result.tokenisation, "layers": f"0..{n_layers - 1}"},
    )
    # The first token has no prediction to score; show it with loss 0.
    loss = [0.0, *result.next_token_loss.tolist()]
    yield View(
        "token_loss",
        "Per-token loss (nats) of the prompt",
        [
            views.colored_tokens(
                result.tokens, loss, "Loss of predicting each token from the ones before it"
            )
        ],
        {"prompt": result.prompt, "tokenised": result.tokenisation},
    )


EXPERIMENT = Experiment(
    title="Attention patterns, sinks and entropy",
    params=AttentionParams,
    compute=compute,
    render=render,
    weights="raw",
)
