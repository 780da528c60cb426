"""The journey of a token: its hidden state at every layer, mapped into a UMAP of the embeddings.

It also measures how close each state stays to its own, the next and the predicted token's
embedding.

Hidden states follow Hugging Face's ``output_hidden_states`` convention, which is the toolkit's
(``unraveled.analysis.STATE_CONVENTION``: state 0 the embedding sum, state i the residual stream
after block i-1, blocks counting from 0), the last with the final LayerNorm applied; so they need
raw weights and, like the original analysis, no BOS token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
    Prompt,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer


def hidden_state_note() -> str:
    """The toolkit's state convention, as this experiment's hidden states follow it."""
    from unraveled.analysis import STATE_CONVENTION

    return (
        f"{STATE_CONVENTION}; "
        "the last state has the final norm applied (Hugging Face hidden_states)"
    )


# The original analysis's five sentences, so that the spread figure compares with its figure.
DEFAULT_SENTENCES = [
    "He killed two birds with one stone by taking a quick action",
    "She won the race and broke the record in her age group by ten seconds",
    "A rolling stone gathers no moss, it moves through hill and dale without a single pause",
    "Despite the stormy weather and the warning from the news, we ventured out into the dense "
    "forest, hoping to catch a glimpse of the rare wildlife species",
    "In the quiet moments of the evening, as the sun began to set over the distant hills, casting "
    "a golden glow on the shimmering lake, I found myself lost in thought, reflecting on the "
    "decisions of the past and how they had led me to this particular point in my life",
]


class TokenJourneyParams(Params):
    """The token journey's params: the sentence, the token followed, the UMAP, the spread."""

    sentence: Prompt = "He killed two birds with one stone by taking a quick action"
    token_index: int = Field(
        5, ge=0, description="Which token of the sentence to follow (0 = first)."
    )
    umap_fit_tokens: int = Field(
        10000, ge=20, le=200_000, description="First token embeddings the UMAP is fitted on."
    )
    umap_neighbours: int = Field(15, ge=2, le=200)
    spread_sentences: list[Prompt] = Field(
        default_factory=lambda: list(DEFAULT_SENTENCES), min_length=1
    )


@dataclass(frozen=True)
class TokenJourneyResult:
    """One token's journey through the layers, and how the sentences' states spread.

    Attributes:
        tokens: The sentence's tokens, as strings.
        token_index: The followed token's position.
        predicted_token: The model's prediction after the sentence.
        initial_umap: The sentence's token embeddings placed in the UMAP.
        trajectory_umap: The followed token's hidden states placed in the UMAP.
        cos_own: Cosine of each token's states to its own embedding.
        cos_next: Cosine of each token's states to the next token's embedding.
        cos_last_state: Cosine of each token's states to the last token's state at that layer.
        cos_predicted: Cosine of each token's states to the predicted token's embedding.
        spread_distance: Per spread sentence, the states' mean distance from their centroid.
        spread_trace: Per spread sentence, the trace of the states' covariance.
        spread_lengths: The spread sentences' lengths in tokens.
        state_labels: A label per hidden state.
        umap_seconds: How long the UMAP took.
    """

    tokens: list[str]
    token_index: int
    predicted_token: str
    initial_umap: Float[NDArray, "pos 3"]
    trajectory_umap: Float[NDArray, "state 3"]
    cos_own: Float[NDArray, "state pos"]
    cos_next: Float[NDArray, "state pos_minus_1"]
    cos_last_state: Float[NDArray, "state pos"]
    cos_predicted: Float[NDArray, "state pos"]
    spread_distance: Float[NDArray, "state sentences"]
    spread_trace: Float[NDArray, "state sentences"]
    spread_lengths: list[int]
    state_labels: list[str]
    umap_seconds: float

    def metrics(self) -> dict[str, Any]:
        """The cosine curves, the spread per sentence, and the UMAP's time."""
        return {
            "tokens": self.tokens,
            "followed_token": self.tokens[self.token_index],
            "predicted_next_token": self.predicted_token,
            "hidden_state_convention": hidden_state_note(),
            "states": self.state_labels,
            "cosine_to_own_embedding": self.cos_own,
            "cosine_to_next_embedding": self.cos_next,
            "cosine_to_last_hidden_state": self.cos_last_state,
            "cosine_to_predicted_token_embedding": self.cos_predicted,
            "spread_sentence_lengths": self.spread_lengths,
            "mean_distance_from_centroid": self.spread_distance,
            "covariance_trace": self.spread_trace,
            "umap_seconds": self.umap_seconds,
        }


def compute(model: HookedTransformer, params: TokenJourneyParams, seed: int) -> TokenJourneyResult:
    """Follow the token through the hidden states, placing them in a UMAP of the embeddings."""
    import torch

    from unraveled.activations import collect_activations
    from unraveled.analysis import (
        cosine_to_targets,
        hidden_state_hook_names,
        hidden_states,
        spread_across_layers,
        state_labels,
    )
    from unraveled.umap_fit import umap_3d

    # No logits: only the sentence's last prediction is read, unembedded below from its final
    # state; the batch's logits (50,257 floats a token) would be the largest array of the pass.
    acts = collect_activations(
        model,
        [params.sentence, *params.spread_sentences],
        hidden_state_hook_names(model.cfg.n_layers),
        prepend_bos=False,
        logits=False,
    )
    n_tokens = acts.lengths[0]
    states = hidden_states(model, acts.cache)  # [state, batch, pos, d_model]
    sentence_states = states[:, 0, :n_tokens]
    token_ids = acts.tokens[0, :n_tokens]
    w_e = model.W_E.detach()
    # The last state has the final norm applied, so unembedding it is what the forward pass does.
    predicted = int(model.unembed(sentence_states[-1:, -1:])[0, 0].argmax())
    cos_last = torch.nn.functional.cosine_similarity(
        sentence_states, sentence_states[:, -1:, :], dim=-1
    )
    distance, trace = spread_across_layers(states[:, 1:], acts.mask[1:])
    cos_own = cosine_to_targets(sentence_states, w_e[token_ids]).numpy()
    cos_next = cosine_to_targets(sentence_states[:, :-1], w_e[token_ids[1:]]).numpy()
    cos_predicted = cosine_to_targets(sentence_states, w_e[predicted].expand(n_tokens, -1)).numpy()
    place = torch.cat([w_e[token_ids], sentence_states[:, params.token_index]]).numpy()
    str_tokens, spread_lengths = acts.str_tokens[0], acts.lengths[1:]
    # Freed before UMAP's fit, which would add its memory to theirs.
    del acts, states, sentence_states
    started = time.perf_counter()
    placed = umap_3d(w_e[: params.umap_fit_tokens].numpy(), place, params.umap_neighbours, seed)
    umap_seconds = time.perf_counter() - started
    return TokenJourneyResult(
        tokens=str_tokens,
        token_index=params.token_index,
        predicted_token=model.tokenizer.decode([predicted]),
        initial_umap=placed[:n_tokens],
        trajectory_umap=placed[n_tokens:],
        cos_own=cos_own,
        cos_next=cos_next,
        cos_last_state=cos_last.numpy(),
        cos_predicted=cos_predicted,
        spread_distance=distance.numpy(),
        spread_trace=trace.numpy(),
        spread_lengths=spread_lengths,
        state_labels=state_labels(model.cfg.n_layers, final_norm=True),
        umap_seconds=umap_seconds,
    )


def _curves(
    axes: Any, values: Float[NDArray, "state lines"], labels: list[str], title: str
) -> None:
    from unraveled.analysis import STATE_AXIS_LABEL

    for line, label in enumerate(labels):
        axes.plot(values[:, line], label=label)
    axes.set(title=title, xlabel=STATE_AXIS_LABEL, ylabel="cosine similarity")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))


def render(result: TokenJourneyResult) -> Iterator[Artifact]:
    """The journey in 3D, the cosine curves, and the spread across layers."""
    from unraveled.analysis import STATE_AXIS_LABEL
    from unraveled.render.figures import panels

    followed = result.tokens[result.token_index]
    figure, (axes,) = panels(1, projection_3d={0})
    figure.set_size_inches(9, 9)
    axes.scatter(*result.initial_umap.T, color="royalblue", s=30, label="initial embeddings")
    for token, point in zip(result.tokens, result.initial_umap, strict=True):
        axes.text(*point, token, color="deepskyblue", fontsize=10)
    axes.plot(*result.trajectory_umap.T, color="red", label="trajectory through the layers")
    axes.scatter(
        *result.trajectory_umap[-1], color="purple", s=60, label=f"final state of {followed!r}"
    )
    axes.text(*result.trajectory_umap[-1], followed, color="purple", fontsize=14)
    axes.set(
        title=f"Journey of {followed!r} through the layers (UMAP of token embeddings)",
        xlabel="UMAP 1",
        ylabel="UMAP 2",
        zlabel="UMAP 3",
    )
    axes.legend()
    yield Figure(
        "01_journey",
        figure,
        f"Hidden states of {followed!r} placed in a 3D UMAP of the token embeddings; "
        f"{hidden_state_note()}",
    )

    figure, (left, right) = panels(2)
    pairs = [f"{a} → {b}" for a, b in pairwise(result.tokens)]
    _curves(left, result.cos_next, pairs, "Cosine similarity to the next token's embedding")
    _curves(right, result.cos_own, result.tokens, "Cosine similarity to its own token embedding")
    figure.suptitle(hidden_state_note(), fontsize=9)
    yield Figure(
        "02_cosine_similarities",
        figure,
        "Each token's hidden state vs its own and the next token's embedding",
    )

    figure, (left, right) = panels(2)
    _curves(
        left,
        result.cos_last_state,
        result.tokens,
        "Cosine similarity to the last token's hidden state",
    )
    _curves(
        right,
        result.cos_predicted,
        result.tokens,
        f"Cosine similarity to the predicted token {result.predicted_token!r}",
    )
    figure.suptitle(hidden_state_note(), fontsize=9)
    yield Figure(
        "03_cosine_similarities_next",
        figure,
        f"Hidden states vs the last state and the predicted token {result.predicted_token!r}",
    )

    figure, (left, right) = panels(2)
    for index, length in enumerate(result.spread_lengths):
        left.plot(
            result.spread_distance[:, index],
            marker="o",
            label=f"sentence {index + 1} ({length} tokens)",
        )
        right.plot(
            result.spread_trace[:, index],
            marker="o",
            label=f"sentence {index + 1} ({length} tokens)",
        )
    left.set(
        title="Mean distance of token states from their centroid",
        xlabel=STATE_AXIS_LABEL,
        ylabel="mean distance",
    )
    right.set(
        title="Trace of the covariance of token states",
        xlabel=STATE_AXIS_LABEL,
        ylabel="covariance trace",
    )
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(hidden_state_note(), fontsize=9)
    yield Figure(
        "04_mean_distance_across_layers",
        figure,
        "How spread out a sentence's token states are, per layer",
    )


def check(model: HookedTransformer, params: TokenJourneyParams) -> None:
    """The followed token must be in the sentence (tokenised without BOS, as ``compute`` does)."""
    n_tokens = len(model.tokenizer.encode(params.sentence, add_special_tokens=False))
    if params.token_index >= n_tokens:
        raise ParamError(
            "token_index",
            f"{params.token_index} is beyond the sentence: "
            f"it has {n_tokens} tokens for this model (use 0..{n_tokens - 1})",
        )


EXPERIMENT = Experiment(
    title="The journey of a token",
    params=TokenJourneyParams,
    compute=compute,
    render=render,
    weights="raw",
    check=check,
)
