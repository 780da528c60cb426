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
change that moves it all the way). So the residual stream at the changed token is always patched
exactly too (one column of the residual grid); the other columns are estimates only unless
``exact_residual`` is on, and the figures mark them so. The largest disagreements are listed in
the metrics.

Agreement is reported over every component and over the ones that matter: most heads do nearly
nothing (exact and estimate both near 0), and their agreement alone makes a rank correlation over
all heads look high. So the metrics and figures also give the top-k overlap (of the k components
with the largest |exact| effect, how many are among the k largest |estimates|) and the
correlations over the components whose |exact| effect reaches each of ``EFFECT_THRESHOLDS``.

With ``prompts: pairs`` the same runs over your own pairs (``unraveled.datasets.pairs``), the
residual stream per position or per group of positions around the change
(``patching.position_groups``); from Python, ``metric`` replaces the logit difference in the
gradients and the exact patches alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from jaxtyping import Bool, Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.components import HeadComponent
from unraveled.datasets.ioi import ROLES, IOIParams
from unraveled.datasets.pairs import PatchingMetricParams, check_pairs, metric_name
from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from matplotlib.axes import Axes
    from torch import Tensor
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

    from unraveled.patching import Patch, PromptPairs

TOP_K = 10
OVERLAP_KS = (5, 10)
"""The k of the top-k overlaps between the largest |exact| and the largest |estimated| effects."""
EFFECT_THRESHOLDS = (0.01, 0.05)
"""|exact| share recovered from which a component counts as having an effect (1% and 5% of the
clean-minus-corrupted difference); the figures quote the last."""


class AttributionPatchingParams(PatchingMetricParams):
    """The IOI pairs or yours, and whether the residual stream is patched exactly everywhere."""

    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = (
        *PatchingMetricParams.OMITTED_AT_DEFAULT,
        "prompts",
    )
    prompts: Literal["ioi", "pairs"] = Field(
        "ioi",
        description="ioi: the IOI pairs of params.ioi; pairs: your own, in params.pairs or "
        "params.pairs_file.",
    )

    # The exact side costs one partial forward per component and pair (270 heads and 30 MLPs on
    # SmolLM2: minutes for a few pairs): 2 pairs (one ABBA, one BABA) by default; the estimate
    # alone is cheap. More pairs: --set params.ioi.n_pairs=16.
    ioi: IOIParams = Field(
        default_factory=lambda: IOIParams(n_pairs=2), description="The IOI prompt pairs."
    )
    # Exact residual patching costs one partial forward per residual point and position group
    # that differs between the prompts: at the changed token (S2) always, since the estimate is
    # known to fail there (31 more on SmolLM2); at every group only on request (31 x 2 more).
    # Groups before the changed token restore nothing and are known without a forward pass.
    exact_residual: bool = Field(
        False,
        description="Patch the residual stream exactly at every position group; off, only at "
        "the changed token and the positions before it (the rest is an estimate only, marked on "
        "the figures).",
    )


def _correlations(
    estimate: Float[NDArray, " n"], exact: Float[NDArray, " n"]
) -> dict[str, float | None]:
    """Pearson and Spearman correlation.

    ``None`` where undefined (fewer than 3 values, or a constant side).
    """
    from scipy import stats

    if len(exact) < 3 or np.ptp(exact) == 0 or np.ptp(estimate) == 0:
        return {"pearson": None, "spearman": None}
    return {
        "pearson": float(stats.pearsonr(estimate, exact)[0]),
        "spearman": float(stats.spearmanr(estimate, exact)[0]),
    }


def agreement(estimate: Float[NDArray, " n"], exact: Float[NDArray, " n"]) -> dict[str, Any]:
    """How well estimates agree with exact values, over every component and over those that matter.

    Returns:
        ``pearson``, ``spearman`` and ``n`` over every component; ``top_k_overlap``: for each of
        ``OVERLAP_KS``, how many of the k largest |exact| values are among the k largest
        |estimates|; ``above_threshold``: per threshold of ``EFFECT_THRESHOLDS``, the number and
        share of components whose |exact| reaches it, and the correlations over them.
    """
    magnitude_exact, magnitude_estimate = (
        np.argsort(-np.abs(exact), kind="stable"),
        np.argsort(-np.abs(estimate), kind="stable"),
    )
    above = []
    for threshold in EFFECT_THRESHOLDS:
        kept = np.abs(exact) >= threshold
        above.append(
            {
                "threshold": threshold,
                "n": int(kept.sum()),
                "share": float(kept.mean()),
                **_correlations(estimate[kept], exact[kept]),
            }
        )
    return {
        **_correlations(estimate, exact),
        "n": len(exact),
        "top_k_overlap": {
            str(k): len(set(magnitude_exact[:k].tolist()) & set(magnitude_estimate[:k].tolist()))
            for k in OVERLAP_KS
            if k <= len(exact)
        },
        "above_threshold": above,
    }


@dataclass(frozen=True)
class AttributionPatchingResult:
    """Estimated and exact shares recovered per head, MLP and residual point and group."""

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
    residual_exact: Float[NDArray, "point role"]
    """NaN in the position groups patched by the estimate only (``exact_residual`` off)."""
    residual_groups_before_change: list[str]
    """Position groups wholly before the first token the prompts differ in: restoring them
    changes nothing, so exact and estimate are both 0 there by construction."""
    attribution_seconds: float
    exact_seconds: dict[str, float]
    pairs_kind: str = "IOI"
    """Whose pairs: ``IOI`` or ``your``."""
    metric: str | None = None
    """The custom metric's qualified name; None for the logit difference."""

    def residual_has_exact(self) -> Bool[NDArray, " role"]:
        """Which position groups of the residual stream were patched exactly."""
        return ~np.isnan(self.residual_exact).any(axis=0)

    def agreements(self) -> dict[str, dict[str, Any]]:
        """``agreement`` of estimate and exact value per kind of component.

        The residual stream's over its exactly patched cells, less the groups before the change,
        which would agree by construction and inflate it.
        """
        exact_cells = ~np.isnan(self.residual_exact)
        exact_cells[:, [self.roles.index(role) for role in self.residual_groups_before_change]] = (
            False
        )
        pairs = {
            "heads": (self.heads_estimate.ravel(), self.heads_exact.ravel()),
            "mlps": (self.mlps_estimate, self.mlps_exact),
            "heads_and_mlps": (
                np.r_[self.heads_estimate.ravel(), self.mlps_estimate],
                np.r_[self.heads_exact.ravel(), self.mlps_exact],
            ),
            "residual": (self.residual_estimate[exact_cells], self.residual_exact[exact_cells]),
        }
        return {kind: agreement(estimate, exact) for kind, (estimate, exact) in pairs.items()}

    def top_heads_by_exact_magnitude(self) -> list[dict[str, Any]]:
        """The ``TOP_K`` heads with the largest |exact| effect.

        Each with its estimate and the rank of the estimate's magnitude among all heads (1 =
        largest).
        """
        estimate_rank = np.empty(self.heads_estimate.size, dtype=int)
        estimate_rank[np.argsort(-np.abs(self.heads_estimate), axis=None, kind="stable")] = (
            np.arange(1, self.heads_estimate.size + 1)
        )
        n_heads = self.heads_exact.shape[1]
        return [
            {
                "head": f"{index // n_heads}.{index % n_heads}",
                "exact": float(self.heads_exact.flat[index]),
                "estimate": float(self.heads_estimate.flat[index]),
                "estimate_rank": int(estimate_rank[index]),
            }
            for index in np.argsort(-np.abs(self.heads_exact), axis=None, kind="stable")[:TOP_K]
        ]

    def largest_errors(self) -> list[dict[str, Any]]:
        """The components whose estimate is furthest from the exact value."""
        rows = [
            {
                "component": f"head {layer}.{head}",
                "estimate": float(self.heads_estimate[layer, head]),
                "exact": float(self.heads_exact[layer, head]),
            }
            for layer, head in np.ndindex(self.heads_exact.shape)
        ]
        rows += [
            {"component": f"MLP {layer}", "estimate": float(e), "exact": float(x)}
            for layer, (e, x) in enumerate(zip(self.mlps_estimate, self.mlps_exact, strict=True))
        ]
        rows += [
            {
                "component": f"residual {self.residual_labels[point]}, {self.roles[role]}",
                "estimate": float(self.residual_estimate[point, role]),
                "exact": float(self.residual_exact[point, role]),
            }
            for point, role in np.ndindex(self.residual_exact.shape)
            if not np.isnan(self.residual_exact[point, role])
        ]
        return sorted(rows, key=lambda row: -abs(row["estimate"] - row["exact"]))[:TOP_K]

    def metrics(self) -> dict[str, Any]:
        """The numbers of metrics.json."""
        from unraveled.heads import top_heads

        answers = (
            "correct: the indirect object, the clean prompts' answer; incorrect: the "
            "subject. Clean prompts are scored against the correct answer, corrupted ones against "
            "their own (with corruption swap, the subject; with abc, which has none, against the "
            "clean answer)"
            if self.pairs_kind == "IOI"
            else "correct: each pair's clean answer; incorrect: its corrupted answer. Clean "
            "prompts are scored against the correct answer, corrupted ones against their own"
        )
        scored = "logit difference" if self.metric is None else f"metric {self.metric}"
        return {
            "n_pairs": len(self.examples),
            **({} if self.metric is None else {"metric": self.metric}),
            "example_pairs": self.examples[:4],
            "clean": self.clean,
            "corrupted": self.corrupted,
            "answers": answers,
            "units": f"share of the clean-minus-corrupted mean {scored} recovered (0 "
            "corrupted, 1 clean)",
            "agreement_estimate_vs_exact": self.agreements(),
            "agreement_definitions": {
                "pearson, spearman, n": "over every component of the kind (the residual stream: "
                "over its exactly patched cells)",
                "top_k_overlap": "of the k components with the largest |exact|, how many are "
                "among the k with the largest |estimate|",
                "above_threshold": "pearson and spearman over the components whose |exact| "
                "reaches the threshold; share: their share of all",
            },
            "top_heads_by_exact_magnitude": self.top_heads_by_exact_magnitude(),
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
            "residual_position_groups_patched_exactly": [
                role
                for role, exact in zip(self.roles, self.residual_has_exact(), strict=True)
                if exact
            ],
            "residual_position_groups_before_the_change": self.residual_groups_before_change,
            "seconds": {
                "attribution_patching": self.attribution_seconds,
                "exact_patching": self.exact_seconds,
            },
        }


def compute(
    model: HookedTransformer, params: AttributionPatchingParams, seed: int
) -> AttributionPatchingResult:
    """Estimate every head's, MLP's and residual point's patch, then patch them exactly."""
    from unraveled.datasets.ioi import corrupted_prompts_answer, ioi_batch
    from unraveled.patching import (
        Recovery,
        answer_summary,
        attribution,
        estimates_per_component,
        head_patches,
        logit_difference,
        mlp_patches,
        patchable_hooks,
        patched_metric,
        position_groups,
        residual_patches,
        run_cache,
        user_pairs,
    )

    if params.prompts == "pairs":
        rows = [row.pair for row in params.rows()]
        pairs = user_pairs(model, rows)
        roles, groups, _ = position_groups(model, pairs)
        examples = [
            {
                "clean": row.clean,
                "corrupted": row.corrupted,
                "correct": row.clean_answer,
                "incorrect": row.corrupted_answer,
            }
            for row in rows
        ]
        field, corrupted_answer = params.pairs_field, "incorrect"
    else:
        batch = ioi_batch(model, params.ioi, seed)
        pairs, roles = batch.tokens, list(ROLES)
        groups = [batch.roles[role] for role in ROLES]
        examples = [
            {
                "clean": p.clean,
                "corrupted": p.corrupted,
                "correct": f" {p.io}",
                "incorrect": f" {p.s}",
                "order": p.order,
            }
            for p in batch.pairs
        ]
        field, corrupted_answer = "params.ioi", corrupted_prompts_answer(params.ioi)
    metric = params.metric or logit_difference
    hooks = patchable_hooks(model)
    started = time.perf_counter()
    clean_logits, clean_cache = run_cache(model, pairs, "clean", hooks)
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    _, estimates = attribution(model, pairs, hooks, clean_cache, base="corrupted", metric=metric)
    heads_estimate, mlps_estimate, residual_estimate = estimates_per_component(
        model, estimates, groups
    )
    attribution_seconds = time.perf_counter() - started

    clean = answer_summary(clean_logits, pairs)
    corrupted = answer_summary(corrupted_logits, pairs, corrupted_answer)
    recovery = Recovery.of(
        metric, clean_logits, corrupted_logits, pairs, field, metric_name(params.metric)
    )

    def recovered(patch_sets: list[list[Patch]]) -> NDArray:
        patched = patched_metric(
            model, pairs, patch_sets, clean_cache, "corrupted", corrupted_cache, metric=metric
        )
        return recovery.share(patched).numpy()

    exact_seconds = {}
    started = time.perf_counter()
    heads_exact = recovered(head_patches(model))
    exact_seconds["heads"] = time.perf_counter() - started
    started = time.perf_counter()
    mlps_exact = recovered(mlp_patches(model))
    exact_seconds["mlps"] = time.perf_counter() - started
    n_points = model.cfg.n_layers + 1
    before_change = [
        index for index, group in enumerate(groups) if _before_first_change(group, pairs)
    ]
    # The estimate is known to fail where a token differs (restoring it swaps a whole token).
    exact_groups = [
        index
        for index, group in enumerate(groups)
        if params.exact_residual
        or index in before_change
        or bool((group & (pairs.clean != pairs.corrupted)).any())
    ]
    started = time.perf_counter()
    residual = recovered(residual_patches(model, [groups[index] for index in exact_groups]))
    residual_exact = np.full((n_points, len(groups)), np.nan, dtype=np.float32)
    residual_exact[:, exact_groups] = residual.reshape(n_points, len(exact_groups))
    exact_seconds["residual"] = time.perf_counter() - started
    return AttributionPatchingResult(
        examples=examples,
        clean=clean,
        corrupted=corrupted,
        residual_labels=[
            *[f"before block {layer}" for layer in range(model.cfg.n_layers)],
            "after the last block",
        ],
        roles=roles,
        heads_estimate=(heads_estimate / recovery.span).numpy(),
        heads_exact=heads_exact.reshape(model.cfg.n_layers, model.cfg.n_heads),
        mlps_estimate=(mlps_estimate / recovery.span).numpy(),
        mlps_exact=mlps_exact,
        residual_estimate=(residual_estimate / recovery.span).numpy(),
        residual_exact=residual_exact,
        residual_groups_before_change=[roles[index] for index in before_change],
        attribution_seconds=attribution_seconds,
        exact_seconds=exact_seconds,
        pairs_kind="your" if params.prompts == "pairs" else "IOI",
        metric=None if params.metric is None else metric_name(params.metric, qualified=True),
    )


def _before_first_change(group: Bool[Tensor, "batch pos"], pairs: PromptPairs) -> bool:
    """Whether a position group lies wholly before the first token the prompts differ in.

    Restoring it then changes nothing, so its exact value is known without a run.
    """
    import torch

    changed = pairs.clean != pairs.corrupted
    first_change = torch.where(changed.any(1), changed.int().argmax(1), changed.shape[1])
    before = torch.arange(changed.shape[1])[None] < first_change[:, None]
    return not bool((group & ~before).any())


def _scatter(
    axes,
    estimate: NDArray,
    exact: NDArray,
    labels: list[str],
    colour: str,
    name: str,
    marker: str = "o",
) -> None:
    axes.scatter(exact, estimate, s=14, alpha=0.7, color=colour, marker=marker, label=name)
    worst = np.argsort(-np.abs(estimate - exact))[:4]
    strongest = np.argsort(-np.abs(exact))[:3]
    visible = 0.05 * float(
        np.abs(np.r_[estimate, exact]).max()
    )  # labels near the origin would only overlap
    for index in {*worst.tolist(), *strongest.tolist()}:
        if max(abs(estimate[index]), abs(exact[index])) < visible:
            continue
        axes.annotate(
            labels[index],
            (exact[index], estimate[index]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )


def _diagonal(axes, values: NDArray) -> None:
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    axes.plot(
        [low, high],
        [low, high],
        color="grey",
        linewidth=0.8,
        linestyle="--",
        label="estimate = exact",
    )
    axes.axhline(0, color="black", linewidth=0.4)
    axes.axvline(0, color="black", linewidth=0.4)


ESTIMATE_OFF = 0.1
"""|estimate - exact| (share recovered) from which figure 03 outlines a residual cell."""
AGREEMENT_BOX = {"facecolor": "white", "alpha": 0.85, "edgecolor": "lightgrey"}


def _agreement_text(name: str, found: dict[str, Any]) -> str:
    """One component kind's agreement in a few lines: all, above the quoted threshold, top k."""

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    above = found["above_threshold"][-1]
    overlaps = ", ".join(
        f"top {k}: {shared} of {k}" for k, shared in found["top_k_overlap"].items()
    )
    return (
        f"{name}: Pearson {number(found['pearson'])}, "
        f"Spearman {number(found['spearman'])} (all {found['n']})\n"
        f"  |exact| >= {above['threshold']:g} ({above['n']}): "
        f"Pearson {number(above['pearson'])}, Spearman {number(above['spearman'])}\n"
        f"  largest |exact| among largest |estimate|: {overlaps or 'n/a'}"
    )


def _exact_beside_estimate(
    axes: Sequence[Axes],
    exact: NDArray,
    estimate: NDArray,
    what: str,
    xlabel: str,
    ylabel: str,
    bound: float,
    missing: str | None = None,
) -> None:
    """Exact patching (left) and its attribution estimate (right) on one symmetric colour scale.

    ``missing`` colours the cells with no value (NaN), where there are any.
    """
    from unraveled.render.figures import heatmap

    for panel, values, name in (
        (axes[0], exact, "exact patching"),
        (axes[1], estimate, "attribution estimate"),
    ):
        heatmap(
            panel,
            values,
            f"{what}, {name}",
            xlabel,
            ylabel,
            cmap="RdBu_r",
            colorbar_label="share recovered",
            centre_zero=True,
        )
        image = panel.images[0]
        if missing is not None:
            image.set_cmap(image.get_cmap().with_extremes(bad=missing))
        image.set_clim(-bound, bound)


def _mark_cells(axes, cells: Bool[NDArray, "row col"], gid: str, **style: Any) -> None:
    """A rectangle over each marked cell of a heatmap, tagged ``gid``.

    The figure's own legend names the tag; tests find the marks by it.
    """
    from matplotlib.patches import Rectangle

    for row, col in zip(*np.nonzero(cells), strict=True):
        axes.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, gid=gid, **style))


def render(result: AttributionPatchingResult) -> Iterator[Artifact]:
    """Estimate against exact: scatter plots, head grids and the residual stream's grid."""
    from matplotlib.patches import Patch as LegendPatch

    from unraveled.render.figures import panels

    agreements = result.agreements()
    n_layers, n_heads = result.heads_exact.shape
    head_labels = [
        str(HeadComponent(layer, head)) for layer in range(n_layers) for head in range(n_heads)
    ]
    exact_cells = ~np.isnan(result.residual_exact)
    estimate_only = [
        role
        for role, exact in zip(result.roles, result.residual_has_exact(), strict=True)
        if not exact
    ]

    figure, axes = panels(2)
    _diagonal(
        axes[0],
        np.r_[
            result.heads_exact.ravel(),
            result.heads_estimate.ravel(),
            result.mlps_exact,
            result.mlps_estimate,
        ],
    )
    _scatter(
        axes[0],
        result.heads_estimate.ravel(),
        result.heads_exact.ravel(),
        head_labels,
        "royalblue",
        "heads",
    )
    _scatter(
        axes[0],
        result.mlps_estimate,
        result.mlps_exact,
        [f"MLP {layer}" for layer in range(n_layers)],
        "darkorange",
        "MLPs",
        marker="s",
    )
    axes[0].set(
        title="Heads and MLPs",
        xlabel="exact activation patching (share recovered)",
        ylabel="attribution patching estimate",
    )
    axes[0].legend(fontsize=7, loc="lower right")
    text = "\n".join(
        [_agreement_text("Heads", agreements["heads"]), _agreement_text("MLPs", agreements["mlps"])]
    )
    axes[0].text(
        0.02,
        0.98,
        text,
        transform=axes[0].transAxes,
        fontsize=6,
        ha="left",
        va="top",
        family="monospace",
        bbox=AGREEMENT_BOX,
    )
    exact_residual, estimated_residual = (
        result.residual_exact[exact_cells],
        result.residual_estimate[exact_cells],
    )
    _diagonal(axes[1], np.r_[exact_residual, estimated_residual])
    layers = np.nonzero(exact_cells)[0]
    points = axes[1].scatter(exact_residual, estimated_residual, c=layers, cmap="viridis", s=14)
    axes[1].figure.colorbar(points, ax=axes[1], label="residual point (0 = before block 0)")
    labels = [
        f"L{point} {result.roles[role]}"
        for point, role in zip(*np.nonzero(exact_cells), strict=True)
    ]
    for index in np.argsort(-np.abs(estimated_residual - exact_residual))[:4]:
        axes[1].annotate(
            labels[index],
            (exact_residual[index], estimated_residual[index]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    patched = ", ".join(role for role in result.roles if role not in estimate_only)
    axes[1].set(
        title=f"Residual stream, exactly patched groups ({patched})",
        xlabel="exact activation patching (share recovered)",
        ylabel="attribution patching estimate",
    )
    axes[1].text(
        0.02,
        0.98,
        _agreement_text("Residual", agreements["residual"]),
        transform=axes[1].transAxes,
        fontsize=6,
        ha="left",
        va="top",
        family="monospace",
        bbox=AGREEMENT_BOX,
    )
    seconds = sum(result.exact_seconds.values())
    figure.suptitle(
        f"Attribution patching against exact patching, {len(result.examples)} "
        f"{result.pairs_kind} pairs"
        + ("" if result.metric is None else f", metric {result.metric.rsplit('.', 1)[-1]}")
        + " "
        f"(attribution {result.attribution_seconds:.1f} s, exact {seconds:.1f} s)"
    )
    compared = "every head and MLP, and the residual stream at " + (
        patched
        if not estimate_only
        else f"{patched} ({', '.join(estimate_only)}: estimate only, exact_residual is off)"
    )
    yield Figure(
        "01_estimate_vs_exact",
        figure,
        f"Attribution-patching estimate against exact activation patching: {compared}",
    )

    figure, axes = panels(2)
    bound = (
        float(np.abs(np.r_[result.heads_exact.ravel(), result.heads_estimate.ravel()]).max()) or 1.0
    )
    overlaps = ", ".join(
        f"{shared} of the top {k}" for k, shared in agreements["heads"]["top_k_overlap"].items()
    )
    _exact_beside_estimate(
        axes, result.heads_exact, result.heads_estimate, "Heads", "Head", "Layer", bound
    )
    figure.suptitle(
        f"Of the heads with the largest |exact| effect, the estimate ranks {overlaps} among its "
        "own largest"
    )
    yield Figure(
        "02_heads_exact_and_estimate",
        figure,
        "Every head restored from the clean run: exact and estimated share recovered",
    )

    figure, axes = panels(2)
    bound = (
        max(
            float(np.nanmax(np.abs(values)))
            for values in (result.residual_estimate, result.residual_exact)
        )
        or 1.0
    )
    off = exact_cells & (
        np.abs(np.nan_to_num(result.residual_exact) - result.residual_estimate) > ESTIMATE_OFF
    )
    _exact_beside_estimate(
        axes,
        result.residual_exact,
        result.residual_estimate,
        "Residual stream",
        "Position group",
        "",
        bound,
        missing="lightgrey",
    )
    for panel in axes:
        panel.set_xticks(range(len(result.roles)), result.roles)
        panel.set_yticks(
            range(0, len(result.residual_labels), 2), result.residual_labels[::2], fontsize=6
        )
    legend = []
    if estimate_only:
        for panel in axes:
            _mark_cells(
                panel,
                ~exact_cells,
                "estimate_only",
                facecolor="none",
                edgecolor="grey",
                hatch="//",
                linewidth=0,
            )
        legend.append(
            LegendPatch(
                facecolor="white",
                edgecolor="grey",
                hatch="//",
                label="estimate only: not patched exactly (exact_residual is off)",
            )
        )
    if off.any():
        _mark_cells(
            axes[1], off, "estimate_off", facecolor="none", edgecolor="black", linewidth=1.2
        )
        legend.append(
            LegendPatch(
                facecolor="none",
                edgecolor="black",
                linewidth=1.2,
                label=f"estimate off by more than {ESTIMATE_OFF:g} from exact",
            )
        )
    if legend:
        figure.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8)
    figure.set_size_inches(11, 7.5)
    yield Figure(
        "03_residual_exact_and_estimate",
        figure,
        "The residual stream restored per layer and position group: exact (where patched) and "
        "estimated",
    )


def check_before_loading(
    params: AttributionPatchingParams,
    tokenizer: PreTrainedTokenizerBase | None,
    n_ctx: int | None,
) -> None:
    """Your own pairs, against the tokenizer: prompts that fit, one-token answers, equal lengths."""
    if params.prompts == "pairs" and tokenizer is not None:
        check_pairs(params, tokenizer, n_ctx)


def check(model: HookedTransformer, params: AttributionPatchingParams) -> None:
    """Every IOI name must be one token for this model; your own pairs as before loading."""
    from unraveled.datasets.ioi import check_ioi_names

    if params.prompts == "pairs":
        check_pairs(params, model.tokenizer, model.cfg.n_ctx)
    else:
        check_ioi_names(model, params.ioi)


EXPERIMENT = Experiment(
    title="Attribution patching",
    params=AttributionPatchingParams,
    compute=compute,
    render=render,
    check=check,
    check_before_loading=check_before_loading,
    needs=frozenset({"hook_names"}),  # activations and gradients kept by their hook's name
)
