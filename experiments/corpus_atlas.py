"""Corpus atlas: what every MLP neuron, residual dimension and attention head does on a corpus.

The corpus is real text, streamed in bounded memory (locally or on Ray); the outputs include an
offline neuron browser.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from jaxtyping import Bool, Float, Int
from numpy.typing import NDArray
from pydantic import Field, field_validator, model_validator

from unraveled.corpus import BUNDLED_PLAYS, MARKDOWN_HANDLING, checked_corpus_sources
from unraveled.errors import ConfigError
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
    Table,
    View,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

    from unraveled.engines.state import AtlasSettings, AtlasState

# Validating a config imports this module: torch, transformer_lens and matplotlib are imported
# inside the functions that need them.
# Every size that allocates is bounded. A window's attention patterns grow with its square; the
# neuron contexts (browser_samples x (before + 1 + after) per neuron and layer) are most of the
# state (GPT-2 small at the bounds: 20 x 65 x 3072 x 12 x 8 bytes, 0.38 GB).
MAX_CONTEXT_TOKENS = 1024
MAX_CONTEXT_SHOWN = 32
HEAD_SCORES = ("entropy", "first_token", "previous_token", "duplicate_token", "induction")

DENSE_FRACTION = 0.5
RESIDUAL_TOP_K = 3  # largest-|value| tokens kept per residual dimension
TOP_HEADS = 5
MASSIVE_SHOWN_PER_LAYER = 5
MASSIVE_WHERE = ("first_position", "other_positions")
DEFINITIONS = {
    "neuron_value": (
        "blocks.L.mlp.hook_post: the neuron's output, what it writes through W_out; mean, std, max "
        "and top-k are of this"
    ),
    "active": (
        "pre-activation > 0 (blocks.L.mlp.hook_pre): for gated MLPs (SmolLM2, Llama) the gate's "
        "pre-activation, for GPT-2 the GELU's input"
    ),
    "dead": "never active on the corpus",
    "dense": f"active on more than {DENSE_FRACTION:.0%} of the corpus tokens",
    "bos": (
        "when the model prepends BOS to each window, that position is left out of the neuron "
        "statistics (it is the same in every window); residual and head statistics keep it"
    ),
    "residual": "blocks.L.hook_resid_post, absolute values per dimension",
    "massive_activation": (
        "Sun et al. 2024, 'Massive Activations in Large Language Models' (arXiv:2402.17762), "
        "section 2: an activation whose |value| is above massive_min_abs (default 100) and at "
        "least massive_ratio (default 1000) times the median |value| of the layer's activations "
        "(every dimension at every position of every window; the median read from a histogram "
        "of |value| with 100 bins per decade, so within 1.2%). A residual dimension is massive "
        "where its largest |value| passes. first_position is the sequence's position 0 (BOS "
        "where the model prepends one, else the window's first token, which differs from window "
        "to window): massive activations sit there whatever its token, so it is counted apart "
        "from every other position, and top tokens come from the other positions only. "
        "massive_activations lists the strongest 5 per layer of each, "
        "massive_dimensions_per_layer counts them all"
    ),
    "head_scores": (
        "per window, means over query positions; then the mean over windows. entropy in nats; "
        "first_token (queries 1.., as query 0 can only attend to itself), previous_token and "
        "duplicate_token as in head_taxonomy, on corpus text; induction: attention to the token "
        "after the latest earlier occurrence of the query's token"
    ),
    "corpus_markup": MARKDOWN_HANDLING,
}


class CorpusAtlasParams(Params):
    """The corpus atlas's parameters: which corpus, how much of it, what to keep, where to run."""

    corpus: list[str] = Field(
        default_factory=list,
        description=(
            "Text files, folders or globs (.txt, .md, .jsonl with 'text'); [] is the bundled "
            f"{BUNDLED_PLAYS} plays. Relative paths are from the working directory."
        ),
    )
    context_tokens: int = Field(
        128,
        ge=2,
        le=MAX_CONTEXT_TOKENS,
        description="Tokens per window (the model's context caps it too).",
    )
    max_tokens: int | None = Field(
        2048,
        ge=2,
        description=(
            "Cap on the tokens analysed (whole windows, chosen as params.sample says); None is "
            "the whole corpus."
        ),
    )
    sample: Literal["spread", "first"] = Field(
        "spread",
        description=(
            "Which windows max_tokens keeps: spread = a seeded uniform choice across the whole "
            "corpus (all of it is read and tokenised); first = the corpus's first windows, "
            "reading stops once they are in hand (fast on a large corpus)."
        ),
    )
    top_k: int = Field(20, ge=1, le=200, description="Top activating tokens kept per neuron.")
    context_before: int = Field(
        8, ge=0, le=MAX_CONTEXT_SHOWN, description="Context tokens shown before a top token."
    )
    context_after: int = Field(
        2, ge=0, le=MAX_CONTEXT_SHOWN, description="Context tokens shown after a top token."
    )
    batch_windows: int = Field(
        2,
        ge=1,
        le=64,
        description="Windows per forward pass (a pass's memory grows with it; larger suits a GPU).",
    )
    browser_samples: int = Field(
        5,
        ge=1,
        le=20,
        description=(
            "Top contexts per neuron kept and shown in the neuron browser "
            "(keeps each page a few MB)."
        ),
    )
    massive_ratio: float = Field(
        1000.0,
        gt=1,
        description=(
            "Times the layer's median |value| (Sun et al. 2024); see metrics' "
            "definitions.massive_activation."
        ),
    )
    massive_min_abs: float = Field(
        100.0,
        ge=0,
        description=(
            "Smallest |value| that can be massive (Sun et al. 2024); see metrics' "
            "definitions.massive_activation."
        ),
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description=(
            "local: this process; ray: shards on Ray workers (RAY_ADDRESS joins a cluster)."
        ),
    )
    ray_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "Ray workers at once; None uses every CPU the cluster can place, and a larger number "
            "is capped at that (with a warning)."
        ),
    )

    @field_validator("corpus")
    @classmethod
    def _sources_exist(cls, sources: list[str]) -> list[str]:
        return checked_corpus_sources(sources)

    @model_validator(mode="after")
    def _at_least_one_window(self) -> CorpusAtlasParams:
        if self.max_tokens is not None and self.max_tokens < self.context_tokens:
            raise ValueError(
                f"max_tokens={self.max_tokens} is less than one window of "
                f"context_tokens={self.context_tokens}; expected at least "
                f"{self.context_tokens}, or null for the whole corpus"
            )
        return self


def check_before_loading(
    params: CorpusAtlasParams, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """Check everything about the corpus that needs no model.

    Every file is read as the run will read it (UTF-8, JSONL, some text) and, with the model's
    tokenizer, must give at least one window of tokens; ``context_tokens`` must be within the
    model's context where it is known.
    """
    from unraveled.corpus import check_corpus

    if n_ctx is not None and params.context_tokens > n_ctx:
        raise ParamError(
            "context_tokens",
            f"{params.context_tokens} tokens exceed the model's context of {n_ctx}",
        )
    try:
        check_corpus(
            params.corpus,
            params.context_tokens,
            tokenizer,
            max_tokens=params.max_tokens,
            sample=params.sample,
        )
    except ConfigError as error:
        raise ParamError(
            (error.field or "params.corpus").removeprefix("params."), error.problem
        ) from None


@dataclass(frozen=True)
class CorpusAtlasResult:
    """The atlas's statistics as arrays, with the text of every token shown, ready to render."""

    corpus: dict[str, Any]
    settings: AtlasSettings
    neuron_count: int
    neuron_mean: Float[NDArray, "layer neuron"]
    neuron_std: Float[NDArray, "layer neuron"]
    neuron_max: Float[NDArray, "layer neuron"]
    active_fraction: Float[NDArray, "layer neuron"]
    top_values: Float[NDArray, "layer k neuron"]
    # Contexts of the first browser_samples top tokens only: the neuron browser's.
    top_context_ids: Int[NDArray, "layer samples neuron context"]
    top_context_values: Float[NDArray, "layer samples neuron context"]
    residual_max_abs: Float[NDArray, "layer d_model"]
    # At the sequence's first position, and the largest at any other (residual_top's first row).
    residual_first_mean_abs: Float[NDArray, "layer d_model"]
    residual_first_max_abs: Float[NDArray, "layer d_model"]
    residual_other_max_abs: Float[NDArray, "layer d_model"]
    # Median |value| of each layer's activations, from a histogram: within median_tolerance.
    residual_median_abs: Float[NDArray, " layer"]
    median_tolerance: float
    residual_top_index: Int[NDArray, "layer k_residual d_model"]
    residual_top_context_ids: Int[NDArray, "layer k_residual d_model context"]
    head_scores: dict[str, Float[NDArray, "layer head"]]
    vocab: dict[int, str]
    massive_ratio: float
    massive_min_abs: float
    browser_samples: int
    sequence_length: int
    tokens_per_second: float

    @property
    def dead(self) -> Bool[NDArray, "layer neuron"]:
        """The neurons never active on the corpus."""
        return self.active_fraction == 0

    @property
    def dense(self) -> Bool[NDArray, "layer neuron"]:
        """The neurons active on more than ``DENSE_FRACTION`` of the corpus tokens."""
        return self.active_fraction > DENSE_FRACTION

    def _context_text(self, ids: Int[NDArray, " context"]) -> str:
        return "".join(self.vocab[int(i)] for i in ids if i >= 0)

    @property
    def massive_threshold(self) -> Float[NDArray, " layer"]:
        """Per layer, the |value| a massive activation must reach (Sun et al. 2024's criterion)."""
        return np.maximum(self.massive_min_abs, self.massive_ratio * self.residual_median_abs)

    def massive_mask(
        self, where: Literal["first_position", "other_positions"]
    ) -> Bool[NDArray, "layer d_model"]:
        """The residual dimensions whose largest |value| at ``where`` is massive."""
        peak = (
            self.residual_first_max_abs
            if where == "first_position"
            else self.residual_other_max_abs
        )
        return (peak > self.massive_min_abs) & (
            peak >= self.massive_ratio * self.residual_median_abs[:, None]
        )

    def massive_activations(
        self, where: Literal["first_position", "other_positions"]
    ) -> list[dict[str, Any]]:
        """The massive residual dimensions at ``where``, strongest few per layer.

        At the other positions, each comes with the tokens it peaks on (the first position is
        every window's, so no token of its own is a trigger).
        """
        found = []
        first = 1 if self.settings.prepend_bos else 0
        centre = self.settings.context_before
        for layer, dim in zip(*np.nonzero(self.massive_mask(where)), strict=True):
            entry: dict[str, Any] = {"layer": int(layer), "dim": int(dim)}
            if where == "first_position":
                peak = float(self.residual_first_max_abs[layer, dim])
                entry |= {
                    "max_abs": peak,
                    "mean_abs": float(self.residual_first_mean_abs[layer, dim]),
                }
            else:
                peak = float(self.residual_other_max_abs[layer, dim])
                tokens = []
                for slot in range(self.residual_top_index.shape[1]):
                    ids = self.residual_top_context_ids[layer, slot, dim]
                    if ids[centre] < 0:
                        continue
                    position = int(self.residual_top_index[layer, slot, dim] % self.sequence_length)
                    tokens.append(
                        {
                            "token": self.vocab[int(ids[centre])],
                            "position_in_window": position - first,
                            "context": self._context_text(ids),
                        }
                    )
                entry |= {"max_abs": peak, "top_tokens": tokens}
            entry["ratio_to_median"] = (
                peak / self.residual_median_abs[layer]
                if self.residual_median_abs[layer] > 0
                else float("inf")
            )
            found.append(entry)
        # The strongest few per layer.
        found.sort(key=lambda entry: (entry["layer"], -entry["max_abs"]))
        shown: list[dict[str, Any]] = []
        for entry in found:
            if sum(kept["layer"] == entry["layer"] for kept in shown) < MASSIVE_SHOWN_PER_LAYER:
                shown.append(entry)
        return shown

    def metrics(self) -> dict[str, Any]:
        """The atlas's numbers for metrics.json, with the definitions they follow."""
        from unraveled.heads import top_heads

        n_neurons = self.active_fraction.shape[1]
        order = np.argsort(-self.residual_max_abs, axis=1)[:, :3]
        return {
            "definitions": DEFINITIONS,
            "corpus": self.corpus,
            "tokens_per_second": self.tokens_per_second,
            "neurons_per_layer": n_neurons,
            "tokens_per_neuron_statistic": self.neuron_count,
            "dead_neurons_per_layer": self.dead.sum(axis=1),
            "dense_neurons_per_layer": self.dense.sum(axis=1),
            "dead_neurons_total": int(self.dead.sum()),
            "dense_neurons_total": int(self.dense.sum()),
            "mean_active_fraction_per_layer": self.active_fraction.mean(axis=1),
            "median_active_fraction_per_layer": np.median(self.active_fraction, axis=1),
            "residual_largest_dims_per_layer": [
                [{"dim": int(d), "max_abs": float(self.residual_max_abs[layer, d])} for d in dims]
                for layer, dims in enumerate(order)
            ],
            "residual_median_abs_per_layer": self.residual_median_abs,
            "residual_median_abs_relative_tolerance": self.median_tolerance,
            "massive_criterion": {
                "min_abs": self.massive_min_abs,
                "ratio_to_median": self.massive_ratio,
            },
            "massive_threshold_per_layer": self.massive_threshold,
            "residual_largest_first_position_per_layer": self.residual_first_max_abs.max(axis=1),
            "residual_largest_other_positions_per_layer": self.residual_other_max_abs.max(axis=1),
            "massive_dimensions_per_layer": {
                where: self.massive_mask(where).sum(axis=1) for where in MASSIVE_WHERE
            },
            "massive_activations": {
                where: self.massive_activations(where) for where in MASSIVE_WHERE
            },
            "head_scores": self.head_scores,
            "top_heads": {
                name: top_heads(self.head_scores[name], TOP_HEADS, lowest=name == "entropy")
                for name in HEAD_SCORES
            },
            "neuron_table": (
                "neurons.npz: one row per (layer, neuron); "
                "pandas.DataFrame(dict(numpy.load('neurons.npz')))"
            ),
        }


def atlas_settings(params: CorpusAtlasParams, prepend_bos: bool) -> AtlasSettings:
    """What the engines keep for ``params``: the one place the atlas's state sizes come from."""
    from unraveled.engines.state import AtlasSettings

    return AtlasSettings(
        top_k=params.top_k,
        context_before=params.context_before,
        context_after=params.context_after,
        residual_top_k=RESIDUAL_TOP_K,
        batch_windows=params.batch_windows,
        prepend_bos=prepend_bos,
        neuron_contexts=params.browser_samples,
    )


def compute(model: HookedTransformer, params: CorpusAtlasParams, seed: int) -> CorpusAtlasResult:
    """Stream the corpus's windows through ``model`` on ``params.engine`` and summarise them."""
    from unraveled.corpus import corpus_windows
    from unraveled.engines import run_engine
    from unraveled.phases import phase_done

    prepend_bos = bool(model.cfg.default_prepend_bos)
    if params.context_tokens + prepend_bos > model.cfg.n_ctx:
        raise ConfigError(
            "corpus_atlas",
            "params.context_tokens",
            f"{params.context_tokens} tokens (+ BOS) exceed the model's context of "
            f"{model.cfg.n_ctx}",
        )
    windows = corpus_windows(
        model.tokenizer,
        params.corpus,
        params.context_tokens,
        params.max_tokens,
        seed,
        origin="corpus_atlas",
        sample=params.sample,
    )
    settings = atlas_settings(params, prepend_bos)
    started = time.perf_counter()
    state = run_engine(params.engine, model, windows.tokens, settings, workers=params.ray_workers)
    seconds = time.perf_counter() - started
    # The batches' freed temporaries are holes in the heap that the summary's arrays, mapped
    # afresh, don't reuse: a run hands them back here (a notebook's process is left alone).
    phase_done()
    result = summarise(
        state,
        model,
        settings,
        params,
        {
            "sources": windows.sources,
            "documents": windows.n_documents,
            "corpus_tokens": windows.corpus_tokens,
            "windows": len(windows.tokens),
            "tokens_analysed": windows.n_tokens,
            "context_tokens": params.context_tokens,
            "max_tokens": params.max_tokens,
            "sample": params.sample,
            "seed": seed,
            "engine": params.engine,
            "prepend_bos": prepend_bos,
            "window_starts_first_10": windows.start[:10],
        },
        windows.n_tokens / seconds,
    )
    return result


def summarise(
    state: AtlasState,
    model: HookedTransformer,
    settings: AtlasSettings,
    params: CorpusAtlasParams,
    corpus: dict[str, Any],
    tokens_per_second: float,
) -> CorpusAtlasResult:
    """The merged state as arrays for rendering, with the text of every token shown."""
    neuron_top = {
        name: np.stack([getattr(top, name) for top in state.neuron_top])
        for name in ("values", "context_ids", "context_values")
    }
    residual_top = {
        name: np.stack([getattr(top, name) for top in state.residual_top])
        for name in ("values", "index", "context_ids")
    }
    top_context_ids, residual_top_context_ids = (
        neuron_top["context_ids"],
        residual_top["context_ids"],
    )
    shown = np.unique(
        np.concatenate(
            [top_context_ids[:, : params.browser_samples].ravel(), residual_top_context_ids.ravel()]
        )
    )
    vocab = {int(i): model.tokenizer.decode([int(i)]) for i in shown if i >= 0}
    return CorpusAtlasResult(
        corpus=corpus,
        settings=settings,
        neuron_count=state.neurons[0].count,
        neuron_mean=np.stack([m.mean for m in state.neurons]),
        neuron_std=np.stack([m.std for m in state.neurons]),
        neuron_max=np.stack([m.maximum for m in state.neurons]),
        active_fraction=np.stack([m.positive_fraction for m in state.neurons]),
        top_values=neuron_top["values"],
        top_context_ids=top_context_ids,
        top_context_values=neuron_top["context_values"],
        residual_max_abs=np.stack([m.maximum for m in state.residual]),
        residual_first_mean_abs=np.stack([m.mean for m in state.residual_first]),
        residual_first_max_abs=np.stack([m.maximum for m in state.residual_first]),
        residual_other_max_abs=residual_top["values"][:, 0].astype(np.float64),
        residual_median_abs=np.array(
            [histogram.median() for histogram in state.residual_histogram]
        ),
        median_tolerance=state.residual_histogram[0].relative_tolerance,
        residual_top_index=residual_top["index"],
        residual_top_context_ids=residual_top_context_ids,
        head_scores=state.heads.means(),
        vocab=vocab,
        massive_ratio=params.massive_ratio,
        massive_min_abs=params.massive_min_abs,
        browser_samples=min(params.browser_samples, params.top_k),
        sequence_length=params.context_tokens + settings.prepend_bos,
        tokens_per_second=tokens_per_second,
    )


def render(result: CorpusAtlasResult) -> Iterator[Artifact]:
    """The atlas's figures, one neuron browser per layer and the neuron table."""
    yield from atlas_figures(result)
    for layer in range(result.active_fraction.shape[0]):
        yield neuron_browser(result, layer)
    yield neuron_table(result)


def atlas_figures(result: CorpusAtlasResult) -> Iterator[Figure]:
    """Figures of neuron activation frequency, residual massive activations and head scores."""
    from unraveled.render.figures import heatmap, panels

    n_layers, n_neurons = result.active_fraction.shape
    n_tokens = result.neuron_count
    # Feature-density plot, as for SAEs: log10 of the fraction of tokens a neuron is active on.
    floor = np.log10(1 / max(n_tokens, 1))
    edges = np.linspace(floor, 0, 31)
    counts = np.stack(
        [np.histogram(np.log10(row[row > 0]), bins=edges)[0] for row in result.active_fraction]
    )
    figure, (density, dead_axes, dense_axes) = panels(3, width_ratios=[1.6, 0.7, 0.7])
    figure.set_size_inches(16, 6)
    image = density.imshow(
        np.log10(1 + counts),
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(edges[0], edges[-1], -0.5, n_layers - 0.5),
    )
    figure.colorbar(image, ax=density, label="log10(1 + neurons)")
    density.axvline(np.log10(DENSE_FRACTION), color="white", linestyle="--", linewidth=1)
    density.set(
        title=f"Activation frequency of every neuron ({n_tokens:,} tokens; dead not shown)",
        xlabel="log10(fraction of tokens on which the neuron is active)",
        ylabel="Layer",
    )
    layers = np.arange(n_layers)
    # Separate panels: dead counts are often a handful where dense ones are hundreds.
    for axes, counted, color, what in (
        (dead_axes, result.dead, "black", "Dead (never active)"),
        (dense_axes, result.dense, "tab:orange", f"Dense (active on > {DENSE_FRACTION:.0%})"),
    ):
        per_layer = counted.sum(axis=1)
        axes.barh(layers, per_layer, color=color)
        axes.set_xlim(0, max(1, per_layer.max()) * 1.1)
        if per_layer.max() == 0:
            axes.text(0.5, 0.5, "none", transform=axes.transAxes, ha="center", color="gray")
        axes.set(
            title=f"{what}\nper layer, of {n_neurons}",
            xlabel="Neurons",
            ylabel="Layer",
            ylim=(-0.7, n_layers - 0.3),
        )
    _integer_ticks(density, dead_axes, dense_axes)
    figure.suptitle("MLP neurons over the corpus (active: pre-activation > 0)")
    yield Figure(
        "01_neuron_activation_frequency",
        figure,
        "Activation-frequency histogram per layer (log scale), dead and dense neurons per layer",
    )

    figure, (grid, peaks) = panels(2, width_ratios=[1.6, 1.0])
    figure.set_size_inches(14, 6)
    image = grid.imshow(
        np.log10(result.residual_max_abs),
        aspect="auto",
        origin="lower",
        cmap="magma",
        interpolation="nearest",
    )
    figure.colorbar(image, ax=grid, label="log10 max |value|")
    grid.set(
        title="Largest |value| of each residual dimension over the corpus (all positions)",
        xlabel="Residual dimension",
        ylabel="Layer (resid_post)",
    )
    first_name = (
        "BOS (position 0)"
        if result.settings.prepend_bos
        else "first position (the window's first token)"
    )
    for peak, marker, color, where in (
        (result.residual_first_max_abs, "o-", "crimson", first_name),
        (result.residual_other_max_abs, "^-", "tab:blue", "every other position"),
    ):
        peaks.semilogx(
            peak.max(axis=1),
            layers,
            marker,
            color=color,
            label=f"largest |value| at {where} (dimension labelled)",
        )
        for layer, dim in enumerate(peak.argmax(axis=1)):
            peaks.annotate(
                str(dim),
                (peak[layer, dim], layer),
                fontsize=7,
                color=color,
                xytext=(4, -3),
                textcoords="offset points",
            )
    peaks.semilogx(
        result.residual_median_abs,
        layers,
        "s-",
        color="gray",
        label="median |value| of the layer's activations",
    )
    peaks.semilogx(
        result.massive_threshold,
        layers,
        ":",
        color="gray",
        label=(
            f"massive: > {result.massive_min_abs:g} and >= {result.massive_ratio:g} x median "
            "(Sun et al. 2024)"
        ),
    )
    peaks.set(
        title="Largest residual activation per layer", xlabel="|value| (log scale)", ylabel="Layer"
    )
    peaks.legend(
        fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12)
    )  # below: the curves fill the panel
    _integer_ticks(grid, peaks)
    figure.suptitle("Residual stream: massive activations, at the first position and elsewhere")
    yield Figure(
        "02_residual_massive_activations",
        figure,
        "Per layer and dimension, the largest |activation|; the dimensions that carry massive "
        "activations",
    )

    figure, axes_list = panels(3, 2)
    # Six panels for five scores: the last is hidden.
    for axes, name in zip(axes_list, HEAD_SCORES, strict=False):
        unit = " (nats)" if name == "entropy" else ""
        heatmap(
            axes,
            result.head_scores[name],
            f"{name.replace('_', '-')}{unit}",
            "Head",
            "Layer",
            cmap="viridis",
            colorbar_label="mean over corpus windows",
        )
        axes.invert_yaxis()
        _integer_ticks(axes)
    axes_list[-1].set_visible(False)
    figure.suptitle(
        f"Attention heads over {result.corpus['windows']} corpus windows of "
        f"{result.corpus['context_tokens']} tokens"
    )
    yield Figure(
        "03_head_statistics",
        figure,
        "Per head over the corpus: attention entropy, first-token (sink), previous-token, "
        "duplicate-token and induction scores",
    )


def _integer_ticks(*axes_list: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for axes in axes_list:
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))


def neuron_browser(result: CorpusAtlasResult, layer: int) -> View:
    """Circuitsvis's top-k samples view of one layer.

    Every neuron's top contexts, each with its top token centred.
    """
    from unraveled.render.views import Element

    samples = result.browser_samples
    ids = result.top_context_ids[layer, :samples]  # [sample, neuron, context]
    values = result.top_context_values[layer, :samples]
    dead, dense = result.dead[layer], result.dense[layer]
    # Each distinct token once, each distinct context once (as indices into the tokens): the
    # neurons' top tokens share a few thousand corpus positions. Each neuron's values in
    # hundredths of its largest |value| shown, which is all the shading resolves.
    shown_ids = np.unique(ids[ids >= 0])
    token_table = [result.vocab[int(i)] for i in shown_ids]
    table_index = np.searchsorted(shown_ids, np.maximum(ids, 0))
    contexts: dict[tuple[int, ...], int] = {}
    context_refs, values_per_neuron, scales, labels = [], [], [], []
    for neuron in range(ids.shape[1]):
        kept = [
            slot for slot in range(samples) if np.isfinite(result.top_values[layer, slot, neuron])
        ]
        inside = [ids[slot, neuron] >= 0 for slot in kept]
        context_refs.append(
            [
                contexts.setdefault(tuple(table_index[slot, neuron][mask].tolist()), len(contexts))
                for slot, mask in zip(kept, inside, strict=True)
            ]
        )
        shown = [
            values[slot, neuron][mask].astype(np.float64)
            for slot, mask in zip(kept, inside, strict=True)
        ]
        largest = max((float(np.abs(row).max()) for row in shown if row.size), default=0.0) or 1.0
        scales.append(float(f"{largest / 100:.4g}"))
        values_per_neuron.append([np.round(row / scales[-1]).astype(int).tolist() for row in shown])
        status = " dead" if dead[neuron] else " dense" if dense[neuron] else ""
        labels.append(
            f"{neuron} (active {result.active_fraction[layer, neuron]:.2%}, max "
            f"{result.neuron_max[layer, neuron]:.2f}){status}"
        )
    element = Element(
        "TopkSamples",
        {
            "tokens": [context_refs],
            "activations": [values_per_neuron],
            "zerothDimensionName": "Layer",
            "firstDimensionName": "Neuron",
            "zerothDimensionLabels": [str(layer)],
            "firstDimensionLabels": labels,
        },
        f"Top {samples} contexts of each neuron in layer {layer}",
        tables={"tokens": [[list(context) for context in contexts], token_table]},
        scales={"activations": scales},
    )
    facts = {
        "layer": str(layer),
        "corpus": (
            f"{', '.join(result.corpus['sources'])}: {result.corpus['tokens_analysed']:,} tokens "
            f"in windows of {result.corpus['context_tokens']}"
        ),
        "value shown": (
            "hook_post, to 1% of the neuron's largest value on this page; context: the top token "
            "with the tokens before and after it in its window"
        ),
    }
    return View(f"neurons_layer_{layer:02d}", f"Neuron browser: layer {layer}", [element], facts)


def neuron_table(result: CorpusAtlasResult) -> Table:
    """One row per (layer, neuron): its statistics and top token, for pandas."""
    n_layers, n_neurons = result.active_fraction.shape
    centre = result.settings.context_before
    top_ids = result.top_context_ids[:, 0, :, centre]
    return Table(
        "neurons",
        {
            "layer": np.repeat(np.arange(n_layers), n_neurons),
            "neuron": np.tile(np.arange(n_neurons), n_layers),
            "mean": result.neuron_mean.ravel(),
            "std": result.neuron_std.ravel(),
            "max": result.neuron_max.ravel(),
            "active_fraction": result.active_fraction.ravel(),
            "dead": result.dead.ravel(),
            "dense": result.dense.ravel(),
            "top_token_id": top_ids.ravel(),
            "top_value": result.top_values[:, 0].ravel(),
        },
        f"per (layer, neuron) over {result.neuron_count} tokens; value = hook_post, active = "
        "hook_pre > 0",
    )


EXPERIMENT = Experiment(
    title="Corpus atlas: neurons, residual dimensions and heads over a corpus",
    params=CorpusAtlasParams,
    compute=compute,
    render=render,
    check_before_loading=check_before_loading,
)
