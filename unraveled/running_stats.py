"""Running statistics that merge exactly: any split of the data, merged, equals one pass.

- ``Moments``: count, mean, variance (Chan et al.'s parallel update of the sum of squared
  deviations), maximum and the count of positive values, per feature.
- ``TopK``: per feature, the ``k`` largest values with a payload each (the token ids and the
  feature's values around the token), ordered by value, ties broken by the lower global token
  index, so the kept set does not depend on how the data was split.
- ``Sums``: plain sums with a count, for per-window means.

Everything is numpy in float64 (float32 for payloads), so states pickle cheaply between
processes (Ray workers) and merge in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int
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
        zeros = np.zeros(n_features)
        return cls(0, zeros, zeros.copy(), np.full(n_features, -np.inf), np.zeros(n_features, dtype=np.int64))

    @classmethod
    def of(cls, values: Float[NDArray, "sample feature"], positive_of: Float[NDArray, "sample feature"] | None = None) -> Moments:
        """The moments of one batch; ``positive_of`` (default ``values``) decides what counts as > 0."""
        values64 = values.astype(np.float64)
        mean = values64.mean(axis=0)
        return cls(
            count=len(values),
            mean=mean,
            m2=((values64 - mean) ** 2).sum(axis=0),
            maximum=values.max(axis=0).astype(np.float64),
            positive=((values if positive_of is None else positive_of) > 0).sum(axis=0).astype(np.int64),
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
        return self.positive / max(self.count, 1)


@dataclass
class TopK:
    """Per feature, the ``k`` largest values, their global token index and a payload.

    Rows are sorted by value (descending), then index (ascending); unfilled rows have value
    ``-inf`` and index ``NO_INDEX``.

    Attributes:
        values: ``[k, feature]``.
        index: ``[k, feature]`` global index of the token (``window * window_length + pos``).
        context_ids: ``[k, feature, context]`` token ids around the token, ``-1`` outside the window.
        context_values: ``[k, feature, context]`` the feature's values on those tokens.
    """

    values: Float[NDArray, "k feature"]
    index: Int[NDArray, "k feature"]
    context_ids: Int[NDArray, "k feature context"]
    context_values: Float[NDArray, "k feature context"]

    @classmethod
    def empty(cls, k: int, n_features: int, context: int) -> TopK:
        return cls(
            values=np.full((k, n_features), -np.inf, dtype=np.float32),
            index=np.full((k, n_features), NO_INDEX, dtype=np.int64),
            context_ids=np.full((k, n_features, context), -1, dtype=np.int32),
            context_values=np.zeros((k, n_features, context), dtype=np.float32),
        )

    @property
    def k(self) -> int:
        return self.values.shape[0]

    def merge(self, other: TopK) -> TopK:
        """The ``k`` best of both, in the canonical order."""
        values = np.concatenate([self.values, other.values])
        index = np.concatenate([self.index, other.index])
        # lexsort sorts by the last key first: by -value, then by index.
        order = np.lexsort((index, -values.astype(np.float64)), axis=0)[: self.k]
        context_ids = np.concatenate([self.context_ids, other.context_ids])
        context_values = np.concatenate([self.context_values, other.context_values])
        return TopK(
            values=np.take_along_axis(values, order, axis=0),
            index=np.take_along_axis(index, order, axis=0),
            context_ids=np.take_along_axis(context_ids, order[..., None], axis=0),
            context_values=np.take_along_axis(context_values, order[..., None], axis=0),
        )


def top_k_of_batch(
    values: Float[NDArray, "window pos feature"],
    token_ids: Int[NDArray, "window pos"],
    window_offset: Int[NDArray, " window"],
    k: int,
    before: int,
    after: int,
    eligible: slice = slice(None),
) -> TopK:
    """The batch's own top ``k`` per feature, with contexts, in the canonical order.

    Args:
        values: The feature's value at every token of each window.
        token_ids: The windows' token ids.
        window_offset: Global index of each window's position 0 (``window * window_length``).
        k: How many to keep.
        before: Context tokens kept before the top token.
        after: Context tokens kept after it.
        eligible: The positions that may be top tokens (e.g. all but a BOS at 0); the context
            still shows every position.
    """
    n_windows, length, n_features = values.shape
    positions = np.arange(length)[eligible]
    flat = values[:, positions, :].reshape(-1, n_features)
    global_index = (window_offset[:, None] + positions[None, :]).reshape(-1)
    k_batch = min(k, len(flat))
    rows = np.argpartition(-flat, k_batch - 1, axis=0)[:k_batch]  # [k_batch, feature], unordered
    kth = np.take_along_axis(flat, rows, axis=0).min(axis=0)
    # Where values equal to the k-th largest don't all fit, the lower global index must win
    # (as in ``merge``), which argpartition doesn't promise: settle those features one by one.
    for f in np.nonzero((flat >= kth[None, :]).sum(axis=0) > k_batch)[0]:
        tied = np.nonzero(flat[:, f] >= kth[f])[0]
        rows[:, f] = tied[np.lexsort((global_index[tied], -flat[tied, f].astype(np.float64)))[:k_batch]]
    top_values = np.take_along_axis(flat, rows, axis=0)
    order = np.lexsort((global_index[rows], -top_values.astype(np.float64)), axis=0)
    rows = np.take_along_axis(rows, order, axis=0)
    window = rows // len(positions)
    pos = positions[rows % len(positions)]
    offsets = np.arange(-before, after + 1)
    at = pos[..., None] + offsets  # [k_batch, feature, context]
    inside = (at >= 0) & (at < length)
    at_clipped = np.clip(at, 0, length - 1)
    feature = np.arange(n_features)[None, :, None]
    context_values = np.where(inside, values[window[..., None], at_clipped, feature], 0.0).astype(np.float32)
    context_ids = np.where(inside, token_ids[window[..., None], at_clipped], -1).astype(np.int32)
    top = TopK(
        values=np.take_along_axis(flat, rows, axis=0).astype(np.float32),
        index=global_index[rows].astype(np.int64),
        context_ids=context_ids,
        context_values=context_values,
    )
    return top if k_batch == k else TopK.empty(k, n_features, len(offsets)).merge(top)


@dataclass
class Sums:
    """Sums of per-window scores and the number of windows, for means that merge by adding."""

    total: dict[str, Float[NDArray, "..."]]
    count: int

    def merge(self, other: Sums) -> Sums:
        if not self.total:
            return other
        if not other.total:
            return self
        return Sums({name: self.total[name] + other.total[name] for name in self.total}, self.count + other.count)

    def means(self) -> dict[str, Float[NDArray, "..."]]:
        return {name: total / max(self.count, 1) for name, total in self.total.items()}
