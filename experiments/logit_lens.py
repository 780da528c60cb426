"""The logit lens: what the residual stream would predict if decoding stopped at each layer.

Each state of the residual stream (``unraveled.analysis.STATE_CONVENTION``: state 0 the
embeddings, state i after block i-1) goes through the final norm, with its scale recomputed from
that state, and the unembedding. At the last state this is exactly the model's own output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure, Params, Prompt

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer

TOP_K = 5


class LogitLensParams(Params):
    """The logit lens experiment's params: the prompt, and whether to prepend BOS."""

    prompt: Prompt = "When Mary and John went to the store, John gave a drink to"
    prepend_bos: bool | None = Field(
        None, description="Prepend BOS; None uses the model's default."
    )


@dataclass(frozen=True)
class LogitLensResult:
    """What each residual-stream state (a point) would predict, decoded through the unembedding.

    Attributes:
        tokens: The prompt's tokens, as strings.
        point_labels: A label per point (``STATE_CONVENTION``).
        top1_token: Per point and position, the most likely next token.
        top1_prob: Its probability.
        final_prediction: The model's own prediction at the last position.
        final_prediction_prob: Its probability at each point, last position.
        final_prediction_rank: Its rank at each point (0 = top), last position.
        kl_from_final: Per point, KL(final || point) at the last position.
        top5_last: Per point, the five most likely tokens at the last position with their
            probabilities.
    """

    tokens: list[str]
    point_labels: list[str]
    top1_token: list[list[str]]
    top1_prob: Float[NDArray, "point pos"]
    final_prediction: str
    final_prediction_prob: Float[NDArray, " point"]
    final_prediction_rank: Int[NDArray, " point"]
    kl_from_final: Float[NDArray, " point"]
    top5_last: list[list[dict[str, Any]]]

    def metrics(self) -> dict[str, Any]:
        """Per point: the final prediction's probability and rank, the KL, the top five."""
        from unraveled.analysis import STATE_CONVENTION

        return {
            "tokens": self.tokens,
            "state_convention": STATE_CONVENTION,
            "points": self.point_labels,
            "final_prediction": self.final_prediction,
            "final_prediction_probability_per_point": self.final_prediction_prob,
            "final_prediction_rank_per_point": self.final_prediction_rank,
            "kl_from_final_per_point": self.kl_from_final,
            "top5_at_last_position_per_point": {
                label: top for label, top in zip(self.point_labels, self.top5_last, strict=True)
            },
        }


def compute(model: HookedTransformer, params: LogitLensParams, seed: int) -> LogitLensResult:
    """Decode every residual-stream state of the prompt through the final norm and unembedding."""
    import torch

    from unraveled.activations import collect_activations
    from unraveled.analysis import state_labels
    from unraveled.logits import kl_from_final, logit_lens, rank_of, residual_hook_names

    n_layers = model.cfg.n_layers
    hooks = residual_hook_names(n_layers)
    acts = collect_activations(
        model, [params.prompt], hooks, prepend_bos=params.prepend_bos, logits=False
    )
    # One point at a time: each point's [pos, d_vocab] distributions are reduced to its top-1 and
    # its last position, so no full-vocabulary tensor of every point is held (a few of them at
    # once were the config's peak).
    top1_probs, top1_ids, last_rows = [], [], []
    with torch.inference_mode():
        for hook in hooks:
            # [pos, d_vocab]
            log_probs = logit_lens(model, acts.cache[hook][:1])[0].log_softmax(dim=-1)
            top1_prob, top1_id = log_probs.exp().max(dim=-1)
            top1_probs.append(top1_prob)
            top1_ids.append(top1_id)
            # A copy, not a view, which would keep the whole point alive.
            last_rows.append(log_probs[-1].clone())
    # [point, pos], [point, pos], [point, d_vocab]
    top1_prob, top1_id, last = (
        torch.stack(top1_probs),
        torch.stack(top1_ids),
        torch.stack(last_rows),
    )
    decode = model.tokenizer.decode
    final_token = int(last[-1].argmax())
    top_probs, top_ids = last.exp().topk(TOP_K, dim=-1)
    return LogitLensResult(
        tokens=acts.str_tokens[0],
        point_labels=state_labels(n_layers),
        top1_token=[[decode([token]) for token in row] for row in top1_id.tolist()],
        top1_prob=top1_prob.numpy(),
        final_prediction=decode([final_token]),
        final_prediction_prob=last[:, final_token].exp().numpy(),
        final_prediction_rank=rank_of(last, final_token).numpy(),
        kl_from_final=kl_from_final(last).numpy(),
        top5_last=[
            [
                {"token": decode([token]), "probability": float(p)}
                for token, p in zip(ids, ps, strict=True)
            ]
            for ids, ps in zip(top_ids.tolist(), top_probs.tolist(), strict=True)
        ],
    )


def render(result: LogitLensResult) -> Iterator[Artifact]:
    """The top-1 grid of every point and position, and the final prediction's curves."""
    from unraveled.analysis import STATE_AXIS_LABEL
    from unraveled.render.figures import panels, token_label

    n_points, n_pos = result.top1_prob.shape
    figure, (axes,) = panels(1)
    figure.set_size_inches(max(8.0, 1.1 * n_pos), max(5.0, 0.35 * n_points))
    image = axes.imshow(
        result.top1_prob, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest"
    )
    for point in range(n_points):
        for pos in range(n_pos):
            colour = "white" if result.top1_prob[point, pos] > 0.6 else "black"
            axes.text(
                pos,
                point,
                repr(result.top1_token[point][pos])[1:-1][:8],
                ha="center",
                va="center",
                fontsize=6,
                color=colour,
            )
    axes.set_xticks(range(n_pos), [token_label(t) for t in result.tokens], rotation=60, fontsize=7)
    axes.set_yticks(range(n_points), result.point_labels, fontsize=6)
    axes.set(
        title="Logit lens: top-1 decoded token at every layer and position "
        "(colour: its probability)",
        xlabel="Input position",
    )
    figure.colorbar(image, ax=axes, label="probability of the top-1 token")
    yield Figure(
        "01_logit_lens_grid",
        figure,
        "Top-1 token decoded from the residual stream, per layer and position",
    )

    figure, (prob_axes, rank_axes, kl_axes) = panels(3)
    points = np.arange(n_points)
    prob_axes.plot(points, result.final_prediction_prob, marker="o")
    prob_axes.set(
        title=f"Probability of the final prediction {result.final_prediction!r}",
        xlabel=STATE_AXIS_LABEL,
        ylabel="probability",
    )
    rank_axes.plot(points, result.final_prediction_rank + 1, marker="o", color="darkorange")
    rank_axes.set(
        title=f"Rank of {result.final_prediction!r}",
        xlabel=STATE_AXIS_LABEL,
        ylabel="rank (1 = top)",
        yscale="log",
    )
    kl_axes.plot(points, result.kl_from_final, marker="o", color="crimson")
    kl_axes.set(
        title="KL(final || lens) at the last position", xlabel=STATE_AXIS_LABEL, ylabel="KL (nats)"
    )
    for axes in (prob_axes, rank_axes, kl_axes):
        axes.grid(True, alpha=0.4)
    yield Figure(
        "02_final_prediction_by_layer",
        figure,
        "Probability and rank of the final prediction, "
        "and KL from the final distribution, per layer",
    )


# Each prompt token adds a column of (layers + 1) full-vocabulary distributions, and a column to
# the grid figure.
EXPERIMENT = Experiment(
    title="Logit lens", params=LogitLensParams, compute=compute, render=render, max_prompt_tokens=64
)
