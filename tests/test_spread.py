"""The shared standard error (``unraveled.spread``), against hand-worked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unraveled.spread import spread, standard_error


def test_standard_error_matches_hand_worked_answer():
    # 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sd = sqrt(5 / 3).
    expected = math.sqrt(5 / 3) / 2
    assert float(standard_error(np.array([1.0, 2.0, 3.0, 4.0]))) == pytest.approx(
        expected, rel=1e-12
    )
    assert spread(np.array([1.0, 2.0, np.nan, 3.0, 4.0])).standard_error == pytest.approx(
        expected, rel=1e-12
    )


def test_standard_error_works_along_an_axis_and_scales():
    values = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0]])
    per_column = standard_error(values, axis=0, scale=100.0)
    assert per_column.shape == (2,)
    assert per_column[0] == pytest.approx(100 * math.sqrt(5 / 3) / 2, rel=1e-12)
    assert per_column[1] == 0.0


def test_standard_error_is_nan_with_one_sample():
    assert np.isnan(standard_error(np.ones((3, 1)))).all()
    assert standard_error(np.ones((3, 1))).shape == (3,)
    assert math.isnan(spread(np.array([1.0, np.nan])).standard_error)
