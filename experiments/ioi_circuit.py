"""The IOI circuit by edge attribution patching, and how faithful it is.

Edge attribution patching (Syed, Rager and Conmy 2023) scores every edge between components (the
embeddings, each head through its query, key and value inputs, each MLP, the logits) with one
forward and one backward pass on the clean prompts: (corrupted - clean output of the upstream
component) . gradient of the logit difference at the downstream input, summed over positions and
averaged over prompts. A large negative score is an edge whose corruption would cost the clean
answer. Edges are ranked by absolute score, as in the paper.

Faithfulness, node level: the clean prompts run with only the circuit's components computed
normally, and every other component's output (embeddings, heads, MLPs) replaced by its output on
the corrupted prompts. The share of the clean logit difference this keeps is reported for
circuits of growing size: the embeddings first (the input every circuit computes on; their
first-order score is poor, as the swap of a whole token is far from linear), then heads and MLPs
ranked by their own attribution (the sum of their outgoing edges), beside circuits of the same
sizes whose heads and MLPs are drawn at random, ``random_draws`` times: the share a single random
circuit keeps depends on which components it happens to draw, so one draw is no baseline; their
mean and their spread are reported. Everything kept gives exactly the clean run (1), nothing kept
exactly the corrupted run (0).

With ``prompts: pairs`` the same runs over your own pairs (``unraveled.datasets.pairs``); from
Python, ``metric`` replaces the logit difference in the edge scores and both faithfulness curves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.components import (
    EMBEDDINGS,
    LOGITS,
    HeadComponent,
    MLPComponent,
    parse_component,
)
from unraveled.datasets.ioi import IOIParams
from unraveled.datasets.pairs import PatchingMetricParams, check_pairs, metric_name
from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from torch import Tensor
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

    from unraveled.patching import Metric, PromptPairs

Count = Annotated[int, Field(ge=1, le=1_000_000)]

FAITHFULNESS_ROWS = 32
"""Rows per patched pass of the faithfulness curves: half the patching core's default, since every
copy of the batch in them patches many components (so holds more per row); rows are independent,
so the logit differences are the same."""
INPUT_COLOURS = {
    "q": "tab:blue",
    "k": "tab:green",
    "v": "tab:purple",
    "mlp": "tab:orange",
    "logits": "black",
}


class IOICircuitParams(PatchingMetricParams):
    """The IOI pairs or yours, how many edges to show, and the circuits the curves keep."""

    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = (
        *PatchingMetricParams.OMITTED_AT_DEFAULT,
        "prompts",
    )
    prompts: Literal["ioi", "pairs"] = Field(
        "ioi",
        description="ioi: the IOI pairs of params.ioi; pairs: your own, in params.pairs or "
        "params.pairs_file.",
    )
    ioi: IOIParams = Field(default_factory=IOIParams, description="The IOI prompt pairs.")
    top_edges: int = Field(
        30, ge=1, le=500, description="Edges drawn in the circuit figure and listed in the metrics."
    )
    circuit_sizes: list[Count] = Field(
        max_length=32,
        default_factory=lambda: [1, 2, 3, 5, 10, 20, 40, 80, 160],
        description="Numbers of components kept for the faithfulness curve (0 and all are "
        "always added).",
    )
    edge_counts: list[Count] = Field(
        max_length=16,
        default_factory=lambda: [30, 300, 3000],
        description="Numbers of edges kept for the edge-level faithfulness curve (0 and all "
        "are always added); empty to skip it.",
    )
    random_draws: int = Field(
        10,
        ge=1,
        le=100,
        description="Random circuits drawn per size for the baseline; their mean and spread "
        "are shown.",
    )


@dataclass(frozen=True)
class IOICircuitResult:
    """Edge and component scores, and the faithfulness of circuits of growing size."""

    n_pairs: int
    clean: dict[str, float]
    corrupted: dict[str, float]
    nodes: list[str]
    node_scores: Float[NDArray, " node"]
    edges: list[dict[str, Any]]
    edge_sum_error: float
    n_edges: int
    sizes: list[int]
    faithfulness: Float[NDArray, " size"]
    random_faithfulness: Float[NDArray, "draw size"]
    edge_counts: list[int]
    edge_faithfulness: Float[NDArray, " count"]
    n_layers: int
    n_heads: int
    seconds: dict[str, float]
    metric: str | None = None
    """The custom metric's qualified name; None for the logit difference."""
    metric_label: str = "logit difference"
    """How figures name the metric."""

    def metrics(self) -> dict[str, Any]:
        """The numbers of metrics.json."""
        ranked = np.argsort(-np.abs(self.node_scores), kind="stable")
        reached = [
            size for size, kept in zip(self.sizes, self.faithfulness, strict=True) if kept >= 0.8
        ]
        draws = self.random_faithfulness
        scored = "logit difference" if self.metric is None else f"metric {self.metric}"
        return {
            "n_pairs": self.n_pairs,
            **({} if self.metric is None else {"metric": self.metric}),
            "clean": self.clean,
            "corrupted": self.corrupted,
            "scores": f"estimated change of the mean {scored} when the edge (or "
            "component) alone is corrupted"
            + (", in logits" if self.metric is None else ", in its units"),
            "n_edges_scored": self.n_edges,
            "top_edges": self.edges,
            "top_components": [
                {"component": self.nodes[i], "score": float(self.node_scores[i])}
                for i in ranked[:20]
            ],
            "edge_scores_sum_to_component_scores_max_error": self.edge_sum_error,
            "faithfulness": {
                "method": "components outside the circuit take their outputs on the corrupted "
                "prompts",
                "circuit_sizes": self.sizes,
                "share_of_clean_logit_difference_kept": self.faithfulness,
                "random_circuits_of_the_same_sizes": {
                    "draws": len(draws),
                    "mean": draws.mean(0),
                    "min": draws.min(0),
                    "max": draws.max(0),
                    "per_draw": draws,
                },
                "smallest_tested_size_keeping_80_percent": reached[0] if reached else None,
                "smallest_tested_size_note": "the smallest of circuit_sizes whose share kept is "
                "at least 0.8; sizes between those tested are not run, so a smaller circuit may "
                "also keep 80% (the curve need not rise steadily)",
            },
            "edge_faithfulness": {
                "method": "each head's query/key/value input, each MLP's input and the logits' "
                "input get the corrupted value plus the current minus corrupted output of the "
                "upstream components whose edge is kept",
                "edges_kept": self.edge_counts,
                "share_of_clean_logit_difference_kept": self.edge_faithfulness,
            },
            "seconds": self.seconds,
        }


def circuit_faithfulness(
    model: HookedTransformer,
    pairs: PromptPairs,
    nodes: list[str],
    dropped: list[list[int]],
    corrupted_cache: Any,
    metric: Metric | None = None,
) -> Float[Tensor, "circuit batch"]:
    """The clean prompts' metric with some components patched from the corrupted run.

    Circuit i patches the components ``dropped[i]`` (indices into ``nodes``) and keeps every
    other one. The metric is the logit difference unless ``metric`` is given.
    """
    from unraveled.patching import component_patches, logit_difference, patched_metric

    # Each component's patches built once and shared by every circuit that drops it.
    patches = [component_patches(node, model) for node in nodes]
    patch_sets = [[patch for index in indices for patch in patches[index]] for indices in dropped]
    return patched_metric(
        model,
        pairs,
        patch_sets,
        corrupted_cache,
        base="clean",
        metric=metric or logit_difference,
        max_rows=FAITHFULNESS_ROWS,
    )


def compute(model: HookedTransformer, params: IOICircuitParams, seed: int) -> IOICircuitResult:
    """Score every edge, then run circuits of growing size by node and by edge."""
    import torch

    from unraveled.datasets.ioi import corrupted_prompts_answer, ioi_batch
    from unraveled.patching import (
        Recovery,
        answer_summary,
        circuit_hooks,
        edge_attribution,
        edge_circuit_metric,
        logit_difference,
        run_cache,
        user_pairs,
    )

    if params.prompts == "pairs":
        pairs = user_pairs(model, [row.pair for row in params.rows()])
        field, corrupted_answer = params.pairs_field, "incorrect"
    else:
        pairs = ioi_batch(model, params.ioi, seed).tokens
        field, corrupted_answer = "params.ioi", corrupted_prompts_answer(params.ioi)
    metric = params.metric or logit_difference
    clean_logits, _ = run_cache(model, pairs, "clean", [])
    started = time.perf_counter()
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", circuit_hooks(model))
    scores = edge_attribution(model, pairs, corrupted_cache, base="clean", metric=metric)
    edge_seconds = time.perf_counter() - started
    clean, corrupted = (
        answer_summary(clean_logits, pairs),
        answer_summary(corrupted_logits, pairs, corrupted_answer),
    )
    recovery = Recovery.of(
        metric, clean_logits, corrupted_logits, pairs, field, metric_name(params.metric)
    )

    matrix = scores.scores.numpy()
    valid = ~np.isnan(matrix)
    flat = np.flatnonzero(valid)
    top = flat[np.argsort(-np.abs(matrix.flat[flat]), kind="stable")[: params.top_edges]]
    edges = []
    for index in top:
        up, down = np.unravel_index(index, matrix.shape)
        target = parse_component(scores.downstream[down])
        to, kind = (
            (str(target.whole_head), target.input)
            if isinstance(target, HeadComponent)
            else (str(target), "logits" if target == LOGITS else "mlp")
        )
        edges.append(
            {
                "from": scores.upstream[up],
                "to": to,
                "input": kind,
                "score": float(matrix[up, down]),
            }
        )
    edge_sum_error = float(np.abs(np.nansum(matrix, axis=1) - scores.nodes.numpy()).max())

    nodes, node_scores = scores.upstream, scores.nodes.numpy()
    sizes = sorted(
        {0, len(nodes), *[size for size in params.circuit_sizes if 0 < size < len(nodes)]}
    )
    # The embeddings come first in every circuit: they are the input the circuit computes on.
    ranked = [
        0,
        *[
            index
            for index in np.argsort(-np.abs(node_scores), kind="stable").tolist()
            if index != 0
        ],
    ]
    rng = random.Random(seed)
    draws = []
    for _ in range(params.random_draws):
        shuffled = list(range(1, len(nodes)))
        rng.shuffle(shuffled)
        draws.append([0, *shuffled])
    # Nothing kept, the embeddings alone and everything kept are the same circuits in every
    # order: run once, with the ranked ones; each draw runs only the sizes in between.
    between = [index for index, size in enumerate(sizes) if 1 < size < len(nodes)]
    started = time.perf_counter()
    dropped = [ranked[size:] for size in sizes] + [
        order[sizes[index] :] for order in draws for index in between
    ]
    kept = circuit_faithfulness(model, pairs, nodes, dropped, corrupted_cache, metric)
    faithfulness_seconds = time.perf_counter() - started
    shares = recovery.share(kept).numpy()
    ranked_shares = shares[: len(sizes)]
    random_shares = np.tile(ranked_shares, (params.random_draws, 1))
    random_shares[:, between] = shares[len(sizes) :].reshape(params.random_draws, len(between))

    edge_counts = (
        sorted({0, len(flat), *[count for count in params.edge_counts if 0 < count < len(flat)]})
        if params.edge_counts
        else []
    )
    edge_shares, edge_faithfulness_seconds = np.zeros(len(edge_counts)), 0.0
    if edge_counts:
        started = time.perf_counter()
        by_score = flat[np.argsort(-np.abs(matrix.flat[flat]), kind="stable")]
        masks = torch.zeros(len(edge_counts), *matrix.shape, dtype=torch.bool)
        for row, count in enumerate(edge_counts):
            masks[row].view(-1)[torch.from_numpy(by_score[:count])] = True
        edge_kept = edge_circuit_metric(model, pairs, corrupted_cache, masks, metric)
        edge_shares = recovery.share(edge_kept).numpy()
        edge_faithfulness_seconds = time.perf_counter() - started
    return IOICircuitResult(
        n_pairs=pairs.size,
        clean=clean,
        corrupted=corrupted,
        nodes=nodes,
        node_scores=node_scores,
        edges=edges,
        edge_sum_error=edge_sum_error,
        n_edges=int(valid.sum()),
        sizes=sizes,
        faithfulness=ranked_shares,
        random_faithfulness=random_shares,
        edge_counts=edge_counts,
        edge_faithfulness=edge_shares,
        n_layers=model.cfg.n_layers,
        n_heads=model.cfg.n_heads,
        seconds={
            "edge_attribution": edge_seconds,
            "node_faithfulness": faithfulness_seconds,
            "edge_faithfulness": edge_faithfulness_seconds,
        },
        metric=None if params.metric is None else metric_name(params.metric, qualified=True),
        metric_label=metric_name(params.metric),
    )


def _position(node: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Where a component sits in the circuit figure.

    Layer upwards, head across, MLPs on the right; the embeddings below, the logits above.
    """
    component = parse_component(node)
    if isinstance(component, HeadComponent):
        return float(component.head), float(component.layer)
    if isinstance(component, MLPComponent):
        return float(n_heads) + 0.5, component.layer + 0.35
    if component == EMBEDDINGS:
        return (n_heads - 1) / 2, -1.0
    return (n_heads - 1) / 2, float(n_layers)  # the logits


def _label(node: str) -> str:
    component = parse_component(node)
    return f"MLP {component.layer}" if isinstance(component, MLPComponent) else node


def render(result: IOICircuitResult) -> Iterator[Artifact]:
    """The top edges as a circuit, the faithfulness curves and the component scores."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    from unraveled.render.figures import panels

    figure, (axes,) = panels(1)
    figure.set_size_inches(11, max(8.0, 0.42 * result.n_layers + 3))
    largest = max(abs(edge["score"]) for edge in result.edges) or 1.0
    shown = {edge["from"] for edge in result.edges} | {edge["to"] for edge in result.edges}
    for edge in result.edges:
        start = _position(edge["from"], result.n_layers, result.n_heads)
        end = _position(edge["to"], result.n_layers, result.n_heads)
        axes.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=9,
                connectionstyle="arc3,rad=0.12",
                color=INPUT_COLOURS[edge["input"]],
                linewidth=0.6 + 3.5 * abs(edge["score"]) / largest,
                linestyle="-" if edge["score"] < 0 else "--",
                alpha=0.75,
                shrinkA=7,
                shrinkB=7,
            )
        )
    for node in shown:
        x, y = _position(node, result.n_layers, result.n_heads)
        axes.text(
            x,
            y,
            _label(node),
            ha="center",
            va="center",
            fontsize=8,
            zorder=3,
            bbox={
                "boxstyle": "round,pad=0.25",
                "facecolor": (
                    "lightyellow"
                    if isinstance(parse_component(node), HeadComponent)
                    else "lightgrey"
                ),
                "edgecolor": "grey",
            },
        )
    axes.set_xlim(-1, result.n_heads + 1.5)
    axes.set_ylim(-1.8, result.n_layers + 0.8)
    axes.set_yticks(
        range(result.n_layers), [str(layer) for layer in range(result.n_layers)], fontsize=7
    )
    axes.set_xticks(
        [*range(result.n_heads), result.n_heads + 0.5],
        [*[str(h) for h in range(result.n_heads)], "MLP"],
        fontsize=7,
    )
    axes.set(
        xlabel="Head",
        ylabel="Layer",
        title=f"The top {len(result.edges)} edges by |edge attribution| (width: |score|)",
    )
    axes.grid(alpha=0.2)
    handles = [
        Line2D([], [], color=colour, label=f"into {kind}") for kind, colour in INPUT_COLOURS.items()
    ]
    handles += [
        Line2D(
            [],
            [],
            color="grey",
            linestyle="-",
            label=f"corrupting it lowers the {result.metric_label}",
        ),
        Line2D(
            [],
            [],
            color="grey",
            linestyle="--",
            label=f"corrupting it raises the {result.metric_label}",
        ),
    ]
    axes.legend(
        handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=4
    )
    yield Figure(
        "01_circuit_edges",
        figure,
        "The IOI circuit's strongest edges (labels L.H: layer.head; q, k, v: which input of the "
        "head)",
    )

    figure, axes_list = panels(2 if result.edge_counts else 1)
    axes = axes_list[0]
    figure.set_size_inches(13 if result.edge_counts else 8, 4.5)
    sizes = np.array(result.sizes)
    axes.plot(
        np.maximum(sizes, 0.5),
        result.faithfulness,
        marker="o",
        label="top components by |attribution|",
    )
    draws = result.random_faithfulness
    axes.fill_between(
        np.maximum(sizes, 0.5),
        draws.min(0),
        draws.max(0),
        color="grey",
        alpha=0.25,
        linewidth=0,
        label=f"random components: lowest to highest of {len(draws)} draws",
    )
    axes.plot(
        np.maximum(sizes, 0.5),
        draws.mean(0),
        marker="x",
        color="grey",
        label=f"random components: mean of {len(draws)} draws",
    )
    axes.axhline(1, color="black", linewidth=0.6, linestyle=":")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xscale("log")
    axes.set(
        title=f"Faithfulness: share of the clean {result.metric_label} kept by the circuit alone\n"
        "(everything outside it takes its corrupted output)",
        xlabel="components kept (1 = the embeddings alone; then heads and MLPs; 0 plotted at 0.5)",
        ylabel="share kept (1 clean, 0 corrupted)",
    )
    axes.legend(fontsize=8)
    if result.edge_counts:
        edges_axes = axes_list[1]
        edges_axes.plot(
            np.maximum(result.edge_counts, 0.5),
            result.edge_faithfulness,
            marker="o",
            color="tab:red",
        )
        edges_axes.axhline(1, color="black", linewidth=0.6, linestyle=":")
        edges_axes.axhline(0, color="black", linewidth=0.6)
        edges_axes.set_xscale("log")
        edges_axes.set(
            title="Edge level: only the top edges carry clean information",
            xlabel=f"edges kept, by |edge attribution| (of {result.n_edges}; 0 plotted at 0.5)",
            ylabel="share kept",
        )
    yield Figure(
        "02_faithfulness",
        figure,
        f"Faithfulness of circuits of growing size, against {len(draws)} random circuits of "
        "each size",
    )

    figure, (axes,) = panels(1)
    heads = np.array(
        [
            [
                result.node_scores[result.nodes.index(str(HeadComponent(layer, head)))]
                for head in range(result.n_heads)
            ]
            for layer in range(result.n_layers)
        ]
    )
    mlps = np.array(
        [
            result.node_scores[result.nodes.index(str(MLPComponent(layer)))]
            for layer in range(result.n_layers)
        ]
    )
    values = np.c_[heads, np.full(result.n_layers, np.nan), mlps]
    bound = float(np.nanmax(np.abs(values))) or 1.0
    image = axes.imshow(
        values, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest"
    )
    figure.colorbar(
        image, ax=axes, label=f"estimated change of the {result.metric_label} when corrupted"
    )
    axes.set_xticks(
        [*range(result.n_heads), result.n_heads + 1],
        [*[str(h) for h in range(result.n_heads)], "MLP"],
    )
    axes.set(
        title=f"Component attribution (embeddings: {result.node_scores[0]:.2f})",
        xlabel="Head",
        ylabel="Layer",
    )
    yield Figure(
        "03_component_scores",
        figure,
        "Each head's and MLP's attribution: the sum of its outgoing edges",
    )


def check_before_loading(
    params: IOICircuitParams, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """Your own pairs, against the tokenizer: prompts that fit, one-token answers, equal lengths."""
    if params.prompts == "pairs" and tokenizer is not None:
        check_pairs(params, tokenizer, n_ctx)


def check(model: HookedTransformer, params: IOICircuitParams) -> None:
    """Every IOI name must be one token for this model; your own pairs as before loading."""
    from unraveled.datasets.ioi import check_ioi_names

    if params.prompts == "pairs":
        check_pairs(params, model.tokenizer, model.cfg.n_ctx)
    else:
        check_ioi_names(model, params.ioi)


EXPERIMENT = Experiment(
    title="IOI circuit (edge attribution patching)",
    params=IOICircuitParams,
    compute=compute,
    render=render,
    check=check,
    check_before_loading=check_before_loading,
    needs=frozenset({"hook_names"}),  # edges' activations kept by their hook's name
)
