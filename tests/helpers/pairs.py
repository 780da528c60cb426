"""Your own prompt pairs for the tests of ``prompts: pairs``, and patching written the naive way.

The naive patching runs each pair alone (no padding, no batching, no start-at-layer), with one
TransformerLens hook writing the clean run's activation into the corrupted run, and scores the
output with the metric by hand: an independent computation of what the experiments report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

# Of different token lengths (the residual stream is then patched per group of positions), each
# pair's prompts of the same length, every answer one token for GPT-2's tokenizer.
ROWS = [
    {
        "clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Mary and John went to the store, Mary gave a drink to",
        "clean_answer": " Mary",
        "corrupted_answer": " John",
    },
    {
        "clean": "The capital of France is the city of",
        "corrupted": "The capital of Italy is the city of",
        "clean_answer": " Paris",
        "corrupted_answer": " Rome",
    },
    {
        "clean": "Tom gave the ball to Sam, then Sam gave it back to",
        "corrupted": "Tom gave the ball to Sam, then Tom gave it back to",
        "clean_answer": " Tom",
        "corrupted_answer": " Sam",
    },
]


def clean_answer_log_prob(last_logits: Tensor, pairs: Any) -> Tensor:
    """A nonlinear metric: the log-probability of each prompt's clean answer."""
    rows = torch.arange(last_logits.shape[0])
    return last_logits.log_softmax(-1)[rows, pairs.correct]


def logit_difference_by_hand(last_logits: Tensor, pairs: Any) -> Tensor:
    """The logit difference, written again: a custom metric that should give the built-in one."""
    rows = torch.arange(last_logits.shape[0])
    return last_logits[rows, pairs.correct] - last_logits[rows, pairs.incorrect]


def one_token(model: HookedTransformer, text: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    assert len(ids) == 1
    return int(ids[0])


def naive_scores(
    model: HookedTransformer,
    rows: Sequence[dict[str, str]],
    score: Callable[[Tensor, int], float],
    hook: str | None = None,
    replace: Callable[[Tensor, Tensor, Tensor, Tensor], None] | None = None,
) -> list[float]:
    """Each pair's corrupted run, with ``hook``'s activation partly replaced from its clean run.

    ``replace(activation, clean_activation, clean_tokens, corrupted_tokens)`` writes in place;
    without a hook, the corrupted run as it is. ``score(last_logits, clean_answer_id)``.
    """
    scores = []
    for row in rows:
        clean, corrupted = model.to_tokens(row["clean"]), model.to_tokens(row["corrupted"])
        hooks = []
        if hook is not None:
            assert replace is not None
            _, cache = model.run_with_cache(clean, names_filter=hook)

            def write(
                activation: Tensor,
                hook: Any,
                cache: Any = cache,
                clean: Tensor = clean,
                corrupted: Tensor = corrupted,
            ) -> Tensor:
                replace(activation, cache[hook.name], clean, corrupted)
                return activation

            hooks = [(hook, write)]
        with torch.inference_mode():
            logits = model.run_with_hooks(corrupted, fwd_hooks=hooks)
        scores.append(score(logits[0, -1], one_token(model, row["clean_answer"])))
    return scores


def clean_scores(
    model: HookedTransformer, rows: Sequence[dict[str, str]], score: Callable[[Tensor, int], float]
) -> list[float]:
    """Each pair's clean run, scored."""
    with torch.inference_mode():
        return [
            score(
                model(model.to_tokens(row["clean"]))[0, -1], one_token(model, row["clean_answer"])
            )
            for row in rows
        ]


def log_prob(last_logits: Tensor, answer: int) -> float:
    """``clean_answer_log_prob`` for one prompt, written again."""
    return float(torch.log_softmax(last_logits.double(), -1)[answer])
