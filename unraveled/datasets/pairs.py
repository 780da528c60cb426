"""Your own clean/corrupted prompt pairs, and a metric of your own, for the patching experiments.

``activation_patching``, ``attribution_patching``, ``ioi_circuit`` and ``logit_attribution`` take
``prompts: pairs`` with the pairs either listed in the config (``params.pairs``: rows of
``clean``, ``corrupted``, ``clean_answer``, ``corrupted_answer``) or in a JSONL file
(``params.pairs_file``: one JSON object with the same four keys per line; a relative path is
read from the working directory, as the corpus atlas's sources are). From Python ``pairs`` also
takes tuples in that order and ``PromptPair`` objects.

Every route is checked the same way and its errors name the row: ``params.pairs[3].corrupted``
for a listed pair, ``params.pairs_file: FILE line 4: corrupted`` for a line of the file. What the
schema decides (four non-empty texts, at most ``max_pairs`` rows) is checked when the params are
validated; what the tokenizer decides (each prompt fits, each answer is one token, the clean and
corrupted prompts of a pair have the same token length where the method patches position by
position, and differ) before the model's weights load (``check_pairs``), and again on the loaded
model.

This module is the params' schema and reads no model: validating a config imports it without
torch (``unraveled.experiment``). Building the token batch is ``unraveled.patching.user_pairs``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from unraveled.errors import ParamError
from unraveled.experiment import DEFAULT_MAX_PROMPT_TOKENS, Params

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_PAIRS = 512
"""Pairs a run takes unless ``max_pairs`` says otherwise: as many as the IOI generator's most.
Every patched pass holds a copy of the batch and the clean cache holds every pair's activations,
so memory grows with the number of pairs."""
MAX_PAIRS_LIMIT = 4096
"""The most ``max_pairs`` can be raised to."""
MAX_LINE_CHARS = 16_384
"""The longest line of a pairs file: far beyond four prompts of ``DEFAULT_MAX_PROMPT_TOKENS``
tokens, and a file of one endless line is refused before it fills memory."""
KEYS = ("clean", "corrupted", "clean_answer", "corrupted_answer")
"""A pair's keys, in the order a tuple gives them."""
METRIC_SIGNATURE = (
    "a function (last_logits, pairs) -> one score per prompt: last_logits [batch, d_vocab] "
    "are the logits at each prompt's last token, pairs an unraveled.patching.PromptPairs "
    "(its correct and incorrect answers)"
)


class PromptPair(BaseModel):
    """One clean/corrupted pair and the answer each prompt should give."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    clean: str = Field(min_length=1, description="The clean prompt.")
    corrupted: str = Field(min_length=1, description="The corrupted prompt.")
    clean_answer: str = Field(min_length=1, description="The clean prompt's answer (one token).")
    corrupted_answer: str = Field(
        min_length=1,
        description="The corrupted prompt's answer (one token): the competing answer the "
        "logit difference is taken against.",
    )


@dataclass(frozen=True)
class PairRow:
    """A pair and where it was given, for messages.

    Attributes:
        pair: The pair.
        index: Its index in ``params.pairs``, or None for a line of the file.
        line: Its line in ``params.pairs_file``, or None for a listed pair.
    """

    pair: PromptPair
    index: int | None = None
    line: int | None = None

    def error(self, file: str | None, key: str, problem: str) -> ParamError:
        """An error at this row's ``key``: ``params.pairs[3].corrupted: ...`` or the file's line."""
        if self.index is not None:
            return ParamError(f"pairs[{self.index}].{key}", problem)
        return ParamError("pairs_file", f"{file} line {self.line}: {key}: {problem}")


def _problems(error: ValidationError) -> str:
    """A row's schema errors as ``key: problem; key: problem``."""
    found = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "row"
        if item["type"] == "extra_forbidden":
            problem = f"unknown key (the keys are {', '.join(KEYS)})"
        elif item["type"] == "missing":
            problem = "required, but missing"
        else:
            problem = f"{item['msg']}, got {item['input']!r}"
        found.append(f"{key}: {problem}")
    return "; ".join(found)


def read_pairs_file(path: str, max_pairs: int) -> list[PairRow]:
    """The pairs of a JSONL file, one JSON object per line (blank lines are skipped).

    Reads at most ``max_pairs`` pairs and lines of at most ``MAX_LINE_CHARS`` characters, so no
    file can make it hold more.

    Raises:
        ValueError: Naming the file and line: not a file, not UTF-8, not a JSON object, a key
            missing or unknown, an empty text, more than ``max_pairs`` pairs, or no pair at all.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        kind = "a folder, not a file" if file.is_dir() else "no such file"
        raise ValueError(f"{path}: {kind} (looked for {file.resolve()})")
    rows: list[PairRow] = []
    try:
        with file.open(encoding="utf-8", newline=None) as lines:
            number = 0
            while True:
                line = lines.readline(MAX_LINE_CHARS + 1)
                if not line:
                    break
                number += 1
                if len(line) > MAX_LINE_CHARS:
                    raise ValueError(
                        f"{path} line {number}: longer than {MAX_LINE_CHARS:,} characters; "
                        "one pair per line"
                    )
                if not line.strip():
                    continue
                if len(rows) == max_pairs:
                    raise ValueError(
                        f"{path}: more than max_pairs={max_pairs} pairs (line {number} is one "
                        f"more); give fewer or raise params.max_pairs (at most {MAX_PAIRS_LIMIT})"
                    )
                rows.append(PairRow(_parse_line(line, f"{path} line {number}"), line=number))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except OSError as error:
        raise ValueError(f"{path}: can't be read ({error.strerror})") from None
    if not rows:
        raise ValueError(
            f"{path}: no pairs (expected one JSON object per line with keys {', '.join(KEYS)})"
        )
    return rows


def _parse_line(line: str, where: str) -> PromptPair:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{where}: expected a JSON object with keys {', '.join(KEYS)}, got "
            f"{type(value).__name__}"
        )
    try:
        return PromptPair.model_validate(value)
    except ValidationError as error:
        raise ValueError(f"{where}: {_problems(error)}") from None


def _as_row(value: Any) -> Any:
    """A tuple or list of four texts as the mapping a ``PromptPair`` is validated from."""
    if isinstance(value, (tuple, list)) and len(value) == len(KEYS):
        return dict(zip(KEYS, value, strict=True))
    return value


def _failing(name: str) -> PydanticCustomError:
    return PydanticCustomError("pairs", name)


class PromptPairsParams(Params):
    """Params of an experiment that takes your own prompt pairs (``prompts: pairs``).

    The experiment declares ``prompts`` itself (its choices, with ``"pairs"`` among them). Given
    ``pairs`` or ``pairs_file`` without ``prompts``, the pairs are what runs.

    The params added here appear in a dump (the manifest's resolved config, the run page) only
    when they differ from their defaults, so a run that doesn't use them is described as before
    they existed; ``OMITTED_AT_DEFAULT`` lists them.
    """

    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("max_pairs", "pairs", "pairs_file")
    SAME_LENGTH: ClassVar[bool] = True
    """Whether the experiment patches position by position: each pair's prompts must then have
    the same token length."""

    max_pairs: int = Field(
        DEFAULT_MAX_PAIRS,
        ge=1,
        le=MAX_PAIRS_LIMIT,
        description="The most pairs params.pairs or params.pairs_file may give (memory grows "
        "with them).",
    )
    pairs: Annotated[list[PromptPair], Field(min_length=1)] | None = Field(
        None,
        description="Your pairs, when prompts is pairs: rows of clean, corrupted, clean_answer, "
        "corrupted_answer.",
    )
    pairs_file: str | None = Field(
        None,
        description="Or a JSONL file of them, one object with those keys per line (relative "
        "paths are from the working directory).",
    )

    @field_validator("pairs", mode="before")
    @classmethod
    def _rows_from_tuples(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [_as_row(row) for row in value]
        return value

    @field_validator("pairs_file", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("pairs_file")
    @classmethod
    def _file_reads(cls, value: str | None, info: Any) -> str | None:
        # info is pydantic's ValidationInfo: a protocol the tests' runtime type checks can't check.
        if value is not None and "max_pairs" in info.data:
            try:
                read_pairs_file(value, info.data["max_pairs"])
            except ValueError as error:
                raise _failing(str(error)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _pairs_given_means_pairs(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "prompts" not in data
            and (data.get("pairs") is not None or data.get("pairs_file") is not None)
        ):
            return {**data, "prompts": "pairs"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> PromptPairsParams:
        given = [name for name in ("pairs", "pairs_file") if getattr(self, name) is not None]
        prompts = getattr(self, "prompts", None)
        if prompts == "pairs" and len(given) != 1:
            raise _failing(
                "prompts is pairs: give params.pairs (a list of pairs) or params.pairs_file "
                "(a JSONL file), one of them"
                + ("; both are given" if given else "; neither is given")
            )
        if prompts != "pairs" and given:
            raise _failing(
                f"params.{given[0]} is given but prompts is {prompts!r}: set prompts to pairs "
                "to run on them"
            )
        if self.pairs is not None and len(self.pairs) > self.max_pairs:
            raise _failing(
                f"params.pairs has {len(self.pairs)} pairs, more than max_pairs={self.max_pairs}; "
                f"give fewer or raise params.max_pairs (at most {MAX_PAIRS_LIMIT})"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            fields = type(self).model_fields
            for name in self.OMITTED_AT_DEFAULT:
                default = fields[name].get_default(call_default_factory=True)
                if name in data and getattr(self, name) == default:
                    del data[name]
            for name in ("max_pairs", "pairs", "pairs_file"):  # after the experiment's own
                if name in data:
                    data[name] = data.pop(name)
            metric = getattr(self, "metric", None)
            if metric is not None:
                data["metric"] = metric_name(metric, qualified=True)
        return data

    @property
    def pairs_field(self) -> str:
        """``params.pairs`` or ``params.pairs_file``: where the pairs were given."""
        return "params.pairs_file" if self.pairs_file is not None else "params.pairs"

    def rows(self) -> list[PairRow]:
        """The pairs with where each was given; empty unless ``prompts`` is pairs.

        Raises:
            ParamError: The file can no longer be read as it was when the params were validated.
        """
        if self.pairs is not None:
            return [PairRow(pair, index=index) for index, pair in enumerate(self.pairs)]
        if self.pairs_file is None:
            return []
        # Read again at each call (a few thousand lines at most): a private attribute caching it
        # would give every params class pydantic's model_post_init, whose annotations the test
        # suite's type checks can't resolve.
        try:
            return read_pairs_file(self.pairs_file, self.max_pairs)
        except ValueError as error:
            raise ParamError("pairs_file", str(error)) from None


MetricFunction = Callable[..., Any]
"""The metric param's type: ``unraveled.patching.Metric``, named here without importing torch."""


def _metric_from_python(value: Any) -> Any:
    if value is not None and not callable(value):
        raise PydanticCustomError(
            "metric",
            # The config layer appends ", got <input>" to every field error: not repeated here.
            "a metric is set from Python only ({signature}); a config can't give one",
            {"signature": METRIC_SIGNATURE},
        )
    return value


class PatchingMetricParams(PromptPairsParams):
    """``PromptPairsParams`` and a metric of your own, from Python, replacing the logit difference.

    The metric is left out of every dump but its qualified name (``module.function``), which the
    manifest records.
    """

    metric: SkipJsonSchema[MetricFunction | None] = Field(
        None,
        exclude=True,
        description=f"From Python only: {METRIC_SIGNATURE}. None: the logit difference of the "
        "correct over the incorrect answer.",
    )

    @field_validator("metric", mode="before")
    @classmethod
    def _callable(cls, value: Any) -> Any:
        return _metric_from_python(value)


def metric_name(metric: MetricFunction | None, qualified: bool = False) -> str:
    """How figures (its ``__name__``) and the manifest (``module.qualname``) name a metric."""
    if metric is None:
        return "logit difference"
    name = getattr(metric, "__qualname__", None) or type(metric).__qualname__
    if not qualified:
        return getattr(metric, "__name__", None) or name
    module = getattr(metric, "__module__", None) or type(metric).__module__
    return f"{module}.{name}"


def check_pairs(
    params: PromptPairsParams,
    tokenizer: PreTrainedTokenizerBase,
    n_ctx: int | None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> None:
    """Check what the tokenizer decides about each pair, naming the row.

    Each prompt fits the model's context and ``max_prompt_tokens``, each answer is one token,
    and where the experiment patches position by position (``SAME_LENGTH``) each pair's prompts
    have the same token length and differ.

    Raises:
        ParamError: ``params.pairs[3].corrupted: ...`` or ``params.pairs_file: FILE line 4: ...``.
    """
    by_context = n_ctx is not None and n_ctx <= max_prompt_tokens
    cap, limit = (
        (n_ctx, "the model's context")
        if by_context
        else (max_prompt_tokens, "this experiment's max_prompt_tokens")
    )
    for row in params.rows():
        tokens = {}
        for key in ("clean", "corrupted"):
            tokens[key] = tokenizer.encode(getattr(row.pair, key), add_special_tokens=False)
            count = len(tokens[key]) + 1
            if count > cap:
                raise row.error(
                    params.pairs_file,
                    key,
                    f"{count} tokens (BOS included), more than the {cap} allowed by {limit}; "
                    "shorten the prompt",
                )
        for key in ("clean_answer", "corrupted_answer"):
            value = getattr(row.pair, key)
            ids = tokenizer.encode(value, add_special_tokens=False)
            if len(ids) != 1:
                pieces = [tokenizer.decode([i]) for i in ids]
                raise row.error(
                    params.pairs_file,
                    key,
                    f"{value!r} is {len(ids)} tokens for this model ({pieces}); expected one token",
                )
        if not params.SAME_LENGTH:
            continue
        clean, corrupted = len(tokens["clean"]), len(tokens["corrupted"])
        if clean != corrupted:
            raise row.error(
                params.pairs_file,
                "corrupted",
                f"{corrupted + 1} tokens, but its clean prompt has {clean + 1}: patching position "
                "by position needs prompts of the same token length",
            )
        if tokens["clean"] == tokens["corrupted"]:
            raise row.error(
                params.pairs_file,
                "corrupted",
                "the same tokens as its clean prompt: patching it changes nothing",
            )
