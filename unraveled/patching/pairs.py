"""Prompt pairs: the batch every patching function runs on, and its clean and corrupted runs.

Also your own pairs as such a batch (``user_pairs``) and the positions the residual stream is
patched at for them (``position_groups``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

from unraveled.datasets.pairs import PromptPair

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


def user_pairs(
    model: HookedTransformer, rows: Sequence[PromptPair], clean_only: bool = False
) -> PromptPairs:
    """Your own pairs as a batch: token ids right-padded, each prompt's last token, the answers.

    ``correct`` is each pair's clean answer and ``incorrect`` its corrupted answer. The pairs
    are checked beforehand (``unraveled.datasets.pairs.check_pairs``): one-token answers, and
    unless ``clean_only`` (the corrupted prompts are then not read and stand as the clean ones),
    prompts of equal length per pair.
    """
    from unraveled.activations import right_pad
    from unraveled.logits import answer_token_id

    clean_rows = [model.to_tokens(row.clean)[0] for row in rows]
    corrupted_rows = (
        clean_rows if clean_only else [model.to_tokens(row.corrupted)[0] for row in rows]
    )
    (clean, _), (corrupted, _) = right_pad(model, clean_rows), right_pad(model, corrupted_rows)
    return PromptPairs(
        clean=clean,
        corrupted=corrupted,
        last=torch.tensor([len(row) - 1 for row in clean_rows]),
        correct=torch.tensor(
            [
                answer_token_id(model, row.clean_answer, f"pair {index}: clean_answer")
                for index, row in enumerate(rows)
            ]
        ),
        incorrect=torch.tensor(
            [
                answer_token_id(model, row.corrupted_answer, f"pair {index}: corrupted_answer")
                for index, row in enumerate(rows)
            ]
        ),
    )


CHANGE_GROUPS = ("before the change", "changed", "after the change", "end")
"""Position groups of pairs of different lengths: the tokens before the first one the prompts
differ in, the differing tokens, the tokens after the first change that are the same, and the
last token (whatever it is)."""


def position_groups(
    model: HookedTransformer, pairs: PromptPairs
) -> tuple[list[str], list[Bool[Tensor, "batch pos"]], bool]:
    """The positions the residual stream is patched at, for your own pairs.

    When every prompt has the same token length, each position on its own, labelled with its
    token where every clean prompt has the same one there, else with its index. Otherwise the
    positions don't line up across pairs, and they are grouped by ``CHANGE_GROUPS``.

    Returns:
        The labels, the groups (which positions of each prompt), and whether they are groups
        rather than single positions.
    """
    lengths = pairs.last + 1
    n_pos = pairs.clean.shape[1]
    if bool((lengths == n_pos).all()):
        labels = [
            model.tokenizer.decode([int(column[0])])
            if bool((column == column[0]).all())
            else f"position {index}"
            for index, column in enumerate(pairs.clean.T)
        ]
        each = torch.eye(n_pos, dtype=torch.bool)[:, None, :].repeat(1, pairs.size, 1)
        return labels, list(each), False
    positions = torch.arange(n_pos)[None]
    real = positions < lengths[:, None]
    end = positions == pairs.last[:, None]
    changed = (pairs.clean != pairs.corrupted) & real & ~end
    first_change = torch.where(
        (pairs.clean != pairs.corrupted).any(1),
        (pairs.clean != pairs.corrupted).int().argmax(1),
        lengths,
    )
    before = (positions < first_change[:, None]) & ~end
    after = real & ~before & ~changed & ~end
    return list(CHANGE_GROUPS), [before, changed, after, end], True
