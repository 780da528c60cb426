"""Token and position embeddings: their values, statistics, shared directions and PCA geometry.

Everything GPT-2 Unraveled's ``1_explore_embeddings.py`` shows, read from the model's raw
``W_E`` and ``W_pos``. Models with rotary positions (SmolLM2) have no position embedding matrix:
they get the token parts, and the position parts are reported as not applicable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer, HookedTransformerConfig

# Dimension pairs the original analysis found telling in GPT-2 small's trained weights; they mean
# nothing in another model, whatever its width.
GPT2_SMALL_DIMENSION_PAIRS = [[87, 138], [68, 85], [361, 724]]
GPT2_SMALL_PAIRS_RULE = "GPT-2 small's pairs from the original analysis"
DATA_DRIVEN_PAIRS_RULE = (
    "data-driven: the two dimensions with the largest |mean| over tokens, "
    "then the four with the largest position-embedding std "
    "(token |mean| without learned positions)"
)
NO_POSITION_EMBEDDINGS = (
    "the model has no learned position embeddings (positions are rotary, applied inside attention)"
)


class EmbeddingsParams(Params):
    """The embeddings experiment's params: how much of the matrices is drawn and analysed."""

    chunk_tokens: int = Field(
        500, ge=1, le=10_000, description="Random tokens in the embedding-matrix chunk."
    )
    chunk_dims: int = Field(150, ge=1, le=10_000, description="Random dimensions in the chunk.")
    first_dims: int = Field(
        30, ge=1, le=200, description="Dimensions whose value distributions are drawn."
    )
    listed_tokens: int = Field(
        300, ge=0, le=10_000, description="First token strings listed in metrics."
    )
    dimension_pairs: list[list[int]] | None = Field(
        None,
        description=(
            "Pairs of dimensions to scatter; default: the original's for GPT-2 small, "
            "else chosen from the data."
        ),
    )
    local_subsets: int = Field(10, ge=1, le=100, description="Neighbourhoods for local PCA.")
    local_neighbours: int = Field(1000, ge=2, le=20_000, description="Points per neighbourhood.")
    variance_threshold: float = Field(
        0.9, gt=0, le=1, description="Variance explained that defines intrinsic dimension."
    )
    projected_tokens: int = Field(
        2000, ge=1, le=200_000, description="Token embeddings projected into the position PCA."
    )


@dataclass(frozen=True)
class PositionGeometry:
    """Everything computed from ``W_pos``."""

    embeddings: Float[NDArray, "n_ctx d_model"]
    chunk: Float[NDArray, "chunk_dims n_ctx"]
    dim_mean: Float[NDArray, " d_model"]
    dim_std: Float[NDArray, " d_model"]
    cumulative_variance: Float[NDArray, " components"]
    pca_3d: Float[NDArray, "n_ctx 3"]
    cosine_similarity: Float[NDArray, "n_ctx n_ctx"]
    tokens_in_position_pca: Float[NDArray, "projected 3"]


@dataclass(frozen=True)
class EmbeddingsResult:
    """Everything computed from ``W_E``, and from ``W_pos`` when the model has one.

    Attributes:
        token_embeddings: ``W_E`` as float32.
        token_chunk: Random dimensions (rows) of random tokens (columns).
        token_dim_mean: Each dimension's mean over tokens.
        token_dim_std: Each dimension's standard deviation over tokens.
        first_dims: How many leading dimensions have their distributions drawn.
        dimension_pairs: The pairs of dimensions scattered.
        token_cumulative_variance: Cumulative explained variance of ``W_E``'s principal
            components.
        local_cumulative_variance: The same for each neighbourhood of tokens.
        positions: What was computed from ``W_pos``; None for a model without one.
        summary: The metrics.
    """

    token_embeddings: Float[NDArray, "d_vocab d_model"]
    token_chunk: Float[NDArray, "chunk_dims chunk_tokens"]
    token_dim_mean: Float[NDArray, " d_model"]
    token_dim_std: Float[NDArray, " d_model"]
    first_dims: int
    dimension_pairs: list[list[int]]
    token_cumulative_variance: Float[NDArray, " components"]
    local_cumulative_variance: list[Float[NDArray, " local_components"]]
    positions: PositionGeometry | None
    summary: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        """Parameter count, shapes, intrinsic dimensions and per-dimension statistics."""
        return self.summary


def is_gpt2_small(cfg: HookedTransformerConfig) -> bool:
    """Whether the model is GPT-2 small itself: its name and its exact shape, not only its width.

    The width alone would not do: gpt-neo-125M and pythia-160m are 768 wide too.
    """
    shape = (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab, cfg.n_ctx)
    return (
        cfg.model_name == "gpt2"
        and cfg.original_architecture == "GPT2LMHeadModel"
        and shape == (12, 12, 768, 50257, 1024)
    )


def default_dimension_pairs(
    cfg: HookedTransformerConfig,
    token_dim_mean: Float[NDArray, " d_model"],
    position_dim_std: Float[NDArray, " d_model"] | None,
) -> tuple[list[list[int]], str]:
    """The dimension pairs to scatter, and the rule that chose them.

    GPT-2 small gets the original analysis's pairs; any other model the two dimensions with the
    largest token-mean offset, then the four with the most position variation (or token-mean
    offset, without learned positions).
    """
    if is_gpt2_small(cfg):
        return GPT2_SMALL_DIMENSION_PAIRS, GPT2_SMALL_PAIRS_RULE
    by_offset = np.argsort(-np.abs(token_dim_mean))
    spread = position_dim_std if position_dim_std is not None else np.abs(token_dim_mean)
    by_spread = [int(d) for d in np.argsort(-spread) if d not in by_offset[:2]]
    chosen = [int(by_offset[0]), int(by_offset[1]), *by_spread[:4]]
    return [chosen[i : i + 2] for i in range(0, 6, 2)], DATA_DRIVEN_PAIRS_RULE


def _chunk(
    matrix: Float[NDArray, "rows d_model"], rows: Int[NDArray, " r"], dims: Int[NDArray, " c"]
) -> Float[NDArray, "c r"]:
    return matrix[np.ix_(rows, dims)].T


def _position_geometry(
    w_pos: Float[NDArray, "n_ctx d_model"],
    w_e: Float[NDArray, "d_vocab d_model"],
    dims: Int[NDArray, " c"],
    params: EmbeddingsParams,
    rng: np.random.Generator,
) -> PositionGeometry:
    from unraveled.geometry import (
        cosine_similarity_matrix,
        cumulative_explained_variance,
        pca_projection,
    )

    projected = rng.choice(len(w_e), size=min(params.projected_tokens, len(w_e)), replace=False)
    pca_3d, tokens_3d = pca_projection(w_pos, 3, also=w_e[projected])
    return PositionGeometry(
        embeddings=w_pos,
        chunk=w_pos[:, dims].T,
        dim_mean=w_pos.mean(axis=0),
        dim_std=w_pos.std(axis=0),
        cumulative_variance=cumulative_explained_variance(w_pos),
        pca_3d=pca_3d,
        cosine_similarity=cosine_similarity_matrix(w_pos),
        tokens_in_position_pca=tokens_3d,
    )


def compute(model: HookedTransformer, params: EmbeddingsParams, seed: int) -> EmbeddingsResult:
    """Statistics, dimension pairs and PCA geometry of the raw token and position embeddings."""
    from unraveled.geometry import (
        column_mean_std,
        cumulative_explained_variance,
        intrinsic_dimension,
        local_neighbourhoods,
    )
    from unraveled.models import checkpoint_parameters

    rng = np.random.default_rng(seed)
    w_e = model.W_E.detach().float().cpu().numpy()
    has_positions = model.cfg.positional_embedding_type == "standard"
    d_vocab, d_model = w_e.shape
    chunk_rows = np.sort(rng.choice(d_vocab, size=min(params.chunk_tokens, d_vocab), replace=False))
    chunk_dims = np.sort(rng.choice(d_model, size=min(params.chunk_dims, d_model), replace=False))
    positions = None
    if has_positions:
        positions = _position_geometry(
            model.W_pos.detach().float().cpu().numpy(), w_e, chunk_dims, params, rng
        )
    token_dim_mean, token_dim_std = column_mean_std(w_e)
    pairs, pairs_rule = (
        (params.dimension_pairs, "params.dimension_pairs")
        if params.dimension_pairs
        else default_dimension_pairs(
            model.cfg, token_dim_mean, positions.dim_std if positions else None
        )
    )
    token_variance = cumulative_explained_variance(w_e)
    neighbourhoods = local_neighbourhoods(w_e, params.local_subsets, params.local_neighbours, rng)
    local_variance = [cumulative_explained_variance(w_e[indices]) for indices in neighbourhoods]
    threshold = params.variance_threshold
    summary: dict[str, Any] = {
        "parameter_count": checkpoint_parameters(model),
        "parameter_count_means": (
            "the checkpoint's own parameters, as transformers counts them (tied embeddings once)"
        ),
        "token_embedding_shape": list(w_e.shape),
        "position_embedding_shape": list(positions.embeddings.shape) if positions else None,
        "first_tokens": [
            model.tokenizer.decode([i]) for i in range(min(params.listed_tokens, d_vocab))
        ],
        "dimension_pairs": pairs,
        "dimension_pairs_chosen_by": pairs_rule,
        "variance_threshold": threshold,
        "intrinsic_dimension": {
            "token_embeddings": intrinsic_dimension(token_variance, threshold),
            "local_subsets": [intrinsic_dimension(v, threshold) for v in local_variance],
            "position_embeddings": intrinsic_dimension(positions.cumulative_variance, threshold)
            if positions
            else None,
        },
        "token_embedding_stats": {
            "mean_of_dim_means": float(token_dim_mean.mean()),
            "mean_of_dim_stds": float(token_dim_std.mean()),
            "largest_abs_dim_mean": {
                "dim": int(np.abs(token_dim_mean).argmax()),
                "value": float(token_dim_mean[np.abs(token_dim_mean).argmax()]),
            },
        },
        "not_applicable": {} if positions else {"position embeddings": NO_POSITION_EMBEDDINGS},
    }
    if positions:
        summary["position_embedding_stats"] = {
            "median_log10_dim_std": float(np.median(np.log10(positions.dim_std))),
            "dims_with_std_above_0.1": int((positions.dim_std > 0.1).sum()),
        }
    return EmbeddingsResult(
        token_embeddings=w_e,
        token_chunk=_chunk(w_e, chunk_rows, chunk_dims),
        token_dim_mean=token_dim_mean,
        token_dim_std=token_dim_std,
        first_dims=min(params.first_dims, d_model),
        dimension_pairs=pairs,
        token_cumulative_variance=token_variance,
        local_cumulative_variance=local_variance,
        positions=positions,
        summary=summary,
    )


def _cumulative_plot(
    axes: Any, curves: list[Float[NDArray, " k"]], title: str, labels: list[str] | None = None
) -> None:
    for index, curve in enumerate(curves):
        axes.plot(
            np.arange(1, len(curve) + 1),
            curve,
            marker="o",
            markersize=2,
            label=labels[index] if labels else None,
        )
    axes.set(
        title=title, xlabel="Number of principal components", ylabel="Cumulative explained variance"
    )
    axes.grid(True, alpha=0.4)
    if labels:
        axes.legend(fontsize=7)


def render(result: EmbeddingsResult) -> Iterator[Artifact]:
    """The chunk heatmaps, distributions, scatters and PCA figures, token and position."""
    from unraveled.render.figures import heatmap, panels

    w_e, positions = result.token_embeddings, result.positions

    figure, (axes,) = panels(1)
    figure.set_size_inches(12, 5)
    heatmap(
        axes,
        result.token_chunk,
        "Chunk of the token embedding matrix",
        "Randomly selected tokens",
        "Randomly selected dimensions",
        colorbar_label="Embedding value",
    )
    yield Figure("01_token_embedding_chunk", figure, "Random tokens x random dimensions of W_E")

    figure, (left, right) = panels(2)
    left.hist(result.token_dim_mean, bins=50, color="deepskyblue")
    left.set(title="Mean of each dimension over tokens", xlabel="Mean value", ylabel="Dimensions")
    right.hist(result.token_dim_std, bins=50, color="salmon")
    right.set(
        title="Standard deviation of each dimension over tokens",
        xlabel="Standard deviation",
        ylabel="Dimensions",
    )
    yield Figure(
        "02_mean_std_distributions", figure, "Per-dimension mean and std of token embeddings"
    )

    figure, (left, right) = panels(2)
    for dim in range(result.first_dims):
        # One filled outline per dimension, not 100 bar patches: the same picture, drawn faster.
        left.hist(w_e[:, dim], bins=100, alpha=0.3, histtype="stepfilled")
    left.set(
        title=f"Values of the first {result.first_dims} dimensions",
        xlabel="Embedding value",
        ylabel="Tokens",
    )
    right.scatter(result.token_dim_mean, result.token_dim_std, s=12, alpha=0.7)
    right.set(
        title="Mean vs standard deviation of every dimension",
        xlabel="Mean",
        ylabel="Standard deviation",
    )
    yield Figure(
        "03_embedding_distributions_and_scatter",
        figure,
        "Value distributions; mean vs std per dimension",
    )

    if positions is not None:
        figure, (axes,) = panels(1)
        figure.set_size_inches(12, 5)
        heatmap(
            axes,
            positions.chunk,
            "Chunk of the position embedding matrix",
            "Position",
            "Randomly selected dimensions",
            colorbar_label="Embedding value",
        )
        yield Figure(
            "04_position_embedding_chunk", figure, "All positions x random dimensions of W_pos"
        )

        figure, (left, right) = panels(2)
        # Dense artists are rasterised in vector formats (--format svg,pdf); PNGs are the same.
        left.plot(positions.embeddings, linewidth=0.6, rasterized=True)
        left.set(
            title="Every dimension across positions", xlabel="Position", ylabel="Embedding value"
        )
        right.hist(np.log10(positions.dim_std), bins=50, color="mediumseagreen")
        right.set(
            title="Position-embedding std per dimension",
            xlabel="log10 standard deviation",
            ylabel="Dimensions",
        )
        yield Figure(
            "05_position_embedding_distributions",
            figure,
            "W_pos per dimension; log10 std histogram",
        )

        figure, (axes,) = panels(1)
        figure.set_size_inches(11, 5.5)
        x = positions.dim_std
        for values, colour, label in [
            (result.token_dim_std, "green", "std of token embeddings"),
            (np.abs(result.token_dim_mean), "blue", "|mean| of token embeddings"),
            (positions.dim_std, "orange", "std of position embeddings"),
            (np.abs(positions.dim_mean), "red", "|mean| of position embeddings"),
        ]:
            axes.scatter(x, values, s=14, alpha=0.5, color=colour, label=label)
        axes.set(
            xscale="log",
            yscale="log",
            title="Per-dimension statistics against position-embedding std",
            xlabel="std of position embeddings (log)",
            ylabel="statistic (log)",
        )
        axes.legend()
        yield Figure(
            "06_summary_stats", figure, "Token and position statistics vs position std, log-log"
        )

    figure, axes_list = panels(len(result.dimension_pairs))
    for axes, (first, second) in zip(axes_list, result.dimension_pairs, strict=True):
        axes.scatter(
            w_e[:, first],
            w_e[:, second],
            s=1,
            color="black",
            alpha=0.5,
            label="tokens",
            rasterized=True,
        )
        if positions is not None:
            axes.scatter(
                positions.embeddings[:, first],
                positions.embeddings[:, second],
                s=2,
                color="red",
                label="positions",
            )
        axes.set(
            title=f"Dimensions {first} vs {second}",
            xlabel=f"dimension {first}",
            ylabel=f"dimension {second}",
        )
        axes.legend(markerscale=5)
    yield Figure(
        "07_word_position_scatter",
        figure,
        "Token (black) and position (red) embeddings on dimension pairs",
    )

    figure, (left, right) = panels(2)
    _cumulative_plot(
        left,
        [result.token_cumulative_variance],
        "Cumulative explained variance: all token embeddings",
    )
    _cumulative_plot(
        right,
        result.local_cumulative_variance,
        "Local PCA: nearest-neighbour subsets",
        [f"subset {i + 1}" for i in range(len(result.local_cumulative_variance))],
    )
    yield Figure(
        "08_pca_analysis_word_embeddings",
        figure,
        "Global and local PCA spectra of token embeddings",
    )

    if positions is not None:
        figure, (left, right) = panels(2, projection_3d={1})
        _cumulative_plot(
            left,
            [positions.cumulative_variance],
            "Cumulative explained variance: position embeddings",
        )
        points = right.scatter(
            *positions.pca_3d.T, c=np.arange(len(positions.pca_3d)), cmap="Spectral", s=4
        )
        right.set(
            title="Position embeddings, top 3 principal components",
            xlabel="PC 1",
            ylabel="PC 2",
            zlabel="PC 3",
        )
        figure.colorbar(points, ax=right, label="Position", shrink=0.7)
        yield Figure(
            "09_position_embedding_pca", figure, "PCA of position embeddings, coloured by position"
        )

        figure, (left, right) = panels(2, projection_3d={1})
        heatmap(
            left,
            positions.cosine_similarity,
            "Cosine similarity of position embeddings",
            "Position",
            "Position",
            cmap="coolwarm",
            centre_zero=True,
        )
        right.scatter(*positions.pca_3d.T, s=4, color="blue", label="positions")
        right.scatter(*positions.tokens_in_position_pca.T, s=4, color="green", label="tokens")
        right.set(
            title="Tokens in the PCA fitted on positions",
            xlabel="PC 1",
            ylabel="PC 2",
            zlabel="PC 3",
        )
        right.legend()
        yield Figure(
            "10_similarity_and_combined_pca",
            figure,
            "Position similarity; tokens projected on position PCs",
        )


def check(model: HookedTransformer, params: EmbeddingsParams) -> None:
    """Every dimension pair names two of the model's dimensions."""
    d_model = model.cfg.d_model
    for pair in params.dimension_pairs or []:
        if len(pair) != 2 or not all(0 <= d < d_model for d in pair):
            raise ParamError(
                "dimension_pairs", f"{pair} is not a pair of dimensions in 0..{d_model - 1}"
            )


EXPERIMENT = Experiment(
    title="Token and position embeddings",
    params=EmbeddingsParams,
    compute=compute,
    render=render,
    weights="raw",
    check=check,
    needs=frozenset({"W_pos"}),
)
