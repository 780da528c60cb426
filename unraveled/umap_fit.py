"""A 3D UMAP fitted once, with exact nearest neighbours from scikit-learn.

UMAP finds neighbours with pynndescent for more than 4096 points, whose numba kernels are
compiled afresh in every process (most of the original token-journey script's time). Exact
neighbours for ~10,000 points are cheap to compute, so we compute them with
scikit-learn and hand them to UMAP through its ``precomputed_knn`` parameter, with an exact
search index that ``UMAP.transform`` queries to place new points. The fit itself (spectral
initialisation, once) and the transform are UMAP's own.

UMAP's other numba kernels (the fuzzy graph's and the layout's) are compiled afresh in every
process too; ``unraveled.compat.umap.cache_kernels`` keeps them on disk, as numba's
``cache=True`` would, so only the first run on a machine compiles them. ``make setup`` makes that
first run (``python -m unraveled.umap_fit``, ``compile_kernels``), as pip compiles bytecode at
install.
"""

from __future__ import annotations

import warnings

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray

from unraveled.compat.umap import ExactNeighbourIndex, cache_kernels


def umap_3d(
    fit_on: Float[NDArray, "n d"], place: Float[NDArray, "m d"], neighbours: int, seed: int
) -> Float[NDArray, "m 3"]:
    """Fit a 3D UMAP (spectral initialisation) on ``fit_on``; where ``place`` lands in it."""
    import umap  # slow to import (numba); only UMAP users pay for it

    cache_kernels()
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
    at its import) included, and compiles none. Compiling them takes long and leaves memory
    with the process; ``make setup`` pays that in its own short process once, and every
    run after it (``make all``) loads the compiled code instead.
    """
    rng = np.random.default_rng(0)
    umap_3d(rng.standard_normal((300, 16)), rng.standard_normal((3, 16)), neighbours=15, seed=0)


if __name__ == "__main__":
    compile_kernels()
