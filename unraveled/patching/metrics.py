"""What a patched run is scored by: a metric of the logits at each prompt's last token.

A metric takes the logits at each prompt's last real token (right-padded prompts end at different
positions) and the prompt pairs (their answers), and returns one value per prompt, like the
metric functions of TransformerLens's patching demos. Patching functions run row subsets and
copies of the batch, so a metric reads each row's answers from the ``pairs`` it is given rather
than from a batch it closed over. The default is the logit difference of the correct over the
incorrect answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.patching.pairs import PromptPairs

Metric = Callable[[Float[Tensor, "batch d_vocab"], PromptPairs], Float[Tensor, " batch"]]
"""A score per prompt from the logits at each prompt's last token and the pairs (their answers)."""


def logit_difference(
    last_logits: Float[Tensor, "batch d_vocab"], pairs: PromptPairs
) -> Float[Tensor, " batch"]:
    """Correct minus incorrect logit: the default metric."""
    rows = torch.arange(last_logits.shape[0])
    return last_logits[rows, pairs.correct] - last_logits[rows, pairs.incorrect]


def last_token_logits(
    logits: Float[Tensor, "batch pos d_vocab"], pairs: PromptPairs
) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each prompt's last real token."""
    return logits[torch.arange(logits.shape[0]), pairs.last]


def logit_differences(
    logits: Float[Tensor, "batch pos d_vocab"], pairs: PromptPairs
) -> Float[Tensor, " batch"]:
    """Correct minus incorrect logit at each prompt's last token, from a whole run's logits."""
    return logit_difference(last_token_logits(logits, pairs), pairs)


def metric_after_last_block(
    model: HookedTransformer,
    residual: Float[Tensor, "rows pos d_model"],
    pairs: PromptPairs,
    metric: Metric,
) -> Float[Tensor, " rows"]:
    """The metric from the residual stream after the last block, for copies of the batch.

    For the logit difference only the two answers' unembedding columns are computed: the whole
    vocabulary's logits of every copy would be most of a patched pass's memory. Any other metric
    gets each copy's last-token logits in full.
    """
    repeated = pairs.repeat(residual.shape[0] // pairs.size)
    final = residual[torch.arange(residual.shape[0]), repeated.last]
    if model.cfg.normalization_type is not None:
        final = model.ln_final(final[:, None])[:, 0]
    if metric is logit_difference:
        correct, incorrect = repeated.correct, repeated.incorrect
        direction = model.W_U[:, correct] - model.W_U[:, incorrect]  # [d_model, rows]
        return (final * direction.T).sum(-1) + model.b_U[correct] - model.b_U[incorrect]
    return metric(model.unembed(final[:, None])[:, 0], repeated)


@dataclass(frozen=True)
class Recovery:
    """Where a patched run's metric sits between the corrupted run (0) and the clean run (1).

    Attributes:
        clean: The clean run's mean metric.
        corrupted: The corrupted run's mean metric.
    """

    clean: float
    corrupted: float

    @classmethod
    def between(
        cls, clean: float, corrupted: float, field: str, metric: str = "logit difference"
    ) -> Recovery:
        """The scale from ``corrupted`` to ``clean``; an error naming ``field`` when they agree.

        Raises:
            ValueError: The clean and corrupted runs score the same (by ``metric``, named in
                the message), so no patch can recover anything.
        """
        if abs(clean - corrupted) < 1e-6:
            raise ValueError(
                f"{field}: the clean and corrupted prompts give the same mean {metric}: "
                "nothing to recover"
            )
        return cls(clean, corrupted)

    @classmethod
    def of(
        cls,
        metric: Metric,
        clean_logits: Float[Tensor, "batch d_vocab"],
        corrupted_logits: Float[Tensor, "batch d_vocab"],
        pairs: PromptPairs,
        field: str,
        name: str = "logit difference",
    ) -> Recovery:
        """The scale from the corrupted run's mean ``metric`` to the clean run's.

        Args:
            metric: The metric (``name`` in messages).
            clean_logits: The clean prompts' logits at each prompt's last token.
            corrupted_logits: The corrupted prompts'.
            pairs: The pairs.
            field: The param an error names when the runs score the same.
            name: How messages name the metric.

        Raises:
            ParamError: The metric does not give one score per prompt (naming ``metric``).
            ValueError: The clean and corrupted runs score the same.
        """
        from unraveled.errors import ParamError

        scores = [metric(logits, pairs) for logits in (clean_logits, corrupted_logits)]
        for score in scores:
            if not isinstance(score, Tensor) or score.shape != (pairs.size,):
                shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
                raise ParamError(
                    "metric",
                    f"{name} returned {shape}; expected a tensor of one score per prompt, "
                    f"shape ({pairs.size},)",
                )
        return cls.between(float(scores[0].mean()), float(scores[1].mean()), field, name)

    @property
    def span(self) -> float:
        """Clean minus corrupted."""
        return self.clean - self.corrupted

    def share(self, patched: Float[Tensor, "*sets batch"]) -> Float[Tensor, " *sets"]:
        """Each patch set's share recovered, from its metric per prompt (mean over prompts)."""
        return (patched.mean(-1) - self.corrupted) / self.span


def answer_summary(
    last_logits: Float[Tensor, "batch d_vocab"],
    pairs: PromptPairs,
    answer: Literal["correct", "incorrect"] = "correct",
) -> dict[str, float]:
    """The mean logit difference and how often the prompts give ``answer``.

    Besides the mean logit difference (correct minus incorrect: the patching metric), the share
    of prompts preferring ``answer`` to the other answer, and the share whose top prediction it
    is. Score each prompt set against its own answer: the clean prompts against ``"correct"``,
    and corrupted prompts whose answer flips (IOI's ``swap``) against ``"incorrect"``; scored
    against the clean answer, a corrupted run that answers right reads 0.
    """
    differences = logit_difference(last_logits, pairs)
    own, other, preferred = (
        (pairs.correct, "incorrect", differences > 0)
        if answer == "correct"
        else (pairs.incorrect, "correct", differences < 0)
    )
    return {
        "mean_logit_difference": float(differences.mean()),
        f"share_{answer}_over_{other}": float(preferred.float().mean()),
        f"share_{answer}_is_top_prediction": float((last_logits.argmax(-1) == own).float().mean()),
    }
