"""``unraveled.geometry`` where its work is split: the PCA Gram matrix and the column statistics
summed over blocks of rows.

The tests in ``test_embeddings`` use fewer rows than one block (``GRAM_BLOCK_ROWS``), so there
the sum over blocks is a single term; a loop that kept only one block would pass them.
"""

from __future__ import annotations

import numpy as np
import pytest

from unraveled import geometry


@pytest.mark.parametrize("block_rows", [1, 7, 400])
def test_cumulative_variance_is_the_same_whatever_the_gram_blocks(
    block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    points = np.random.default_rng(3).standard_normal((400, 30)) * np.linspace(3.0, 0.1, 30)
    singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    expected = np.cumsum(singular**2) / np.sum(singular**2)
    monkeypatch.setattr(
        geometry, "GRAM_BLOCK_ROWS", block_rows
    )  # 400 = 57 blocks of 7 and one of 1
    np.testing.assert_allclose(
        geometry.cumulative_explained_variance(points.astype(np.float32)),
        expected,
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_rows", [1, 7, 400, 4096])
def test_column_mean_std_are_numpys_to_the_bit(
    dtype: type, block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(4)
    # Offsets far from zero and spreads over three decades, so rounding has something to differ on.
    points = (
        rng.standard_normal((400, 30)) * np.geomspace(3.0, 0.003, 30) + rng.uniform(-50, 50, 30)
    ).astype(dtype)
    monkeypatch.setattr(geometry, "GRAM_BLOCK_ROWS", block_rows)
    mean, std = geometry.column_mean_std(points)
    assert mean.dtype == std.dtype == dtype
    assert np.array_equal(mean, points.mean(axis=0))
    assert np.array_equal(std, points.std(axis=0))
