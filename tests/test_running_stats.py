"""Running statistics against direct computation over the whole tensor, and split-merge equality."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from unraveled.running_stats import LogHistogram, Moments, Sums, TopK, top_k_of_batch

WINDOWS, LENGTH, FEATURES, K, BEFORE, AFTER = 20, 7, 5, 4, 2, 1


def _data(ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(WINDOWS, LENGTH, FEATURES)).astype(np.float32)
    if ties:  # few distinct values: the k-th largest is shared by many tokens
        values = np.round(values).astype(np.float32)
    token_ids = rng.integers(0, 1000, size=(WINDOWS, LENGTH))
    return values, token_ids


def _state(values: np.ndarray, token_ids: np.ndarray, windows: np.ndarray) -> tuple[Moments, TopK]:
    flat = values.reshape(-1, FEATURES)
    top = top_k_of_batch(values, token_ids, windows * LENGTH, K, BEFORE, AFTER)
    return Moments.of(flat), top


def _split_run(values: np.ndarray, token_ids: np.ndarray, parts: int) -> tuple[Moments, TopK]:
    states = [
        _state(values[chunk], token_ids[chunk], chunk)
        for chunk in np.array_split(np.arange(WINDOWS), parts)
    ]
    return functools.reduce(lambda a, b: (a[0].merge(b[0]), a[1].merge(b[1])), states)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_split_and_merge_equals_direct_computation(parts: int, ties: bool) -> None:
    values, token_ids = _data(ties)
    moments, top = _split_run(values, token_ids, parts)
    flat = values.reshape(-1, FEATURES).astype(np.float64)
    assert moments.count == WINDOWS * LENGTH
    np.testing.assert_allclose(moments.mean, flat.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.std, flat.std(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(moments.maximum, flat.max(axis=0))
    np.testing.assert_array_equal(moments.positive_fraction, (flat > 0).mean(axis=0))
    for feature in range(FEATURES):
        # Independent ranking: Python's sort over (-value, global index) of every token.
        ranked = sorted(range(len(flat)), key=lambda i: (-flat[i, feature], i))[:K]
        assert top.index[:, feature].tolist() == ranked
        assert top.values[:, feature].tolist() == [flat[i, feature] for i in ranked]
        for slot, i in enumerate(ranked):
            window, pos = divmod(i, LENGTH)
            for offset in range(-BEFORE, AFTER + 1):
                column = offset + BEFORE
                if 0 <= pos + offset < LENGTH:
                    assert top.context_ids[slot, feature, column] == token_ids[window, pos + offset]
                    assert (
                        top.context_values[slot, feature, column]
                        == values[window, pos + offset, feature]
                    )
                else:
                    assert top.context_ids[slot, feature, column] == -1


def test_splits_agree_with_each_other_exactly_on_top_k() -> None:
    values, token_ids = _data(ties=True)
    one, five = _split_run(values, token_ids, 1)[1], _split_run(values, token_ids, 5)[1]
    for name in ("values", "index", "context_ids", "context_values"):
        np.testing.assert_array_equal(getattr(one, name), getattr(five, name))


def test_top_k_keeps_eligible_positions_only_and_fills_short_batches() -> None:
    values = np.arange(6, dtype=np.float32).reshape(1, 3, 2)  # one window, 3 tokens, 2 features
    top = top_k_of_batch(
        values,
        np.array([[7, 8, 9]]),
        np.array([30]),
        k=4,
        before=0,
        after=0,
        eligible=slice(1, None),
    )
    assert top.index[:, 0].tolist() == [
        32,
        31,
        TopK.empty(1, 1, 1).index[0, 0],
        TopK.empty(1, 1, 1).index[0, 0],
    ]
    assert top.values[:2, 1].tolist() == [5.0, 3.0] and np.isneginf(top.values[2:]).all()


def test_moments_positive_count_can_follow_another_tensor() -> None:
    values = np.array([[1.0], [2.0], [3.0]])
    gate = np.array([[-1.0], [0.0], [0.5]])
    assert Moments.of(values, positive_of=gate).positive.tolist() == [1]


def test_sums_merge_to_the_mean_over_all_windows() -> None:
    scores = np.random.default_rng(1).normal(size=(6, 2, 3))
    parts = [Sums({"s": part.sum(axis=0)}, len(part)) for part in np.array_split(scores, 3)]
    merged = functools.reduce(Sums.merge, parts, Sums({}, 0))
    np.testing.assert_allclose(merged.means()["s"], scores.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("parts", [1, 3, WINDOWS])
@pytest.mark.parametrize("payload_rows", [1, 2])
def test_payloads_of_the_first_rows_only_merge_to_the_full_payloads_first_rows(
    parts: int, ties: bool, payload_rows: int
) -> None:
    """Contexts kept for the first rows only, merged over any split (windows of one token and
    batches shorter than ``k`` included), are the first rows of the contexts kept for all ``k``."""
    values, token_ids = _data(ties)
    full = _split_run(values, token_ids, 1)[1]
    tops = [
        top_k_of_batch(
            values[chunk],
            token_ids[chunk],
            chunk * LENGTH,
            K,
            BEFORE,
            AFTER,
            payload_rows=payload_rows,
        )
        for chunk in np.array_split(np.arange(WINDOWS), parts)
    ]
    merged = functools.reduce(
        TopK.merge, tops, TopK.empty(K, FEATURES, BEFORE + 1 + AFTER, payload_rows)
    )
    assert merged.context_ids.shape[0] == payload_rows
    np.testing.assert_array_equal(merged.values, full.values)
    np.testing.assert_array_equal(merged.index, full.index)
    np.testing.assert_array_equal(merged.context_ids, full.context_ids[:payload_rows])
    np.testing.assert_array_equal(merged.context_values, full.context_values[:payload_rows])


def test_merging_into_more_payload_rows_than_a_part_kept_is_refused() -> None:
    values, token_ids = _data(ties=False)
    narrow = top_k_of_batch(
        values, token_ids, np.arange(WINDOWS) * LENGTH, K, BEFORE, AFTER, payload_rows=1
    )
    with pytest.raises(ValueError, match="payload"):
        TopK.empty(K, FEATURES, BEFORE + 1 + AFTER).merge(narrow)


@pytest.mark.parametrize("size", [1, 2, 999, 10_000])
def test_log_histogram_median_is_numpys_within_its_stated_tolerance(size: int) -> None:
    rng = np.random.default_rng(size)
    # Magnitudes over eight decades, with exact zeros among them, as residual |values| can be.
    values = np.abs(rng.lognormal(mean=0.0, sigma=4.0, size=size)) * (rng.random(size) > 0.05)
    histogram = LogHistogram.of(values.astype(np.float32))
    middle = float(np.sort(values.astype(np.float32))[(size - 1) // 2])  # the lower middle value
    assert histogram.count == size
    if middle == 0:
        assert histogram.median() == 0
    else:
        assert abs(np.log10(histogram.median() / middle)) <= 0.5 / histogram.bins_per_decade + 1e-12
    if (
        size > 100
    ):  # numpy's median (the mean of the two middle values for an even count) is as close
        assert histogram.median() == pytest.approx(
            float(np.median(values.astype(np.float32))), rel=histogram.relative_tolerance
        )
    assert histogram.relative_tolerance == pytest.approx(10 ** (0.005) - 1)


def test_log_histogram_median_of_known_values_and_its_ends() -> None:
    # Odd count: the middle value is 3.0; its bin's centre is within 1.2%.
    assert LogHistogram.of(np.array([0.0, 1.0, 3.0, 50.0, 7e3])).median() == pytest.approx(
        3.0, rel=0.012
    )
    assert LogHistogram.of(np.array([0.0, 0.0, 5.0])).median() == 0.0  # zeros are the underflow
    assert LogHistogram.of(np.array([1e9, 1e10, 1.0])).median() == np.inf  # past the top bin
    assert np.isnan(LogHistogram.empty().median())


@pytest.mark.parametrize("parts", [2, 7])
def test_log_histogram_split_and_merged_equals_one_pass(parts: int) -> None:
    values = np.abs(np.random.default_rng(3).standard_cauchy(size=5_000)).astype(np.float32)
    whole = LogHistogram.of(values)
    merged = functools.reduce(
        LogHistogram.merge,
        [LogHistogram.of(part) for part in np.array_split(values, parts)],
        LogHistogram.empty(),
    )
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.median() == whole.median()
    assert abs(np.log10(merged.median() / np.median(values))) <= 1.5 / whole.bins_per_decade
    with pytest.raises(ValueError, match="bins"):
        whole.merge(LogHistogram.empty(bins_per_decade=10))
