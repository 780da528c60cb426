"""Indirect-object identification (IOI) prompt pairs, in the style of Wang et al. (2022).

A clean prompt names two people and then repeats one of them, the subject S: "When Mary and John
went to the store, John gave a drink to" should be completed with the other one, the indirect
object IO (" Mary"). Both name orders are generated, half of the pairs each: ABBA (IO first, "Mary
and John ... John") and BABA (S first, "John and Mary ... John").

The corrupted prompt of a pair changes only the second mention of the subject (S2), so both
prompts have the same tokens everywhere else and the same length:

- ``swap``: S2 becomes the IO name ("..., Mary gave a drink to"): the answer flips to S, and the
  clean and corrupted logit differences have opposite signs.
- ``abc``: S2 becomes a third name C ("..., Kate gave a drink to"): no name repeats, so the
  prompt no longer says which of the first two names is the answer.

The metric is the logit difference of IO over S at the last position. Names are checked to be
single tokens for the model's tokenizer (with the leading space they have in the prompt), and
every prompt's name positions are found in its own tokens, not assumed.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from jaxtyping import Bool
from pydantic import Field, field_validator

from unraveled.experiment import RESOLVE_ANNOTATIONS, Params

if (
    TYPE_CHECKING or RESOLVE_ANNOTATIONS
):  # names used in annotations only: validating params imports no torch
    from torch import Tensor
    from transformer_lens import HookedTransformer

    from unraveled.patching import PromptPairs

NAME_SLOTS = ("A", "B", "S")
OTHER_SLOTS = ("place", "object")

DEFAULT_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
]
# Single tokens, with a leading space, for both GPT-2's and SmolLM2's tokenizers (checked again at
# run time for whatever model runs).
DEFAULT_NAMES = [
    "Mary",
    "John",
    "Tom",
    "James",
    "Dan",
    "Sid",
    "Martin",
    "Amy",
    "Paul",
    "Kate",
    "Lisa",
    "Anna",
    "Sarah",
    "Mark",
    "David",
    "Michael",
    "Peter",
    "Jane",
    "Alice",
    "Bob",
    "Emma",
    "Jack",
    "Sam",
    "Ben",
    "Rose",
    "Ryan",
    "Luke",
    "Adam",
    "Eric",
    "Laura",
    "Max",
    "Ruth",
    "Carl",
    "Lucy",
    "Alex",
    "Tim",
    "Kevin",
    "Steve",
    "Rachel",
    "Helen",
    "George",
    "Frank",
    "Grace",
    "Joe",
    "Nick",
    "Chris",
]
DEFAULT_PLACES = [
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "station",
    "park",
    "market",
    "beach",
]
DEFAULT_OBJECTS = [
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
    "apple",
    "book",
]

ROLES = ("IO", "S1", "S1+1", "S2", "end", "other")
"""Position groups of a clean prompt: the two names, the token after the first subject, the
repeated subject, the last token, and every other token."""


class IOIParams(Params):
    """How to generate the IOI prompt pairs (an experiment's ``params.ioi`` block)."""

    n_pairs: int = Field(8, ge=1, le=512, description="Number of prompt pairs.")
    corruption: Literal["swap", "abc"] = Field(
        "swap",
        description="swap: S2 becomes the IO name (the answer flips); abc: S2 becomes a third "
        "name.",
    )
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        min_length=1,
        description="Prompts with the slots {A} and {B} (the two names) and {S} (the repeated "
        "one); optional {place} and {object}.",
    )
    names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NAMES),
        min_length=3,
        description="Names, each one token after a space.",
    )
    places: list[str] = Field(default_factory=lambda: list(DEFAULT_PLACES), min_length=1)
    objects: list[str] = Field(default_factory=lambda: list(DEFAULT_OBJECTS), min_length=1)

    @field_validator("templates")
    @classmethod
    def _templates_have_name_slots(cls, templates: list[str]) -> list[str]:
        for number, template in enumerate(templates):
            slots = [
                field for _, field, _, _ in string.Formatter().parse(template) if field is not None
            ]
            unknown = sorted(set(slots) - {*NAME_SLOTS, *OTHER_SLOTS})
            if unknown:
                raise ValueError(
                    f"template {number} ({template!r}) has unknown slots {unknown}; slots are "
                    "{A}, {B}, {S}, {place}, {object}"
                )
            for slot in NAME_SLOTS:
                if slots.count(slot) != 1:
                    raise ValueError(
                        f"template {number} ({template!r}) has the name slot {{{slot}}} "
                        f"{slots.count(slot)} times; each of {{A}}, {{B}} and {{S}} must appear "
                        "exactly once"
                    )
            if slots.index("S") < max(slots.index("A"), slots.index("B")):
                raise ValueError(
                    f"template {number} ({template!r}): {{S}} must come after {{A}} and {{B}}"
                )
            if re.search(r"\{[ABS]\}\W*$", template):
                raise ValueError(
                    f"template {number} ({template!r}) ends with a name; it must end where the "
                    "answer name would follow"
                )
        return templates

    @field_validator("names")
    @classmethod
    def _names_are_distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("names must be distinct")
        if any(not name.strip() or name != name.strip() for name in names):
            raise ValueError(
                "names must be non-empty, without surrounding spaces (the leading space is added)"
            )
        return names


def corrupted_prompts_answer(params: IOIParams) -> Literal["correct", "incorrect"]:
    """Which answer the corrupted prompts are scored against (``patching.answer_summary``).

    It is the ``answer`` to give ``unraveled.patching.answer_summary`` for the corrupted prompts.
    ``swap`` makes the clean run's incorrect name the corrupted prompts' own answer; ``abc`` leaves
    them no answer of their own, so they are scored against the clean answer.
    """
    return "incorrect" if params.corruption == "swap" else "correct"


@dataclass(frozen=True)
class IOIPair:
    """One clean/corrupted pair as text."""

    clean: str
    corrupted: str
    io: str
    s: str
    order: Literal["ABBA", "BABA"]
    template: int


def ioi_pairs(params: IOIParams, seed: int) -> list[IOIPair]:
    """The prompt pairs as text: deterministic given ``params`` and ``seed``.

    Pairs alternate ABBA and BABA. Templates are dealt across the pairs: every template once, in
    an order shuffled with ``random.Random(seed)``, before any is used again (drawn independently,
    a few pairs often share one template, and a result would be that template's). The names, the
    place and the object of each pair are drawn with the same generator.
    """
    rng = random.Random(seed)
    pairs = []
    dealt: list[int] = []
    for index in range(params.n_pairs):
        order: Literal["ABBA", "BABA"] = "ABBA" if index % 2 == 0 else "BABA"
        if not dealt:
            dealt = rng.sample(range(len(params.templates)), len(params.templates))
        template_index = dealt.pop()
        io, s, c = rng.sample(params.names, 3)
        place, thing = rng.choice(params.places), rng.choice(params.objects)
        a, b = (io, s) if order == "ABBA" else (s, io)
        second_mention = io if params.corruption == "swap" else c
        template = params.templates[template_index]
        pairs.append(
            IOIPair(
                clean=template.format(A=a, B=b, S=s, place=place, object=thing),
                corrupted=template.format(A=a, B=b, S=second_mention, place=place, object=thing),
                io=io,
                s=s,
                order=order,
                template=template_index,
            )
        )
    return pairs


@dataclass(frozen=True)
class IOIBatch:
    """The pairs as text and as token ids, with the positions of each role.

    Attributes:
        pairs: The text of each pair.
        tokens: Right-padded token ids of both prompts, each prompt's last position, and the
            answers: IO (correct) over S (incorrect).
        roles: For each of ``ROLES``, which positions of each clean prompt belong to it.
    """

    pairs: list[IOIPair]
    tokens: PromptPairs
    roles: dict[str, Bool[Tensor, "batch pos"]]


def _single_token(model: HookedTransformer, name: str, field: str) -> int:
    from unraveled.logits import single_token_id

    return single_token_id(
        model,
        f" {name}",
        f"{field}: {name!r}",
        "use single-token names",
        ", with its leading space",
    )


def ioi_batch(
    model: HookedTransformer, params: IOIParams, seed: int, field: str = "params.ioi"
) -> IOIBatch:
    """Generate the pairs and tokenize them for ``model``, checking every assumption.

    Raises:
        ValueError: A name that is not a single token for this model, or a pair whose prompts
            tokenize to different lengths or without the names where the template put them.
    """
    import torch

    from unraveled.activations import right_pad
    from unraveled.patching import PromptPairs

    ids = {name: _single_token(model, name, f"{field}.names") for name in params.names}
    pairs = ioi_pairs(params, seed)
    clean_rows = [model.to_tokens(pair.clean)[0] for pair in pairs]
    corrupted_rows = [model.to_tokens(pair.corrupted)[0] for pair in pairs]
    longest = max(len(row) for row in clean_rows)
    roles = {role: torch.zeros(len(pairs), longest, dtype=torch.bool) for role in ROLES}
    for row, (pair, clean_ids, corrupted_ids) in enumerate(
        zip(pairs, clean_rows, corrupted_rows, strict=True)
    ):
        if len(clean_ids) != len(corrupted_ids):
            raise ValueError(
                f"{field}: {pair.clean!r} is {len(clean_ids)} tokens but its corrupted partner "
                f"{pair.corrupted!r} is {len(corrupted_ids)}: a template must keep its names as "
                "separate words"
            )
        io_at = (clean_ids == ids[pair.io]).nonzero().flatten().tolist()
        s_at = (clean_ids == ids[pair.s]).nonzero().flatten().tolist()
        if len(io_at) != 1 or len(s_at) != 2:
            raise ValueError(
                f"{field}: in {pair.clean!r} the tokenizer finds {pair.io!r} {len(io_at)} times "
                f"and {pair.s!r} {len(s_at)} times (expected 1 and 2): a template must keep its "
                "names as separate words"
            )
        n = len(clean_ids)
        marks = {
            "IO": [io_at[0]],
            "S1": [s_at[0]],
            "S1+1": [s_at[0] + 1],
            "S2": [s_at[1]],
            "end": [n - 1],
        }
        for role, positions in marks.items():
            roles[role][row, positions] = True
        roles["other"][row, :n] = True
        for role in marks:
            roles["other"][row] &= ~roles[role][row]
    (clean, _), (corrupted, _) = right_pad(model, clean_rows), right_pad(model, corrupted_rows)
    return IOIBatch(
        pairs=pairs,
        tokens=PromptPairs(
            clean=clean,
            corrupted=corrupted,
            last=torch.tensor([len(row) - 1 for row in clean_rows]),
            correct=torch.tensor([ids[pair.io] for pair in pairs]),
            incorrect=torch.tensor([ids[pair.s] for pair in pairs]),
        ),
        roles=roles,
    )


def check_ioi_names(model: HookedTransformer, params: IOIParams, field: str = "ioi") -> None:
    """Every name must be one token for ``model``: raised before the run writes anything."""
    from unraveled.errors import ParamError

    for name in params.names:
        try:
            _single_token(model, name, f"params.{field}.names")
        except ValueError as error:
            raise ParamError(f"{field}.names", str(error).split(": ", 1)[1]) from None
