"""IOI prompt pairs: deterministic, both name orders, equal lengths, single-token names found where
the templates put them, and clear errors for bad templates and names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.helpers.models import SharedTinyModels
from unraveled.cli import main
from unraveled.datasets.ioi import ROLES, IOIParams, ioi_batch, ioi_pairs


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path, tiny_model: SharedTinyModels):  # type: ignore[no-untyped-def]
    return tiny_model(tiny_llama_dir, "processed")


def test_pairs_are_deterministic_and_balanced() -> None:
    params = IOIParams(n_pairs=12)
    first, again, other = (
        ioi_pairs(params, seed=3),
        ioi_pairs(params, seed=3),
        ioi_pairs(params, seed=4),
    )
    assert first == again and first != other
    assert [pair.order for pair in first] == ["ABBA", "BABA"] * 6
    for pair in first:
        assert pair.clean.count(pair.s) == 2 and pair.clean.count(pair.io) == 1
        assert (pair.clean.index(pair.io) < pair.clean.index(pair.s)) == (pair.order == "ABBA")
        assert (
            pair.corrupted.count(pair.io) == 2 and pair.corrupted.count(pair.s) == 1
        )  # swap: S2 became IO


@pytest.mark.parametrize("corruption", ["swap", "abc"])
def test_batch_pairs_have_equal_lengths_and_single_token_names(model, corruption: str) -> None:  # type: ignore[no-untyped-def]
    batch = ioi_batch(model, IOIParams(n_pairs=10, corruption=corruption), seed=0)  # type: ignore[arg-type]
    tokens = batch.tokens
    assert tokens.clean.shape == tokens.corrupted.shape
    for row, pair in enumerate(batch.pairs):
        clean_ids = model.to_tokens(pair.clean)[0]
        corrupted_ids = model.to_tokens(pair.corrupted)[0]
        assert len(clean_ids) == len(corrupted_ids) == int(tokens.last[row]) + 1
        assert tokens.clean[row, : len(clean_ids)].tolist() == clean_ids.tolist()
        assert model.tokenizer.decode([int(tokens.correct[row])]) == f" {pair.io}"
        assert model.tokenizer.decode([int(tokens.incorrect[row])]) == f" {pair.s}"
        roles = {role: batch.roles[role][row].nonzero().flatten().tolist() for role in ROLES}
        assert model.tokenizer.decode(clean_ids[roles["IO"]]) == f" {pair.io}"
        assert (
            model.tokenizer.decode(clean_ids[roles["S1"]])
            == model.tokenizer.decode(clean_ids[roles["S2"]])
            == f" {pair.s}"
        )
        assert roles["S1+1"] == [roles["S1"][0] + 1] and roles["end"] == [len(clean_ids) - 1]
        # The groups cover every real position once.
        every_position = [position for positions in roles.values() for position in positions]
        assert sorted(every_position) == list(range(len(clean_ids)))
        differs = (clean_ids != corrupted_ids).nonzero().flatten().tolist()
        assert differs == roles["S2"]
        replacement = model.tokenizer.decode(corrupted_ids[differs])
        if corruption == "swap":
            assert replacement == f" {pair.io}"
        else:
            assert (
                replacement.strip() not in {pair.io, pair.s}
                and replacement.strip() in IOIParams().names
            )


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("When {A} and {B} went to the store, Mary gave a drink to", r"name slot \{S\} 0 times"),
        ("When {A} and {A} went, {S} gave a drink to", r"\{A\} 2 times"),
        ("When {A} and {B} went to the {city}, {S} gave a drink to", "unknown slots"),
        ("When {A} and {B} went to the store, a drink was given to {S}", "ends with a name"),
    ],
)
def test_bad_templates_are_refused(template: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        IOIParams(templates=[template])


def test_template_without_a_name_slot_exits_2_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "run",
            "attribution_patching",
            "--out",
            str(tmp_path / "out"),
            "--set",
            'params.ioi.templates=["When {A} and {B} left, {B} said to"]',
        ]
    )
    assert status == 2
    assert "params.ioi.templates" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_multi_token_name_is_refused(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"params.ioi.names: 'Xylophonist' is \d tokens"):
        ioi_batch(model, IOIParams(names=["Mary", "John", "Xylophonist"]), seed=0)


def test_pairs_are_dealt_across_templates() -> None:
    """Every template once before any repeats, whatever the seed: two pairs never share one."""
    templates = IOIParams().templates
    for seed in range(5):
        pairs = ioi_pairs(IOIParams(n_pairs=2 * len(templates) + 1), seed=seed)
        used = [pair.template for pair in pairs]
        assert (
            sorted(used[: len(templates)])
            == sorted(used[len(templates) : 2 * len(templates)])
            == list(range(len(templates)))
        )
        for pair in pairs:
            assert pair.clean.startswith(templates[pair.template].split("{")[0])
    assert (
        len(
            {
                tuple(pair.template for pair in ioi_pairs(IOIParams(n_pairs=6), seed=seed))
                for seed in range(5)
            }
        )
        > 1
    )  # the order is drawn
