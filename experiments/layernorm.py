"""LayerNorm: its geometry, every layer's learned gammas, and the scale it applies to prompts.

The gammas are read from raw, unfolded weights (folding moves them into the next linear layer).
For RMSNorm models without learned positions, gammas are compared with the token embeddings'
per-dimension spread instead, and the figures say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure, Params, Prompt

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer

DEFAULT_PROMPTS = [
    "Alice gave Bob a goose, and he gave her a duck.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
]


class LayerNormParams(Params):
    """The LayerNorm experiment's params: the geometry toy's size and the prompts scaled."""

    toy_points: int = Field(
        100, ge=3, le=100_000, description="Random 3D points in the geometry toy."
    )
    prompts: list[Prompt] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)


@dataclass(frozen=True)
class LayerNormResult:
    """The toy's points, every layer's gammas, and the scale LayerNorm applied to the prompts.

    Attributes:
        toy_before: Random 3D points.
        toy_after: The same points after LayerNorm without gain or bias.
        reference_name: What the gammas are compared with (position or token embeddings).
        reference_log_std: log10 of that reference's standard deviation per dimension.
        log_gamma: Per norm (``ln1``, ``ln2``), log10 |gamma| of every layer.
        applied_scale: Per norm, the scale it applied at each position, mean over the prompts.
        norm_kind: The model's normalisation (``LN``, ``RMS``, ...).
        summary: The metrics.
    """

    toy_before: Float[NDArray, "points 3"]
    toy_after: Float[NDArray, "points 3"]
    reference_name: str
    reference_log_std: Float[NDArray, " d_model"]
    log_gamma: dict[str, Float[NDArray, "layer d_model"]]
    applied_scale: dict[str, Float[NDArray, "layer pos"]]
    norm_kind: str
    summary: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        """The toy's checks, gamma means and correlations, and the mean applied scale."""
        return self.summary


def layer_norm_toy(points: Float[NDArray, "n 3"]) -> Float[NDArray, "n 3"]:
    """LayerNorm without gain or bias: centre each point's coordinates, divide by their std.

    The results lie on the plane through the origin normal to [1, 1, 1] (the coordinates sum to
    zero) at distance sqrt(3) from the origin.
    """
    centred = points - points.mean(axis=1, keepdims=True)
    return centred / centred.std(axis=1, keepdims=True)


def _norm_weight(model: HookedTransformer, layer: int, which: str) -> Float[NDArray, " d_model"]:
    norm = getattr(model.blocks[layer], which)
    if not hasattr(norm, "w"):
        raise ValueError(
            f"blocks.{layer}.{which} has no gamma: the model's weights were folded. "
            "This experiment needs raw weights (weights='raw')."
        )
    return norm.w.detach().float().cpu().numpy()


def compute(model: HookedTransformer, params: LayerNormParams, seed: int) -> LayerNormResult:
    """Normalise the toy's points, read the gammas, and run the prompts for the applied scale."""
    import torch

    from unraveled.activations import collect_activations

    rng = np.random.default_rng(seed)
    toy_before = rng.standard_normal((params.toy_points, 3))
    toy_after = layer_norm_toy(toy_before)
    n_layers = model.cfg.n_layers
    if model.cfg.positional_embedding_type == "standard":
        reference = model.W_pos.detach().float().cpu().numpy()
        reference_name = "position embeddings"
    else:
        reference = model.W_E.detach().float().cpu().numpy()
        reference_name = "token embeddings (no learned positions)"
    reference_log_std = np.log10(reference.std(axis=0))
    log_gamma = {
        which: np.stack(
            [
                np.log10(np.abs(_norm_weight(model, layer, which)) + 1e-12)
                for layer in range(n_layers)
            ]
        )
        for which in ("ln1", "ln2")
    }
    hooks = [
        f"blocks.{layer}.{which}.hook_scale"
        for which in ("ln1", "ln2")
        for layer in range(n_layers)
    ]
    acts = collect_activations(model, params.prompts, hooks)
    mask = acts.mask.to(torch.float32)
    counts = mask.sum(dim=0).clamp_min(1)
    applied_scale = {
        which: np.stack(
            [
                (
                    (acts.cache[f"blocks.{layer}.{which}.hook_scale"][..., 0] * mask).sum(dim=0)
                    / counts
                ).numpy()
                for layer in range(n_layers)
            ]
        )
        for which in ("ln1", "ln2")
    }
    correlation = {
        which: [float(np.corrcoef(reference_log_std, row)[0, 1]) for row in values]
        for which, values in log_gamma.items()
    }
    summary = {
        "norm_kind": model.cfg.normalization_type,
        "gammas_compared_with": reference_name,
        "toy": {
            "max_abs_coordinate_sum_after": float(np.abs(toy_after.sum(axis=1)).max()),
            "mean_norm_after": float(np.linalg.norm(toy_after, axis=1).mean()),
            "expected_norm": float(np.sqrt(3)),
        },
        "log10_abs_gamma_mean": {which: values.mean(axis=1) for which, values in log_gamma.items()},
        "correlation_log_gamma_vs_log_reference_std": correlation,
        "applied_scale_mean_per_layer": {
            which: values.mean(axis=1) for which, values in applied_scale.items()
        },
        "prompts": params.prompts,
    }
    return LayerNormResult(
        toy_before,
        toy_after,
        reference_name,
        reference_log_std,
        log_gamma,
        applied_scale,
        model.cfg.normalization_type,
        summary,
    )


def _toy_figure(result: LayerNormResult) -> Figure:
    from unraveled.render.figures import panels

    figure, (before, after) = panels(2, projection_3d={0, 1})
    colours = np.arange(len(result.toy_before))
    before.scatter(*result.toy_before.T, c=colours, cmap="tab20", s=12)
    before.set(title="Original points", xlabel="x", ylabel="y", zlabel="z")
    after.scatter(*result.toy_after.T, c=colours, cmap="tab20", s=12)
    grid = np.linspace(-2.5, 2.5, 10)
    xx, yy = np.meshgrid(grid, grid)
    after.plot_surface(xx, yy, -xx - yy, alpha=0.2, color="slategray")
    after.quiver(0, 0, 0, 1, 1, 1, color="black", label="normal [1, 1, 1]")
    after.set(
        title="After LayerNorm: a circle on the plane x + y + z = 0",
        xlabel="x",
        ylabel="y",
        zlabel="z",
    )
    after.legend()
    return Figure(
        "01_layer_normalization_3d",
        figure,
        "LayerNorm maps points onto a circle in the plane normal to [1,1,1]",
    )


def render(result: LayerNormResult) -> Iterator[Artifact]:
    """The toy in 3D, each norm's gammas against the reference, and the applied scale."""
    from unraveled.render.figures import heatmap, layer_grid, panels

    yield _toy_figure(result)
    colours = {"ln1": "salmon", "ln2": "mediumseagreen"}
    names = {"ln1": "before attention (ln1)", "ln2": "before the MLP (ln2)"}
    for number, which in (("02", "ln1"), ("03", "ln2")):
        values = result.log_gamma[which]
        figure, axes_list = layer_grid(len(values))
        for layer, axes in enumerate(axes_list):
            axes.scatter(
                result.reference_log_std, values[layer], s=6, alpha=0.6, color=colours[which]
            )
            axes.set_title(f"Layer {layer} {which}", fontsize=9)
            axes.set_xlabel(f"log10 std of {result.reference_name.split(' (')[0]}", fontsize=7)
            axes.set_ylabel("log10 |gamma|", fontsize=7)
        figure.suptitle(
            f"{result.norm_kind} gammas {names[which]} "
            f"against per-dimension spread of {result.reference_name}"
        )
        yield Figure(
            f"{number}_{which}_gammas",
            figure,
            f"log10 |gamma| of {which} per layer vs log10 std of {result.reference_name}",
        )
    figure, axes_list = panels(2)
    for axes, which in zip(axes_list, ("ln1", "ln2"), strict=True):
        # The first position's scale is often orders of magnitude above the rest: log scale.
        heatmap(
            axes,
            np.log10(result.applied_scale[which]),
            f"Scale applied by {which} (mean over prompts)",
            "Position",
            "Layer",
            cmap="magma",
            colorbar_label="log10 hook_scale (the norm's divisor)",
        )
    yield Figure(
        "04_applied_scale",
        figure,
        "The normalisation scale actually applied at each layer and position",
    )


EXPERIMENT = Experiment(
    title="LayerNorm geometry and gammas",
    params=LayerNormParams,
    compute=compute,
    render=render,
    weights="raw",
    needs=frozenset({"W_pos"}),
)
