"""A 3D UMAP fitted once, with exact nearest neighbours from scikit-learn.

UMAP finds neighbours with pynndescent for more than 4096 points, whose numba kernels are
compiled afresh in every process (about 40 s here, most of the original token-journey script's
time). Exact neighbours for ~10,000 points take about a second, so we compute them with
scikit-learn and hand them to UMAP through its ``precomputed_knn`` parameter, with an exact
search index that ``UMAP.transform`` queries to place new points. The fit itself (spectral
initialisation, once) and the transform are UMAP's own.

UMAP's other numba kernels (the fuzzy graph's and the layout's) are compiled afresh in every
process too, 4-8 s here; ``cache_umap_kernels`` keeps them on disk, as numba's ``cache=True``
would, so only the first run on a machine compiles them. ``make setup`` makes that first run
(``python -m unraveled.umap_fit``, ``compile_kernels``), as pip compiles bytecode at install.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sklearn.neighbors import NearestNeighbors

logger = logging.getLogger(__name__)


class ExactNeighbourIndex:
    """The part of pynndescent's ``NNDescent`` interface that ``UMAP.transform`` uses, exactly."""

    _angular_trees = False  # UMAP reads this to pick a search epsilon; exact search ignores it

    def __init__(self, points: Float[NDArray, "n d"]) -> None:
        self._finder = NearestNeighbors().fit(points)

    def query(
        self, queries: Float[NDArray, "m d"], k: int, epsilon: float = 0.0
    ) -> tuple[Int[NDArray, "m k"], Float[NDArray, "m k"]]:
        distances, indices = self._finder.kneighbors(queries, n_neighbors=k)
        return indices, distances.astype(np.float32)


def cache_umap_kernels() -> None:
    """Let numba keep the UMAP kernels a fit and a transform compile on disk.

    Where numba keeps any ``cache=True`` function: ``NUMBA_CACHE_DIR`` if set, else next to
    umap's source, else the user's cache folder; numba recompiles when umap's source changes.
    Caching changes nothing computed. Only the serial layout kernel is cached: the parallel one
    (used when UMAP has no random_state) shares its Python function, and numba's cache key does
    not tell the two apart.
    """
    from numba.core.caching import NullCache
    from umap import layouts, umap_

    kernels = (
        umap_.smooth_knn_dist,
        umap_.compute_membership_strengths,
        layouts._nb_optimize_layout_euclidean_single_epoch,
    )
    for kernel in kernels:
        if not isinstance(
            kernel._cache, NullCache
        ):  # already cached (an earlier call, or a newer umap)
            continue
        try:
            kernel.enable_caching()
        except RuntimeError as error:  # no writable place for a cache: compile as before
            logger.debug("numba can't cache %s: %s", kernel.py_func.__name__, error)


def umap_3d(
    fit_on: Float[NDArray, "n d"], place: Float[NDArray, "m d"], neighbours: int, seed: int
) -> Float[NDArray, "m 3"]:
    """Fit a 3D UMAP (spectral initialisation) on ``fit_on`` and return where ``place`` lands in it."""
    import umap  # slow to import (numba); only UMAP users pay for it

    cache_umap_kernels()
    fit_on = np.ascontiguousarray(fit_on, dtype=np.float32)
    index = ExactNeighbourIndex(fit_on)
    indices, distances = index.query(fit_on, neighbours)
    reducer = umap.UMAP(
        n_components=3,
        n_neighbors=neighbours,
        init="spectral",
        random_state=seed,
        n_jobs=1,
        precomputed_knn=(indices, distances, index),
    )
    with warnings.catch_warnings():
        # UMAP warns that transform will be unavailable because the index is not pynndescent's;
        # it is wrong here: ExactNeighbourIndex answers the queries transform makes.
        warnings.filterwarnings(
            "ignore",
            message=r"precomputed_knn\[2\] \(knn_search_index\) is not an NNDescent object",
            category=UserWarning,
        )
        reducer.fit(fit_on)
    return reducer.transform(np.ascontiguousarray(place, dtype=np.float32))


def compile_kernels() -> None:
    """Compile every numba kernel a fit and a transform run, and keep them on disk.

    A small fit calls the same kernels with the same argument types as a full one (the types
    depend on dtypes, not sizes), so a later process loads all of them, pynndescent's (compiled
    at its import) included, and compiles none. Compiling them takes about 40 s and 130-190 MiB
    that stay with the process; ``make setup`` pays that in its own short process once, and every
    run after it (``make all``) loads the compiled code instead.
    """
    rng = np.random.default_rng(0)
    umap_3d(rng.standard_normal((300, 16)), rng.standard_normal((3, 16)), neighbours=15, seed=0)


if __name__ == "__main__":
    compile_kernels()
