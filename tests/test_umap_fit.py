"""The exact-neighbour UMAP: quiet, and it places new points where they belong."""

from __future__ import annotations

import warnings

import numpy as np

from unraveled.umap_fit import umap_3d


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
