"""Attribution patching beside exact activation patching, over a dataset of IOI prompt pairs.

Attribution patching (Nanda 2023) estimates the effect of restoring one clean activation into
the corrupted run as (clean - corrupted activation) x the gradient of the logit difference at the
corrupted run: for every head, every MLP and the residual stream at every layer and position
group, from one clean forward, one corrupted forward and one backward pass. The same components
are then patched exactly, one at a time, so that each estimate stands next to the truth. Both
are reported as the share of the clean-minus-corrupted logit difference recovered.

The estimate is first order: exact where the metric is linear in the activation (the last
layers, the final residual stream), off where it is not. Known failures: the residual stream in
the first layers at the changed token (patching swaps a whole token's embedding, far beyond a
linear step) and heads whose attention saturates (a softmax at 0 or 1 has no gradient for a
change that moves it all the way). The largest disagreements are listed in the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.datasets.ioi import ROLES, IOIParams
from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure, Params

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from torch import Tensor
    from transformer_lens import HookedTransformer

TOP_K = 10


class AttributionPatchingParams(Params):
    # The exact side costs one partial forward per component and pair (270 heads and 30 MLPs on
    # SmolLM2; 4 pairs took 212 s for the heads alone under load): 2 pairs (one ABBA, one BABA) by
    # default; the estimate alone is cheap. More pairs: --set params.ioi.n_pairs=16.
    ioi: IOIParams = Field(default_factory=lambda: IOIParams(n_pairs=2), description="The IOI prompt pairs.")
    # Exact residual patching is 31 points x 6 position groups more partial forwards per pair: off by
    # default (its estimate is still computed and drawn, marked as having no exact values).
    exact_residual: bool = Field(False, description="Also patch the residual stream exactly (every layer and position group).")


@dataclass(frozen=True)
class AttributionPatchingResult:
    examples: list[dict[str, str]]
    clean: dict[str, float]
    corrupted: dict[str, float]
    residual_labels: list[str]
    roles: list[str]
    heads_estimate: Float[NDArray, "layer head"]
    heads_exact: Float[NDArray, "layer head"]
    mlps_estimate: Float[NDArray, " layer"]
    mlps_exact: Float[NDArray, " layer"]
    residual_estimate: Float[NDArray, "point role"]
    residual_exact: Float[NDArray, "point role"] | None
    attribution_seconds: float
    exact_seconds: dict[str, float]

    def correlations(self) -> dict[str, dict[str, float]]:
        """Pearson and Spearman correlation of estimate and exact value, per kind of component."""
        from scipy import stats

        pairs = {
            "heads": (self.heads_estimate.ravel(), self.heads_exact.ravel()),
            "mlps": (self.mlps_estimate, self.mlps_exact),
            "heads_and_mlps": (np.r_[self.heads_estimate.ravel(), self.mlps_estimate], np.r_[self.heads_exact.ravel(), self.mlps_exact]),
        }
        if self.residual_exact is not None:
            pairs["residual"] = (self.residual_estimate.ravel(), self.residual_exact.ravel())
        return {
            kind: {"pearson": float(stats.pearsonr(estimate, exact)[0]), "spearman": float(stats.spearmanr(estimate, exact)[0]), "n": len(exact)}
            for kind, (estimate, exact) in pairs.items()
        }

    def largest_errors(self) -> list[dict[str, Any]]:
        """The components whose estimate is furthest from the exact value."""
        rows = [
            {"component": f"head {layer}.{head}", "estimate": float(self.heads_estimate[layer, head]), "exact": float(self.heads_exact[layer, head])}
            for layer, head in np.ndindex(self.heads_exact.shape)
        ]
        rows += [{"component": f"MLP {layer}", "estimate": float(e), "exact": float(x)} for layer, (e, x) in enumerate(zip(self.mlps_estimate, self.mlps_exact))]
        if self.residual_exact is not None:
            rows += [
                {"component": f"residual {self.residual_labels[point]}, {self.roles[role]}", "estimate": float(self.residual_estimate[point, role]), "exact": float(self.residual_exact[point, role])}
                for point, role in np.ndindex(self.residual_exact.shape)
            ]
        return sorted(rows, key=lambda row: -abs(row["estimate"] - row["exact"]))[:TOP_K]

    def metrics(self) -> dict[str, Any]:
        from unraveled.heads import top_heads

        return {
            "n_pairs": len(self.examples),
            "example_pairs": self.examples[:4],
            "clean": self.clean,
            "corrupted": self.corrupted,
            "units": "share of the clean-minus-corrupted mean logit difference recovered (0 corrupted, 1 clean)",
            "correlation_estimate_vs_exact": self.correlations(),
            "largest_errors": self.largest_errors(),
            "heads_estimate": self.heads_estimate,
            "heads_exact": self.heads_exact,
            "top_heads_exact": top_heads(self.heads_exact, TOP_K),
            "top_heads_estimate": top_heads(self.heads_estimate, TOP_K),
            "mlps_estimate": self.mlps_estimate,
            "mlps_exact": self.mlps_exact,
            "residual_points": self.residual_labels,
            "residual_position_groups": self.roles,
            "residual_estimate": self.residual_estimate,
            "residual_exact": self.residual_exact,
            "seconds": {"attribution_patching": self.attribution_seconds, "exact_patching": self.exact_seconds},
        }


def compute(model: HookedTransformer, params: AttributionPatchingParams, seed: int) -> AttributionPatchingResult:
    from unraveled.datasets.ioi import ioi_batch
    from unraveled.patching import (
        answer_summary,
        attribution,
        estimates_per_component,
        head_patches,
        mlp_patches,
        patchable_hooks,
        patched_logit_differences,
        residual_patches,
        run_cache,
    )

    batch = ioi_batch(model, params.ioi, seed)
    pairs = batch.tokens
    groups = [batch.roles[role] for role in ROLES]
    hooks = patchable_hooks(model)
    started = time.perf_counter()
    clean_logits, clean_cache = run_cache(model, pairs, "clean", hooks)
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    _, estimates = attribution(model, pairs, hooks, clean_cache, base="corrupted")
    heads_estimate, mlps_estimate, residual_estimate = estimates_per_component(model, estimates, groups)
    attribution_seconds = time.perf_counter() - started

    clean, corrupted = answer_summary(clean_logits, pairs), answer_summary(corrupted_logits, pairs)
    low, span = corrupted["mean_logit_difference"], clean["mean_logit_difference"] - corrupted["mean_logit_difference"]
    if abs(span) < 1e-6:
        raise ValueError("params.ioi: the clean and corrupted prompts give the same mean logit difference: nothing to recover")

    def recovered(patched: Tensor) -> NDArray:
        return ((patched.mean(-1) - low) / span).numpy()

    exact_seconds = {}
    started = time.perf_counter()
    heads_exact = recovered(patched_logit_differences(model, pairs, head_patches(model), clean_cache, "corrupted", corrupted_cache))
    exact_seconds["heads"] = time.perf_counter() - started
    started = time.perf_counter()
    mlps_exact = recovered(patched_logit_differences(model, pairs, mlp_patches(model), clean_cache, "corrupted", corrupted_cache))
    exact_seconds["mlps"] = time.perf_counter() - started
    residual_exact = None
    n_points = model.cfg.n_layers + 1
    if params.exact_residual:
        started = time.perf_counter()
        residual = patched_logit_differences(model, pairs, residual_patches(model, groups), clean_cache, "corrupted", corrupted_cache)
        residual_exact = recovered(residual).reshape(n_points, len(ROLES))
        exact_seconds["residual"] = time.perf_counter() - started
    return AttributionPatchingResult(
        examples=[{"clean": p.clean, "corrupted": p.corrupted, "correct": f" {p.io}", "incorrect": f" {p.s}", "order": p.order} for p in batch.pairs],
        clean=clean,
        corrupted=corrupted,
        residual_labels=[*[f"before block {layer}" for layer in range(model.cfg.n_layers)], "after the last block"],
        roles=list(ROLES),
        heads_estimate=(heads_estimate / span).numpy(),
        heads_exact=heads_exact.reshape(model.cfg.n_layers, model.cfg.n_heads),
        mlps_estimate=(mlps_estimate / span).numpy(),
        mlps_exact=mlps_exact,
        residual_estimate=(residual_estimate / span).numpy(),
        residual_exact=residual_exact,
        attribution_seconds=attribution_seconds,
        exact_seconds=exact_seconds,
    )


def _scatter(axes, estimate: NDArray, exact: NDArray, labels: list[str], colour: str, name: str, marker: str = "o") -> None:
    axes.scatter(exact, estimate, s=14, alpha=0.7, color=colour, marker=marker, label=name)
    worst = np.argsort(-np.abs(estimate - exact))[:4]
    strongest = np.argsort(-np.abs(exact))[:3]
    visible = 0.05 * float(np.abs(np.r_[estimate, exact]).max())  # labels near the origin would only overlap
    for index in {*worst.tolist(), *strongest.tolist()}:
        if max(abs(estimate[index]), abs(exact[index])) < visible:
            continue
        axes.annotate(labels[index], (exact[index], estimate[index]), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _diagonal(axes, values: NDArray) -> None:
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    axes.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--", label="estimate = exact")
    axes.axhline(0, color="black", linewidth=0.4)
    axes.axvline(0, color="black", linewidth=0.4)


def render(result: AttributionPatchingResult) -> Iterator[Artifact]:
    from unraveled.render.figures import heatmap, panels

    correlations = result.correlations()
    n_layers, n_heads = result.heads_exact.shape
    head_labels = [f"{layer}.{head}" for layer in range(n_layers) for head in range(n_heads)]

    def caption(kind: str) -> str:
        found = correlations[kind]
        return f"Pearson {found['pearson']:.3f}, Spearman {found['spearman']:.3f}"

    figure, axes = panels(2 if result.residual_exact is not None else 1)
    _diagonal(axes[0], np.r_[result.heads_exact.ravel(), result.heads_estimate.ravel(), result.mlps_exact, result.mlps_estimate])
    _scatter(axes[0], result.heads_estimate.ravel(), result.heads_exact.ravel(), head_labels, "royalblue", f"heads ({caption('heads')})")
    _scatter(axes[0], result.mlps_estimate, result.mlps_exact, [f"MLP {layer}" for layer in range(n_layers)], "darkorange", f"MLPs ({caption('mlps')})", marker="s")
    axes[0].set(title="Heads and MLPs", xlabel="exact activation patching (share recovered)", ylabel="attribution patching estimate")
    axes[0].legend(fontsize=7, loc="upper left")
    if result.residual_exact is not None:
        _diagonal(axes[1], np.r_[result.residual_exact.ravel(), result.residual_estimate.ravel()])
        layers = np.repeat(np.arange(len(result.residual_labels)), len(result.roles))
        points = axes[1].scatter(result.residual_exact.ravel(), result.residual_estimate.ravel(), c=layers, cmap="viridis", s=14)
        axes[1].figure.colorbar(points, ax=axes[1], label="residual point (0 = before block 0)")
        labels = [f"L{point} {role}" for point in range(len(result.residual_labels)) for role in result.roles]
        worst = np.argsort(-np.abs(result.residual_estimate.ravel() - result.residual_exact.ravel()))[:4]
        for index in worst:
            axes[1].annotate(labels[index], (result.residual_exact.flat[index], result.residual_estimate.flat[index]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes[1].set(title=f"Residual stream per layer and position group\n{caption('residual')}", xlabel="exact activation patching (share recovered)", ylabel="attribution patching estimate")
    seconds = sum(result.exact_seconds.values())
    figure.suptitle(
        f"Attribution patching against exact patching, {len(result.examples)} IOI pairs "
        f"(attribution {result.attribution_seconds:.1f} s, exact {seconds:.1f} s)"
    )
    compared = "every head, MLP and residual point" if result.residual_exact is not None else "every head and MLP (the residual stream has no exact values: exact_residual is off)"
    yield Figure("01_estimate_vs_exact", figure, f"Attribution-patching estimate against exact activation patching: {compared}")

    figure, axes = panels(2)
    bound = float(np.abs(np.r_[result.heads_exact.ravel(), result.heads_estimate.ravel()]).max()) or 1.0
    for panel, values, name in ((axes[0], result.heads_exact, "exact patching"), (axes[1], result.heads_estimate, "attribution estimate")):
        heatmap(panel, values, f"Heads, {name}", "Head", "Layer", cmap="RdBu_r", colorbar_label="share recovered", centre_zero=True)
        panel.images[0].set_clim(-bound, bound)
    yield Figure("02_heads_exact_and_estimate", figure, "Every head restored from the clean run: exact and estimated share recovered")

    figure, axes = panels(2 if result.residual_exact is not None else 1)
    shown = [(result.residual_estimate, "attribution estimate")] + ([(result.residual_exact, "exact patching")] if result.residual_exact is not None else [])
    bound = max(float(np.abs(values).max()) for values, _ in shown) or 1.0
    for panel, (values, name) in zip(axes, shown[::-1]):
        unpatched = "" if result.residual_exact is not None else " (no exact values: exact_residual is off)"
        heatmap(panel, values, f"Residual stream, {name}{unpatched}", "Position group", "", cmap="RdBu_r", colorbar_label="share recovered", centre_zero=True)
        panel.images[0].set_clim(-bound, bound)
        panel.set_xticks(range(len(result.roles)), result.roles)
        panel.set_yticks(range(0, len(result.residual_labels), 2), result.residual_labels[::2], fontsize=6)
    figure.set_size_inches(10, 7)
    yield Figure("03_residual_exact_and_estimate", figure, "The residual stream restored per layer and position group: exact and estimated")


def check(model: HookedTransformer, params: AttributionPatchingParams) -> None:
    """Every IOI name must be one token for this model."""
    from unraveled.datasets.ioi import check_ioi_names

    check_ioi_names(model, params.ioi)


EXPERIMENT = Experiment(title="Attribution patching", params=AttributionPatchingParams, compute=compute, render=render, check=check)
