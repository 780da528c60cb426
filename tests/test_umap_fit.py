"""The exact-neighbour UMAP: quiet, and it places new points where they belong."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from unraveled.umap_fit import umap_3d

pytestmark = pytest.mark.umap


def test_umap_places_points_by_cluster_without_warnings() -> None:
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 16))
    centres[1, 0] = 40.0
    fit_on = np.concatenate([centre + rng.standard_normal((150, 16)) for centre in centres])
    place = np.concatenate([centre + rng.standard_normal((5, 16)) for centre in centres])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # UMAP's precomputed_knn warning would fail here
        placed = umap_3d(fit_on, place, neighbours=10, seed=0)
    assert placed.shape == (10, 3)
    distances = np.linalg.norm(placed[:, None] - placed[None], axis=-1)
    within = max(distances[:5, :5].max(), distances[5:, 5:].max())
    assert distances[:5, 5:].min() > within


def test_umap_kernels_compiled_by_a_fit_are_kept_on_disk() -> None:
    from umap import layouts, umap_

    rng = np.random.default_rng(1)
    umap_3d(rng.standard_normal((120, 8)), rng.standard_normal((3, 8)), neighbours=5, seed=0)
    for kernel in (umap_.smooth_knn_dist, umap_.compute_membership_strengths, layouts._nb_optimize_layout_euclidean_single_epoch):
        folder = Path(kernel.stats.cache_path)
        name = f"{kernel.py_func.__module__.rsplit('.', 1)[-1]}.{kernel.py_func.__name__}-"
        kept = [path.suffix for path in folder.glob(f"{name}*")]
        assert ".nbi" in kept and ".nbc" in kept, f"{kernel.py_func.__name__}: no compiled code kept in {folder}"
    # The parallel layout kernel shares the serial one's Python function and cache key: it must stay uncached.
    assert layouts._nb_optimize_layout_euclidean_single_epoch_parallel.stats.cache_path is None
