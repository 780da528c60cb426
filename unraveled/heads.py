"""Scores that say what an attention head does, from its attention pattern.

Each score takes one prompt's patterns ``[layer, head, query_pos, key_pos]`` (padding already cut
off) and returns ``[layer, head]``; the first-token (sink) score is
``unraveled.analysis.attention_sink_by_head``. ``top_heads`` ranks any per-head score.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from torch import Tensor

from unraveled.components import HeadComponent


def induction_score(
    patterns: Float[Tensor, "layer head query_pos key_pos"], period: int
) -> Float[Tensor, "layer head"]:
    """Mean attention from each token of a repeated segment to the token after its earlier one.

    Assumes the last ``2 * period`` positions are a random segment followed by an exact copy of
    it (anything before, such as a BOS token, is ignored). Query ``q`` in the copy sees its own
    token ``period`` positions back; an induction head attends to the one after it,
    ``q - period + 1``.
    """
    length = patterns.shape[-1]
    if 2 * period > length:
        raise ValueError(
            f"period {period} needs at least {2 * period} positions, the pattern has {length}"
        )
    queries = torch.arange(length - period, length)
    return patterns[..., queries, queries - period + 1].mean(dim=-1)


def previous_token_score(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer head"]:
    """Mean attention from each token to the one right before it."""
    queries = torch.arange(1, patterns.shape[-1])
    return patterns[..., queries, queries - 1].mean(dim=-1)


def duplicate_token_score(
    patterns: Float[Tensor, "layer head query_pos key_pos"], tokens: Int[Tensor, " pos"]
) -> Float[Tensor, "layer head"]:
    """Attention each token pays to earlier occurrences of the same token.

    Averaged over the tokens that have one (zero when no token repeats).
    """
    same = tokens[:, None] == tokens[None, :]
    earlier_same = torch.tril(same, diagonal=-1).to(patterns.dtype)
    has_earlier = earlier_same.sum(dim=-1) > 0
    if not has_earlier.any():
        return torch.zeros(patterns.shape[:2], dtype=patterns.dtype)
    mass = (patterns * earlier_same).sum(dim=-1)  # [layer, head, query]
    return mass[..., has_earlier].mean(dim=-1)


def top_heads(
    scores: Float[NDArray, "layer head"], k: int, lowest: bool = False
) -> list[dict[str, float | str]]:
    """The ``k`` heads with the highest (or lowest) score, as ``{"head": "L.H", "score": ...}``."""
    order = np.argsort(scores if lowest else -scores, axis=None, kind="stable")[:k]
    n_heads = scores.shape[1]
    return [
        {
            "head": str(HeadComponent(int(index) // n_heads, int(index) % n_heads)),
            "score": float(scores.flat[index]),
        }
        for index in order
    ]
