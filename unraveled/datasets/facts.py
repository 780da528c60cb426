"""Factual prompts with single-token answers, and where their subject sits among the tokens.

Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") corrupts a
fact's subject and looks for the states that bring the answer back. Each fact here names its
subject as a substring of the prompt and its answer as the text of the next token.

``FACTS`` is a hand-written set in the spirit of ROME's ``known_1000`` (which can't be shipped):
the answer follows from the subject, not from the words just before it (no "Leonardo da" ->
" Vinci"). Which of them a model knows is decided at run time, by its own prediction; answers
are checked to be one token with the model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from unraveled.experiment import RESOLVE_ANNOTATIONS

if (
    TYPE_CHECKING or RESOLVE_ANNOTATIONS
):  # names used in annotations only: config validation imports this module
    from transformer_lens import HookedTransformer


class Fact(BaseModel):
    """A factual prompt: ``prompt`` contains ``subject``; ``answer`` is the expected next token."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(
        min_length=1, description="The prompt, e.g. 'The Eiffel Tower is located in the city of'."
    )
    subject: str = Field(
        min_length=1, description="The subject as it appears in the prompt, e.g. 'Eiffel Tower'."
    )
    answer: str = Field(
        min_length=1, description="The answer's text, one token for the model, e.g. ' Paris'."
    )

    @model_validator(mode="after")
    def _subject_inside_prompt(self) -> Fact:
        start = self.prompt.find(self.subject)
        if start < 0:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if not self.prompt[start + len(self.subject) :].strip():
            raise ValueError(
                f"prompt {self.prompt!r} ends with its subject: "
                "tracing needs tokens after the subject"
            )
        return self


@dataclass(frozen=True)
class TokenizedFact:
    """A fact as the model sees it.

    Attributes:
        fact: The fact.
        tokens: Its prompt's token ids (BOS first only when asked for).
        str_tokens: The text of each token.
        subject_start: Position of the subject's first token.
        subject_end: One past the subject's last token.
        answer: The answer's token id.
    """

    fact: Fact
    tokens: list[int]
    str_tokens: list[str]
    subject_start: int
    subject_end: int
    answer: int


def _token_ids(model: HookedTransformer, text: str, prepend_bos: bool) -> list[int]:
    if not text and not prepend_bos:
        return []
    return [int(i) for i in model.to_tokens(text, prepend_bos=prepend_bos)[0]]


def tokenize_fact(
    model: HookedTransformer, fact: Fact, field: str, prepend_bos: bool = False
) -> TokenizedFact:
    """Tokenize a fact and find its subject's token span.

    The span comes from tokenizing the prompt up to the subject's start and up to its end: both
    must be prefixes of the prompt's own tokens, or the subject's boundaries fall inside a token.
    The space before the subject belongs to its first token (`` Tower``), as BPE tokenizers
    split words.

    Args:
        model: Its tokenizer (and BOS convention) is used.
        fact: The fact.
        field: Where the fact came from, for error messages (``params.facts[3]``).
        prepend_bos: Put the model's BOS token first. ROME does not: its ``make_inputs`` encodes
            GPT-2 prompts as the tokenizer does, with no BOS.

    Raises:
        ValueError: The answer is several tokens, or the subject does not start and end on token
            boundaries.
    """
    from unraveled.logits import answer_token_id

    answer = answer_token_id(model, fact.answer, f"{field}.answer")
    tokens = _token_ids(model, fact.prompt, prepend_bos)
    start_char = fact.prompt.find(fact.subject)
    before = _token_ids(model, fact.prompt[:start_char].rstrip(), prepend_bos)
    through = _token_ids(model, fact.prompt[: start_char + len(fact.subject)], prepend_bos)
    if (
        tokens[: len(before)] != before
        or tokens[: len(through)] != through
        or len(through) == len(before)
    ):
        raise ValueError(
            f"{field}.subject={fact.subject!r} does not start and end on token boundaries of "
            f"{fact.prompt!r} for this model ({[model.tokenizer.decode([t]) for t in tokens]}); "
            "choose a subject made of whole tokens"
        )
    return TokenizedFact(
        fact=fact,
        tokens=tokens,
        str_tokens=[model.tokenizer.decode([t]) for t in tokens],
        subject_start=len(before),
        subject_end=len(through),
        answer=answer,
    )


def _facts(rows: list[tuple[str, str, str]]) -> tuple[Fact, ...]:
    return tuple(
        Fact(prompt=prompt, subject=subject, answer=answer) for prompt, subject, answer in rows
    )


FACTS: tuple[Fact, ...] = _facts(
    [
        ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
        ("The Colosseum is located in the city of", "Colosseum", " Rome"),
        ("Big Ben is located in the city of", "Big Ben", " London"),
        ("The Brandenburg Gate is located in the city of", "Brandenburg Gate", " Berlin"),
        ("The Acropolis is located in the city of", "Acropolis", " Athens"),
        ("The Kremlin is located in the city of", "Kremlin", " Moscow"),
        ("Buckingham Palace is located in the city of", "Buckingham Palace", " London"),
        ("The Louvre is located in the city of", "Louvre", " Paris"),
        ("The Vatican is located in the city of", "Vatican", " Rome"),
        ("The Parthenon is located in the city of", "Parthenon", " Athens"),
        ("The Sagrada Familia is located in the city of", "Sagrada Familia", " Barcelona"),
        ("The Prado Museum is located in the city of", "Prado Museum", " Madrid"),
        ("The Sydney Opera House is located in the country of", "Sydney Opera House", " Australia"),
        ("The Taj Mahal is located in the country of", "Taj Mahal", " India"),
        ("Mount Fuji is located in the country of", "Mount Fuji", " Japan"),
        ("The Great Wall is located in the country of", "Great Wall", " China"),
        ("The pyramids of Giza are located in the country of", "pyramids of Giza", " Egypt"),
        ("Stonehenge is located in the country of", "Stonehenge", " England"),
        ("Machu Picchu is located in the country of", "Machu Picchu", " Peru"),
        (
            "The Leaning Tower of Pisa is located in the country of",
            "Leaning Tower of Pisa",
            " Italy",
        ),
        ("Mount Everest is located in the country of", "Mount Everest", " Nepal"),
        ("The Alhambra is located in the country of", "Alhambra", " Spain"),
        ("Angkor Wat is located in the country of", "Angkor Wat", " Cambodia"),
        (
            "The Amazon rainforest is mostly located in the country of",
            "Amazon rainforest",
            " Brazil",
        ),
        ("The Nile flows through the country of", "Nile", " Egypt"),
        ("Madrid is the capital of", "Madrid", " Spain"),
        ("Berlin is the capital of", "Berlin", " Germany"),
        ("Tokyo is the capital of", "Tokyo", " Japan"),
        ("Stockholm is the capital of", "Stockholm", " Sweden"),
        ("Oslo is the capital of", "Oslo", " Norway"),
        ("Helsinki is the capital of", "Helsinki", " Finland"),
        ("Lisbon is the capital of", "Lisbon", " Portugal"),
        ("Warsaw is the capital of", "Warsaw", " Poland"),
        ("Athens is the capital of", "Athens", " Greece"),
        ("Cairo is the capital of", "Cairo", " Egypt"),
        ("Ottawa is the capital of", "Ottawa", " Canada"),
        ("Dublin is the capital of", "Dublin", " Ireland"),
        ("Vienna is the capital of", "Vienna", " Austria"),
        ("Canberra is the capital of", "Canberra", " Australia"),
        ("Moscow is the capital of", "Moscow", " Russia"),
        ("Beijing is the capital of", "Beijing", " China"),
        ("Bangkok is the capital of", "Bangkok", " Thailand"),
        ("Nairobi is the capital of", "Nairobi", " Kenya"),
        ("Buenos Aires is the capital of", "Buenos Aires", " Argentina"),
        ("Amsterdam is the capital of", "Amsterdam", " Netherlands"),
        ("The capital of France is", "France", " Paris"),
        ("The capital of Italy is", "Italy", " Rome"),
        ("The capital of Germany is", "Germany", " Berlin"),
        ("The capital of Japan is", "Japan", " Tokyo"),
        ("The capital of Egypt is", "Egypt", " Cairo"),
        ("Barcelona is a city in the country of", "Barcelona", " Spain"),
        ("Munich is a city in the country of", "Munich", " Germany"),
        ("Osaka is a city in the country of", "Osaka", " Japan"),
        ("Marseille is a city in the country of", "Marseille", " France"),
        ("Mumbai is a city in the country of", "Mumbai", " India"),
        ("Venice is a city in the country of", "Venice", " Italy"),
        ("The official language of Brazil is", "Brazil", " Portuguese"),
        ("The official language of Mexico is", "Mexico", " Spanish"),
        ("The official language of Germany is", "Germany", " German"),
        ("The mother tongue of Vladimir Putin is", "Vladimir Putin", " Russian"),
        ("Leo Tolstoy wrote his novels in the language of", "Leo Tolstoy", " Russian"),
        ("Angela Merkel was the chancellor of", "Angela Merkel", " Germany"),
        ("Barack Obama was born in the state of", "Barack Obama", " Hawaii"),
        ("Albert Einstein was born in the country of", "Albert Einstein", " Germany"),
        ("Pablo Picasso was born in the country of", "Pablo Picasso", " Spain"),
        (
            "Wolfgang Amadeus Mozart was born in the country of",
            "Wolfgang Amadeus Mozart",
            " Austria",
        ),
        ("Frida Kahlo was born in the country of", "Frida Kahlo", " Mexico"),
        ("Mahatma Gandhi was born in the country of", "Mahatma Gandhi", " India"),
        ("Marie Curie was born in the country of", "Marie Curie", " Poland"),
        ("Dante Alighieri was born in the country of", "Dante Alighieri", " Italy"),
        ("Toyota is a car company from the country of", "Toyota", " Japan"),
        ("Honda is a car company from the country of", "Honda", " Japan"),
        ("Ferrari is a car company from the country of", "Ferrari", " Italy"),
        ("BMW is a car company from the country of", "BMW", " Germany"),
        ("Volkswagen is a car company from the country of", "Volkswagen", " Germany"),
        ("Volvo is a car company from the country of", "Volvo", " Sweden"),
        ("IKEA is a furniture company from the country of", "IKEA", " Sweden"),
        ("Nokia is a company from the country of", "Nokia", " Finland"),
        ("Nintendo is a video game company from the country of", "Nintendo", " Japan"),
        ("Sushi is a dish from the country of", "Sushi", " Japan"),
        ("Pizza is a dish from the country of", "Pizza", " Italy"),
        ("Paella is a dish from the country of", "Paella", " Spain"),
        ("The iPhone is made by the company", "iPhone", " Apple"),
        ("Windows is an operating system developed by", "Windows", " Microsoft"),
        ("Steve Jobs was the co-founder of", "Steve Jobs", " Apple"),
        ("Lionel Messi plays the sport of", "Lionel Messi", " football"),
        ("Michael Jordan played the sport of", "Michael Jordan", " basketball"),
        ("Tiger Woods plays the sport of", "Tiger Woods", " golf"),
        ("Roger Federer plays the sport of", "Roger Federer", " tennis"),
        ("The Beatles were a band from the city of", "Beatles", " Liverpool"),
        ("Sherlock Holmes lived in the city of", "Sherlock Holmes", " London"),
        ("Neil Armstrong was the first person to walk on the", "Neil Armstrong", " moon"),
        ("Charles Darwin is famous for the theory of", "Charles Darwin", " evolution"),
        ("Isaac Newton discovered the law of", "Isaac Newton", " gravity"),
        ("Thor is the Norse god of", "Thor", " thunder"),
        ("Poseidon is the Greek god of the", "Poseidon", " sea"),
        ("Athena is the Greek goddess of", "Athena", " wisdom"),
    ]
)
