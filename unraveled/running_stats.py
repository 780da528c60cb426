"""Running statistics that merge exactly: any split of the data, merged, equals one pass.

- ``Moments``: count, mean, variance (Chan et al.'s parallel update of the sum of squared
  deviations), maximum and the count of positive values, per feature.
- ``TopK``: per feature, the ``k`` largest values with a payload each (the token ids and the
  feature's values around the token), ordered by value, ties broken by the lower global token
  index, so the kept set does not depend on how the data was split.
- ``Sums``: plain sums with a count, for per-window means.
- ``LogHistogram``: counts of magnitudes in fixed bins on a log scale, for a median that merges
  (an exact median would need every value kept), within one bin's width.

Everything is numpy in float64 (float32 for payloads), so states pickle cheaply between
processes (Ray workers) and merge in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float, Int
from numpy.typing import NDArray

NO_INDEX = np.iinfo(np.int64).max


@dataclass
class Moments:
    """Per-feature count, mean, sum of squared deviations (``m2``), maximum and positive count."""

    count: int
    mean: Float[NDArray, " feature"]
    m2: Float[NDArray, " feature"]
    maximum: Float[NDArray, " feature"]
    positive: Int[NDArray, " feature"]

    @classmethod
    def empty(cls, n_features: int) -> Moments:
        """The moments of no values: count 0, maximum -inf, ready to merge into."""
        zeros = np.zeros(n_features)
        return cls(
            0,
            zeros,
            zeros.copy(),
            np.full(n_features, -np.inf),
            np.zeros(n_features, dtype=np.int64),
        )

    @classmethod
    def of(
        cls,
        values: Float[NDArray, "sample feature"],
        positive_of: Float[NDArray, "sample feature"]
        | Bool[NDArray, "sample feature"]
        | None = None,
    ) -> Moments:
        """The moments of one batch; ``positive_of`` (default ``values``) decides what is > 0.

        A boolean ``positive_of`` counts where it is True (e.g. an SAE feature's "active").
        """
        values64 = values.astype(np.float64)
        mean = values64.mean(axis=0)
        return cls(
            count=len(values),
            mean=mean,
            m2=((values64 - mean) ** 2).sum(axis=0),
            maximum=values.max(axis=0).astype(np.float64),
            positive=((values if positive_of is None else positive_of) > 0)
            .sum(axis=0)
            .astype(np.int64),
        )

    def merge(self, other: Moments) -> Moments:
        """Chan, Golub and LeVeque's pairwise combination; exact up to float rounding."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        return Moments(
            count=count,
            mean=self.mean + delta * other.count / count,
            m2=self.m2 + other.m2 + delta**2 * self.count * other.count / count,
            maximum=np.maximum(self.maximum, other.maximum),
            positive=self.positive + other.positive,
        )

    @property
    def std(self) -> Float[NDArray, " feature"]:
        """Population standard deviation (``ddof=0``)."""
        return np.sqrt(self.m2 / max(self.count, 1))

    @property
    def positive_fraction(self) -> Float[NDArray, " feature"]:
        """Fraction of the values above zero, per feature (0 when there are none)."""
        return self.positive / max(self.count, 1)


@dataclass
class TopK:
    """Per feature, the ``k`` largest values and their global token index, some with a payload.

    The first ``payload_rows`` of them have a payload: the context around the token. Rows are
    sorted by value (descending), then index (ascending); unfilled rows have value ``-inf`` and
    index ``NO_INDEX``. Payloads merge exactly however the data was split: a row among the first
    ``payload_rows`` of the merged order is among the first ``payload_rows`` of its own part
    (fewer rows than that beat it overall, so fewer beat it there).

    Attributes:
        values: ``[k, feature]``.
        index: ``[k, feature]`` global index of the token (``window * window_length + pos``).
        context_ids: ``[payload_rows, feature, context]`` token ids around the token, ``-1``
            outside the window.
        context_values: ``[payload_rows, feature, context]`` the feature's values on those tokens.
    """

    values: Float[NDArray, "k feature"]
    index: Int[NDArray, "k feature"]
    context_ids: Int[NDArray, "payload_rows feature context"]
    context_values: Float[NDArray, "payload_rows feature context"]

    @classmethod
    def empty(cls, k: int, n_features: int, context: int, payload_rows: int | None = None) -> TopK:
        """No values yet: every row unfilled, with payloads for ``payload_rows`` (default ``k``)."""
        rows = k if payload_rows is None else min(payload_rows, k)
        return cls(
            values=np.full((k, n_features), -np.inf, dtype=np.float32),
            index=np.full((k, n_features), NO_INDEX, dtype=np.int64),
            context_ids=np.full((rows, n_features, context), -1, dtype=np.int32),
            context_values=np.zeros((rows, n_features, context), dtype=np.float32),
        )

    @property
    def k(self) -> int:
        """How many values are kept per feature."""
        return self.values.shape[0]

    @property
    def payload_rows(self) -> int:
        """For how many of the top rows a payload is kept."""
        return self.context_ids.shape[0]

    def merge(self, other: TopK) -> TopK:
        """The ``k`` best of both, in the canonical order, with ``self``'s payload row count."""
        values = np.concatenate([self.values, other.values])
        index = np.concatenate([self.index, other.index])
        # lexsort sorts by the last key first: by -value, then by index.
        order = np.lexsort((index, -values.astype(np.float64)), axis=0)[: self.k]
        # Row r of the merged order came from row r of self, or row r - k of other: its payload
        # row in the two payloads one after the other.
        source = order[: self.payload_rows]
        from_other = source >= self.k
        payload_row = np.where(from_other, self.payload_rows + source - self.k, source)
        if (
            np.where(from_other, source - self.k, source)
            >= np.where(from_other, other.payload_rows, self.payload_rows)
        ).any():
            raise ValueError(
                "a merged row's payload was not kept: "
                "both parts need payloads for at least as many rows as the result"
            )
        context_ids = np.concatenate([self.context_ids, other.context_ids])
        context_values = np.concatenate([self.context_values, other.context_values])
        return TopK(
            values=np.take_along_axis(values, order, axis=0),
            index=np.take_along_axis(index, order, axis=0),
            context_ids=np.take_along_axis(context_ids, payload_row[..., None], axis=0),
            context_values=np.take_along_axis(context_values, payload_row[..., None], axis=0),
        )


def top_k_of_batch(
    values: Float[NDArray, "window pos feature"],
    token_ids: Int[NDArray, "window pos"],
    window_offset: Int[NDArray, " window"],
    k: int,
    before: int,
    after: int,
    eligible: slice = slice(None),
    payload_rows: int | None = None,
    shown: Float[NDArray, "window pos feature"] | None = None,
) -> TopK:
    """The batch's own top ``k`` per feature, with contexts, in the canonical order.

    Args:
        values: The feature's value at every token of each window; -inf ranks a token out (it
            is never kept: a feature with fewer other values keeps unfilled rows).
        token_ids: The windows' token ids.
        window_offset: Global index of each window's position 0 (``window * window_length``).
        k: How many to keep.
        before: Context tokens kept before the top token.
        after: Context tokens kept after it.
        eligible: The positions that may be top tokens (e.g. all but a BOS at 0); the context
            still shows every position.
        payload_rows: For how many of the top rows a context is kept (default ``k``).
        shown: The values the contexts show (default ``values``): where ``values`` ranks
            tokens out with -inf but a context should still show what is there.
    """
    payload_rows = k if payload_rows is None else min(payload_rows, k)
    _, length, n_features = values.shape
    positions = np.arange(length)[eligible]
    flat = values[:, positions, :].reshape(-1, n_features)
    global_index = (window_offset[:, None] + positions[None, :]).reshape(-1)
    k_batch = min(k, len(flat))
    rows = np.argpartition(-flat, k_batch - 1, axis=0)[:k_batch]  # [k_batch, feature], unordered
    kth = np.take_along_axis(flat, rows, axis=0).min(axis=0)
    # Where values equal to the k-th largest don't all fit, the lower global index must win
    # (as in ``merge``), which argpartition doesn't promise: settle those features one by one.
    # A k-th value of -inf needs no settling: -inf values are never kept (below).
    unsettled = ((flat >= kth[None, :]).sum(axis=0) > k_batch) & np.isfinite(kth)
    for f in np.nonzero(unsettled)[0]:
        tied = np.nonzero(flat[:, f] >= kth[f])[0]
        rows[:, f] = tied[
            np.lexsort((global_index[tied], -flat[tied, f].astype(np.float64)))[:k_batch]
        ]
    top_values = np.take_along_axis(flat, rows, axis=0)
    order = np.lexsort((global_index[rows], -top_values.astype(np.float64)), axis=0)
    rows = np.take_along_axis(rows, order, axis=0)
    window = rows[:payload_rows] // len(positions)
    pos = positions[rows[:payload_rows] % len(positions)]
    offsets = np.arange(-before, after + 1)
    at = pos[..., None] + offsets  # [payload rows, feature, context]
    inside = (at >= 0) & (at < length)
    at_clipped = np.clip(at, 0, length - 1)
    feature = np.arange(n_features)[None, :, None]
    in_context = (values if shown is None else shown)[window[..., None], at_clipped, feature]
    context_values = np.where(inside, in_context, 0.0).astype(np.float32)
    context_ids = np.where(inside, token_ids[window[..., None], at_clipped], -1).astype(np.int32)
    top = TopK(
        values=np.take_along_axis(flat, rows, axis=0).astype(np.float32),
        index=global_index[rows].astype(np.int64),
        context_ids=context_ids,
        context_values=context_values,
    )
    # A value of -inf (a token ranked out, e.g. where an SAE feature is inactive) is an unfilled
    # row, whichever -inf argpartition picked: the result doesn't depend on the split.
    unfilled = np.isneginf(top.values)
    if unfilled.any():
        top.index[unfilled] = NO_INDEX
        top.context_ids[unfilled[:payload_rows]] = -1
        top.context_values[unfilled[:payload_rows]] = 0.0
    return top if k_batch == k else TopK.empty(k, n_features, len(offsets), payload_rows).merge(top)


@dataclass
class Sums:
    """Sums of per-window scores and the number of windows, for means that merge by adding."""

    total: dict[str, Float[NDArray, ...]]
    count: int

    def merge(self, other: Sums) -> Sums:
        """Totals added name by name, and counts added; an empty side leaves the other as is."""
        if not self.total:
            return other
        if not other.total:
            return self
        return Sums(
            {name: self.total[name] + other.total[name] for name in self.total},
            self.count + other.count,
        )

    def means(self) -> dict[str, Float[NDArray, ...]]:
        """Each total divided by the number of windows (0 when there are none)."""
        return {name: total / max(self.count, 1) for name, total in self.total.items()}


@dataclass
class LogHistogram:
    """Counts of values in fixed, equal-width bins of ``log10(value)``, for a mergeable median.

    Every shard uses the same bins, so merging is adding counts, exact for any split. A value
    below ``10**low`` (zero included) counts in the first bin's underflow, one above
    ``10**high`` in the overflow. The median it gives is the geometric centre of the bin holding
    the middle value (the lower one for an even count), within a factor of
    ``10 ** (0.5 / bins_per_decade)`` of that value (1.2% for 100 bins per decade). numpy's
    median of an even count is the mean of the two middle values: over the many values of a
    layer's activations they are as good as equal.

    Attributes:
        counts: ``[underflow, bins..., overflow]``.
        low, high: Log10 of the bins' range.
        bins_per_decade: Bins per factor of 10.
    """

    counts: Int[NDArray, " bin"]
    low: int = -8
    high: int = 8
    bins_per_decade: int = 100

    @classmethod
    def empty(cls, low: int = -8, high: int = 8, bins_per_decade: int = 100) -> LogHistogram:
        """A histogram with no values, its bins spanning ``10**low`` to ``10**high``."""
        return cls(
            np.zeros((high - low) * bins_per_decade + 2, dtype=np.int64), low, high, bins_per_decade
        )

    @classmethod
    def of(
        cls, values: Float[NDArray, ...], low: int = -8, high: int = 8, bins_per_decade: int = 100
    ) -> LogHistogram:
        """The histogram of one batch of non-negative values (magnitudes)."""
        n_bins = (high - low) * bins_per_decade
        with np.errstate(divide="ignore"):  # log10(0) = -inf: the underflow
            position = (
                np.log10(np.asarray(values, dtype=np.float64).ravel()) - low
            ) * bins_per_decade
        # 0 is the underflow, 1..n_bins the bins, n_bins + 1 the overflow.
        slot = np.clip(np.floor(position), -1, n_bins).astype(np.int64) + 1
        return cls(np.bincount(slot, minlength=n_bins + 2), low, high, bins_per_decade)

    def merge(self, other: LogHistogram) -> LogHistogram:
        """Counts added bin by bin; both histograms must have the same bins."""
        if (self.low, self.high, self.bins_per_decade) != (
            other.low,
            other.high,
            other.bins_per_decade,
        ):
            raise ValueError("histograms with different bins don't merge")
        return LogHistogram(self.counts + other.counts, self.low, self.high, self.bins_per_decade)

    @property
    def count(self) -> int:
        """How many values were counted, under- and overflow included."""
        return int(self.counts.sum())

    @property
    def relative_tolerance(self) -> float:
        """How far (as a factor minus one) the median can be from the middle value's bin centre."""
        return float(10 ** (0.5 / self.bins_per_decade) - 1)

    def median(self) -> float:
        """The geometric centre of the bin holding the lower middle value (NaN when empty).

        A median in the underflow is reported as 0, in the overflow as infinity.
        """
        if self.count == 0:
            return float("nan")
        slot = int(np.searchsorted(np.cumsum(self.counts), (self.count + 1) // 2))
        if slot == 0:
            return 0.0
        if slot == len(self.counts) - 1:
            return float("inf")
        return float(10 ** (self.low + (slot - 0.5) / self.bins_per_decade))
