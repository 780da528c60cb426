"""What unraveled relies on in umap-learn beyond its public API; checked against 0.5.12.

Two things, each for a reason its public API has no answer to:

- An exact nearest-neighbour index in place of pynndescent's (``ExactNeighbourIndex``).
  ``UMAP(precomputed_knn=(indices, distances, index))`` is public, but ``UMAP.transform``
  then queries the index through ``NNDescent``'s interface, private attribute
  ``_angular_trees`` included.
- UMAP's numba kernels cached on disk (``cache_kernels``): umap compiles them in every process
  (seconds each time), and the layout kernel is a private function,
  ``layouts._nb_optimize_layout_euclidean_single_epoch`` (from umap-learn 0.5.7 on).

Both are checked for umap-learn 0.5.7 up to 0.5.x (``CHECKED``, and the kernel's presence);
any other version stops with ``IncompatibleDependencyError`` before use. Caching uses numba's
dispatcher API (``enable_caching``, ``stats``) only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sklearn.neighbors import NearestNeighbors

from unraveled import compat

logger = logging.getLogger(__name__)

DISTRIBUTION = "umap-learn"
CHECKED = ((0, 5, 7), (0, 6))  # the first release checked, and the first one not checked
LAYOUT_KERNEL = "_nb_optimize_layout_euclidean_single_epoch"


def check_version(relies_on: str) -> None:
    """Raise ``IncompatibleDependencyError`` unless umap-learn is a checked version."""
    compat.require_version(DISTRIBUTION, *CHECKED, relies_on)


class ExactNeighbourIndex:
    """The part of pynndescent's ``NNDescent`` interface that ``UMAP.transform`` uses, exactly."""

    _angular_trees = False  # UMAP reads this to pick a search epsilon; exact search ignores it

    def __init__(self, points: Float[NDArray, "n d"]) -> None:
        """Index ``points``, the points UMAP is fitted on.

        Raises:
            IncompatibleDependencyError: umap-learn is not a version this was checked on.
        """
        check_version("NNDescent's query interface, private _angular_trees included")
        self._finder = NearestNeighbors().fit(points)

    def query(
        self, queries: Float[NDArray, "m d"], k: int, epsilon: float = 0.0
    ) -> tuple[Int[NDArray, "m k"], Float[NDArray, "m k"]]:
        """The ``k`` nearest indexed points of each query, and their distances (float32)."""
        distances, indices = self._finder.kneighbors(queries, n_neighbors=k)
        return indices, distances.astype(np.float32)


def kernels() -> tuple[Any, ...]:
    """The numba kernels a fit and a transform compile that umap leaves uncached.

    Only the serial layout kernel: the parallel one (used when UMAP has no random_state) shares
    its Python function, and numba's cache key does not tell the two apart.

    Raises:
        IncompatibleDependencyError: umap-learn is not a version this was checked on, or lacks
            the layout kernel.
    """
    relies_on = f"caching its numba kernels, private layouts.{LAYOUT_KERNEL} included"
    check_version(relies_on)
    from umap import layouts, umap_

    layout = getattr(layouts, LAYOUT_KERNEL, None)
    if layout is None:
        raise compat.missing(DISTRIBUTION, f"layouts.{LAYOUT_KERNEL}", relies_on)
    return umap_.smooth_knn_dist, umap_.compute_membership_strengths, layout


def cache_kernels() -> None:
    """Let numba keep the UMAP kernels a fit and a transform compile on disk.

    Where numba keeps any ``cache=True`` function: ``NUMBA_CACHE_DIR`` if set, else next to
    umap's source, else the user's cache folder; numba recompiles when umap's source changes.
    Caching changes nothing computed.
    """
    for kernel in kernels():
        if kernel.stats.cache_path is not None:  # already cached (an earlier call, a newer umap)
            continue
        try:
            kernel.enable_caching()
        except RuntimeError as error:  # no writable place for a cache: compile as before
            logger.debug("numba can't cache %s: %s", kernel.py_func.__name__, error)
