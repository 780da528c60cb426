"""Prompt pairs: the batch every patching function runs on, and its clean and corrupted runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

Which = Literal["clean", "corrupted"]
"""Which prompts of the pairs a run reads."""
Cache = ActivationCache | dict[str, Tensor]
"""Activations by hook name, batch first: a TransformerLens cache or a plain dict."""


@dataclass(frozen=True)
class PromptPairs:
    """Clean and corrupted prompts as token ids, right-padded, with their answers.

    Attributes:
        clean: Clean prompts; each is as long as its corrupted partner.
        corrupted: Corrupted prompts.
        last: Index of each prompt's last real token, where the answer is predicted.
        correct: The clean prompt's answer.
        incorrect: The competing answer (the corrupted prompt's answer when the answer flips).
    """

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    correct: Int[Tensor, " batch"]
    incorrect: Int[Tensor, " batch"]

    @property
    def size(self) -> int:
        """The number of pairs."""
        return int(self.clean.shape[0])

    def tokens(self, which: Which) -> Int[Tensor, "batch pos"]:
        """The clean or the corrupted prompts."""
        return self.clean if which == "clean" else self.corrupted

    def repeat(self, copies: int) -> PromptPairs:
        """The batch ``copies`` times over, one copy after another (as patched runs lay it out)."""
        return PromptPairs(
            self.clean.repeat(copies, 1),
            self.corrupted.repeat(copies, 1),
            self.last.repeat(copies),
            self.correct.repeat(copies),
            self.incorrect.repeat(copies),
        )

    def rows(self, selected: slice) -> PromptPairs:
        """The pairs in rows ``selected``."""
        return PromptPairs(
            self.clean[selected],
            self.corrupted[selected],
            self.last[selected],
            self.correct[selected],
            self.incorrect[selected],
        )


def single_pair(
    model: HookedTransformer,
    clean: str,
    corrupted: str,
    correct: int,
    incorrect: int,
    field: str = "params",
) -> PromptPairs:
    """One clean/corrupted pair; a clear error when their token lengths differ."""
    clean_ids, corrupted_ids = model.to_tokens(clean), model.to_tokens(corrupted)
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(
            f"{field}.clean is {clean_ids.shape[1]} tokens and {field}.corrupted is "
            f"{corrupted_ids.shape[1]}: patching position by position needs prompts of the same "
            "token length"
        )
    return PromptPairs(
        clean=clean_ids,
        corrupted=corrupted_ids,
        last=torch.tensor([clean_ids.shape[1] - 1]),
        correct=torch.tensor([correct]),
        incorrect=torch.tensor([incorrect]),
    )


def run_cache(
    model: HookedTransformer, pairs: PromptPairs, which: Which, hooks: Sequence[str]
) -> tuple[Float[Tensor, "batch d_vocab"], ActivationCache]:
    """One forward of the clean or corrupted prompts.

    Returns:
        The logits at each prompt's last token, and a cache of ``hooks``.
    """
    wanted = set(hooks)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(
            pairs.tokens(which), names_filter=lambda name: name in wanted
        )
    return logits[torch.arange(pairs.size), pairs.last], cache
