"""The bundled facts and how a fact's subject and answer are found among the model's tokens."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from transformers import GPT2TokenizerFast

from tests.helpers.models import SharedTinyModels
from unraveled.datasets.facts import FACTS, Fact, tokenize_fact


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir: Path, tiny_model: SharedTinyModels):  # type: ignore[no-untyped-def]
    return tiny_model(tiny_gpt2_dir, "raw")


def test_bundled_answers_are_single_gpt2_tokens(gpt2_tokenizer: GPT2TokenizerFast) -> None:
    assert len(FACTS) >= 90
    several = [fact.answer for fact in FACTS if len(gpt2_tokenizer(fact.answer)["input_ids"]) != 1]
    assert several == []
    assert len({fact.prompt for fact in FACTS}) == len(FACTS)


def test_subject_span_matches_the_tokenizer_offsets(
    tiny_gpt2, gpt2_tokenizer: GPT2TokenizerFast
) -> None:  # type: ignore[no-untyped-def]
    for index, fact in enumerate(FACTS):
        tokenized = tokenize_fact(tiny_gpt2, fact, f"facts[{index}]")
        # Independently: the tokens whose characters overlap the subject, from the tokenizer's
        # offsets.
        encoding = gpt2_tokenizer(fact.prompt, return_offsets_mapping=True)
        first = fact.prompt.find(fact.subject)
        last = first + len(fact.subject)
        overlapping = [
            i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < last and b > first
        ]
        bos = (
            tokenized.tokens[0] == gpt2_tokenizer.bos_token_id
            and encoding["input_ids"][0] != gpt2_tokenizer.bos_token_id
        )
        assert tokenized.tokens[int(bos) :] == encoding["input_ids"]
        assert (tokenized.subject_start - bos, tokenized.subject_end - bos) == (
            overlapping[0],
            overlapping[-1] + 1,
        )
        assert tokenized.answer == gpt2_tokenizer(fact.answer)["input_ids"][0]


def test_known_layout_of_one_fact(tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    tokenized = tokenize_fact(tiny_gpt2, FACTS[0], "facts[0]")
    assert tokenized.str_tokens[:4] == ["The", " E", "iff", "el"]  # no BOS, as ROME
    assert tokenize_fact(tiny_gpt2, FACTS[0], "facts[0]", prepend_bos=True).str_tokens[:2] == [
        "<|endoftext|>",
        "The",
    ]
    assert (
        "".join(tokenized.str_tokens[tokenized.subject_start : tokenized.subject_end])
        == " Eiffel Tower"
    )


def test_multi_token_answer_is_refused(tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    fact = Fact(
        prompt="The Eiffel Tower is located in the city of",
        subject="Eiffel Tower",
        answer=" Parisville-sur-Seine",
    )
    with pytest.raises(
        ValueError, match=r"params.facts\[2\].answer=' Parisville-sur-Seine' is \d+ tokens"
    ):
        tokenize_fact(tiny_gpt2, fact, "params.facts[2]")


def test_subject_inside_a_token_is_refused(tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    fact = Fact(
        prompt="The Eiffel Tower is located in the city of", subject="ffel Tower", answer=" Paris"
    )
    with pytest.raises(ValueError, match="does not start and end on token boundaries"):
        tokenize_fact(tiny_gpt2, fact, "params.facts[0]")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            {"prompt": "The Louvre is in", "subject": "Eiffel", "answer": " Paris"},
            "does not occur in prompt",
        ),
        (
            {"prompt": "The city of Paris", "subject": "Paris", "answer": " France"},
            "ends with its subject",
        ),
        ({"prompt": "The Louvre is in", "subject": "Louvre", "answer": ""}, "at least 1 character"),
    ],
)
def test_bad_facts_are_refused(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=problem):
        Fact.model_validate(fields)
