"""Geometry of sets of vectors: PCA spectra, intrinsic dimension, neighbourhoods, similarity.

Pure numpy and scikit-learn functions shared by the embedding and residual-stream experiments.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

GRAM_BLOCK_ROWS = 4096


def cumulative_explained_variance(points: Float[NDArray, "n d"]) -> Float[NDArray, " components"]:
    """Cumulative fraction of variance explained by the first k principal components.

    k runs from 1 to min(n, d). The variances are the eigenvalues of the centred points' smaller
    Gram matrix (d x d, or n x n when there are fewer points than dimensions), which are the
    squared singular values an SVD would give, in float64 to within about 1e-16 of the SVD's
    fractions, at a fraction of its cost.
    """
    mean = points.mean(axis=0, keepdims=True)
    if len(points) < points.shape[1]:
        centred = (points - mean).astype(np.float64)
        gram = centred @ centred.T
    else:
        # Summed over blocks of rows: a float64 copy of every point (50,257 x 768: 309 MB) is
        # never held at once.
        gram = np.zeros((points.shape[1], points.shape[1]))
        for start in range(0, len(points), GRAM_BLOCK_ROWS):
            block = (points[start : start + GRAM_BLOCK_ROWS] - mean).astype(np.float64)
            gram += block.T @ block
    # Ascending from eigvalsh; rounding can leave the null directions a hair below zero.
    variance = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    # Divided by the cumulative sum's own last term, so all components explain exactly 1 (numpy's
    # pairwise ``sum`` and the sequential ``cumsum`` can differ in the last bit).
    cumulative = np.cumsum(variance)
    return cumulative / cumulative[-1]


def column_mean_std(
    points: Float[NDArray, "n d"],
) -> tuple[Float[NDArray, " d"], Float[NDArray, " d"]]:
    """Each column's mean and standard deviation, equal to numpy's to the bit.

    They are what ``mean(axis=0)`` and ``std(axis=0)`` give, with less memory:
    ``std`` squares the offsets from the mean in a copy of every point (50,257 x 768 float32:
    147 MB); here they are squared a block of rows at a time. numpy sums over rows one row after
    the other, into a running total; each block's sum here starts from the total so far (reduced
    as the block's first row), so the rows are added in numpy's order, and the division is
    numpy's (by the count as an ``intp``).
    """
    mean = points.mean(axis=0)
    total = None
    for start in range(0, len(points), GRAM_BLOCK_ROWS):
        squares = points[start : start + GRAM_BLOCK_ROWS] - mean
        np.square(squares, out=squares)
        total = np.add.reduce(
            squares if total is None else np.concatenate([total[None], squares]), axis=0
        )
    variance = np.true_divide(total, np.intp(len(points)), out=total, casting="unsafe")
    return mean, np.sqrt(variance, out=variance)


def intrinsic_dimension(cumulative: Float[NDArray, " components"], threshold: float = 0.9) -> int:
    """How many principal components it takes to explain ``threshold`` of the variance.

    Use with ``cumulative_explained_variance``; a linear estimate, blind to curved manifolds.
    """
    return int(np.searchsorted(cumulative, threshold - 1e-12) + 1)


def local_neighbourhoods(
    points: Float[NDArray, "n d"], n_subsets: int, n_neighbours: int, rng: np.random.Generator
) -> Int[NDArray, "subsets neighbours"]:
    """Indices of the ``n_neighbours`` nearest points around ``n_subsets`` random centres."""
    n_neighbours = min(n_neighbours, len(points))
    centres = rng.choice(len(points), size=min(n_subsets, len(points)), replace=False)
    finder = NearestNeighbors(n_neighbors=n_neighbours).fit(points)
    return finder.kneighbors(points[centres], return_distance=False)


def cosine_similarity_matrix(points: Float[NDArray, "n d"]) -> Float[NDArray, "n n"]:
    """Cosine similarity of every pair of rows."""
    unit = points / np.clip(np.linalg.norm(points, axis=1, keepdims=True), 1e-12, None)
    return unit @ unit.T


def pca_projection(
    fit_on: Float[NDArray, "n d"], n_components: int, also: Float[NDArray, "m d"] | None = None
) -> tuple[Float[NDArray, "n k"], Float[NDArray, "m k"] | None]:
    """Coordinates of ``fit_on`` (and of ``also``) in the top principal components of ``fit_on``."""
    pca = PCA(n_components=n_components).fit(fit_on)
    return pca.transform(fit_on), (pca.transform(also) if also is not None else None)


def pair_cosines(vectors: Float[NDArray, "n d"]) -> Float[NDArray, " pairs"]:
    """Cosine of every unordered pair of distinct rows (i < j), in ``np.triu_indices`` order."""
    unit = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return (unit @ unit.T)[np.triu_indices(len(vectors), k=1)]


def welch_bound(n_vectors: int, n_dims: int) -> float:
    """Lower bound on the mean squared cosine over distinct pairs of unit vectors.

    For ``n_vectors`` (N) unit vectors in ``n_dims`` (d) dimensions it is (N - d) / (d (N - 1)),
    and 0 when they fit (N <= d).

    Use its square root to compare with an RMS cosine.
    """
    if n_vectors <= n_dims:
        return 0.0
    return (n_vectors - n_dims) / (n_dims * (n_vectors - 1))
