"""Embedding computations checked against inputs with a known answer."""

from __future__ import annotations

import numpy as np

from unraveled.experiments.embeddings import GPT2_SMALL_DIMENSION_PAIRS, default_dimension_pairs
from unraveled.geometry import (
    cosine_similarity_matrix,
    cumulative_explained_variance,
    intrinsic_dimension,
    local_neighbourhoods,
)


def test_intrinsic_dimension_of_a_known_spectrum() -> None:
    rng = np.random.default_rng(0)
    # Five directions carry 97% of the variance, the other 45 share the rest.
    scales = np.array([1.0] * 5 + [0.08] * 45)
    points = rng.standard_normal((4000, 50)) * scales
    cumulative = cumulative_explained_variance(points)
    assert cumulative[-1] == 1.0 and np.all(np.diff(cumulative) >= 0)
    assert intrinsic_dimension(cumulative, 0.9) == 5
    assert intrinsic_dimension(cumulative, 0.999) > 5


def test_cumulative_variance_of_exactly_planar_points() -> None:
    rng = np.random.default_rng(1)
    plane = rng.standard_normal((300, 2)) @ rng.standard_normal((2, 10))
    cumulative = cumulative_explained_variance(plane)
    assert cumulative[1] > 1 - 1e-9 and intrinsic_dimension(cumulative, 0.9) <= 2


def test_local_neighbourhoods_are_nearest_points() -> None:
    line = np.arange(100, dtype=float)[:, None]
    (indices,) = local_neighbourhoods(line, 1, 5, np.random.default_rng(0))
    centre = indices[0]
    nearest_possible = np.sort(np.abs(np.arange(100) - centre))[:5]
    np.testing.assert_array_equal(np.sort(np.abs(indices - centre)), nearest_possible)


def test_cosine_similarity_matrix_known_values() -> None:
    points = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity_matrix(points), [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-12)


def test_default_dimension_pairs() -> None:
    assert default_dimension_pairs(np.zeros(768), np.ones(768)) == GPT2_SMALL_DIMENSION_PAIRS
    means = np.zeros(64)
    means[[7, 3]] = [5.0, -4.0]
    spread = np.zeros(64)
    spread[[10, 11, 12, 13]] = [4, 3, 2, 1]
    assert default_dimension_pairs(means, spread) == [[7, 3], [10, 11], [12, 13]]
