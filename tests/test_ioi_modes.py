"""activation_patching and logit_attribution over the IOI dataset agree with the same experiments
run one pair at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from unraveled.experiments import activation_patching, logit_attribution

from tests.helpers.models import SharedTinyModels
from unraveled.datasets.ioi import ROLES, IOIParams, ioi_pairs

IOI = IOIParams(n_pairs=3)


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path, tiny_model: SharedTinyModels):  # type: ignore[no-untyped-def]
    return tiny_model(tiny_llama_dir, "processed")


def test_logit_attribution_over_ioi_is_the_mean_of_single_prompts(model) -> None:  # type: ignore[no-untyped-def]
    over = logit_attribution.compute(
        model, logit_attribution.LogitAttributionParams(prompts="ioi", ioi=IOI), seed=0
    )
    singles = [
        logit_attribution.compute(
            model,
            logit_attribution.LogitAttributionParams(
                prompt=pair.clean, correct=f" {pair.io}", incorrect=f" {pair.s}"
            ),
            seed=0,
        )
        for pair in ioi_pairs(IOI, seed=0)
    ]
    assert over.n_prompts == 3 and over.total() == pytest.approx(over.logit_difference, abs=1e-4)
    assert over.logit_difference == pytest.approx(
        np.mean([s.logit_difference for s in singles]), abs=1e-4
    )
    np.testing.assert_allclose(over.heads, np.mean([s.heads for s in singles], axis=0), atol=1e-5)
    np.testing.assert_allclose(over.mlp, np.mean([s.mlp for s in singles], axis=0), atol=1e-5)


def test_activation_patching_over_ioi_is_the_mean_of_single_pairs(model) -> None:  # type: ignore[no-untyped-def]
    over = activation_patching.compute(
        model, activation_patching.ActivationPatchingParams(prompts="ioi", ioi=IOI), seed=0
    )
    assert over.tokens == list(ROLES) and over.residual.shape == (
        model.cfg.n_layers + 1,
        len(ROLES),
    )
    assert over.residual[-1, ROLES.index("end")] == pytest.approx(1.0, abs=1e-4)
    singles = [
        activation_patching.compute(
            model,
            activation_patching.ActivationPatchingParams(
                clean=pair.clean,
                corrupted=pair.corrupted,
                clean_answer=f" {pair.io}",
                corrupted_answer=f" {pair.s}",
            ),
            seed=0,
        )
        for pair in ioi_pairs(IOI, seed=0)
    ]
    # Undo each pair's normalisation, average the logit differences, normalise by the means.
    patched = np.mean(
        [
            s.heads * (s.clean_difference - s.corrupted_difference) + s.corrupted_difference
            for s in singles
        ],
        axis=0,
    )
    clean, corrupted = (
        np.mean([s.clean_difference for s in singles]),
        np.mean([s.corrupted_difference for s in singles]),
    )
    assert over.clean_difference == pytest.approx(clean, abs=1e-4)
    np.testing.assert_allclose(over.heads, (patched - corrupted) / (clean - corrupted), atol=1e-4)


@pytest.mark.parametrize("n_pairs", [1, 3])
def test_activation_patching_over_ioi_names_its_top_residual_patches_by_position_group(
    model, n_pairs: int
) -> None:  # type: ignore[no-untyped-def]
    """Over IOI pairs a residual column is a group of positions (the prompts' positions don't line
    up), even for one pair: the top patches say which group, never a position."""
    result = activation_patching.compute(
        model,
        activation_patching.ActivationPatchingParams(prompts="ioi", ioi=IOIParams(n_pairs=n_pairs)),
        seed=0,
    )
    metrics = result.metrics()
    assert metrics["position_groups"] == list(ROLES) and "tokens" not in metrics
    top = metrics["top_residual_patches"]
    assert len(top) == 10 and all(
        set(entry) == {"point", "position_group", "position_group_index", "recovered"}
        for entry in top
    )
    for entry in top:
        assert ROLES[entry["position_group_index"]] == entry["position_group"]
        point = result.residual_labels.index(entry["point"])
        assert entry["recovered"] == result.residual[point, ROLES.index(entry["position_group"])]
    # The ten largest of the grid, largest first.
    assert [entry["recovered"] for entry in top] == sorted(
        result.residual.flatten().tolist(), reverse=True
    )[:10]


def test_activation_patching_of_one_pair_names_positions_and_tokens(model) -> None:  # type: ignore[no-untyped-def]
    result = activation_patching.compute(
        model, activation_patching.ActivationPatchingParams(), seed=0
    )
    metrics = result.metrics()
    assert "position_groups" not in metrics and len(metrics["tokens"]) == result.residual.shape[1]
    for entry in metrics["top_residual_patches"]:
        assert (
            set(entry) == {"point", "position", "token", "recovered"}
            and entry["token"] == metrics["tokens"][entry["position"]]
        )


@pytest.mark.parametrize("corruption", ["swap", "abc"])
def test_corrupted_prompts_are_scored_against_their_own_answer(model, corruption: str) -> None:  # type: ignore[no-untyped-def]
    """Each corrupted prompt run alone, its last-token logits compared by hand: with swap its own
    answer is the subject (the clean run's incorrect name); abc has none, so the clean answer."""
    ioi = IOIParams(n_pairs=3, corruption=corruption)
    prefers_subject, prefers_io = [], []
    for pair in ioi_pairs(ioi, seed=0):
        logits = model(pair.corrupted)[0, -1]
        io, subject = (model.to_single_token(f" {name}") for name in (pair.io, pair.s))
        prefers_subject.append(float(logits[subject] > logits[io]))
        prefers_io.append(float(logits[io] > logits[subject]))
    corrupted = activation_patching.compute(
        model, activation_patching.ActivationPatchingParams(prompts="ioi", ioi=ioi), seed=0
    ).metrics()["answers"]["corrupted"]
    if corruption == "swap":
        assert corrupted["share_incorrect_over_correct"] == pytest.approx(np.mean(prefers_subject))
    else:
        assert corrupted["share_correct_over_incorrect"] == pytest.approx(np.mean(prefers_io))


def test_a_single_pairs_corrupted_prompt_is_scored_against_the_corrupted_answer(model) -> None:  # type: ignore[no-untyped-def]
    pair = ioi_pairs(IOI, seed=0)[0]
    params = activation_patching.ActivationPatchingParams(
        clean=pair.clean,
        corrupted=pair.corrupted,
        clean_answer=f" {pair.io}",
        corrupted_answer=f" {pair.s}",
    )
    logits = model(pair.corrupted)[0, -1]
    io, subject = (model.to_single_token(f" {name}") for name in (pair.io, pair.s))
    corrupted = activation_patching.compute(model, params, seed=0).metrics()["answers"]["corrupted"]
    assert corrupted["share_incorrect_over_correct"] == float(logits[subject] > logits[io])
