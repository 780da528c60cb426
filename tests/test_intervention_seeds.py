"""The intervention experiments' headline claims at their full defaults on the bundled SmolLM2,
under two seeds: a claim a page or figure makes must survive a change of seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from unraveled.experiments import path_patching, steering

from unraveled.config import load_config


def _defaults(name: str) -> dict[str, Any]:
    return yaml.safe_load(load_config(name).path.read_text(encoding="utf-8"))["params"]


def _smollm2(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from unraveled.models import load_model

    monkeypatch.setenv("UNRAVELED_CACHE", str(cache))
    return load_model("smollm2-135m", "raw").model


@pytest.mark.heavy
def test_steering_moves_every_prompt_with_the_sign_under_two_seeds(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The seed drives the sampled generations only: the vector, the target log-probabilities and
    # the KL are forward passes without sampling, so they are the same under every seed and the
    # figure's spread is over the config's prompts, not over seeds. Measured on SmolLM2 (seeds 0
    # and 1 through the CLI, equal): per-prompt changes -0.10 to -0.42 nats at -4, -0.09 to -0.20
    # at -2, +0.16 to +0.26 at +2, +0.18 to +0.54 at +4; KL 0.29 / 0.058 / 0.055 / 0.24 nats.
    model = _smollm2(smollm2_cache, monkeypatch)
    params = steering.SteeringParams(**_defaults("steering"))
    first, second = (steering.compute(model, params, seed=seed) for seed in (0, 1))
    # Equal up to float noise: the same forward passes (raw weights, one process).
    np.testing.assert_allclose(first.delta_log_prob, second.delta_log_prob, atol=1e-9)
    np.testing.assert_allclose(first.kl, second.kl, atol=1e-9)
    assert first.generations != second.generations  # the seed does drive the sampling
    for result in (first, second):
        sign = np.sign(result.coefficients)[:, None]
        # The page's claim: every prompt moves with the coefficient's sign, at every coefficient.
        # The smallest measured move is 0.085 nats, against float noise of 1e-6: no tolerance.
        assert (np.sign(result.delta_log_prob) == sign).all(), result.delta_log_prob
        mean = result.delta_log_prob.mean(axis=1)
        assert (np.diff(mean) > 0).all(), mean  # the mean rises with the coefficient
        # The price grows with the coefficient's size on each side (measured: 0.29 at -4 against
        # 0.058 at -2, 0.24 at +4 against 0.055 at +2, four times or more).
        kl = dict(zip(result.coefficients.tolist(), result.kl.mean(axis=1).tolist(), strict=True))
        assert kl[-4.0] > kl[-2.0] > 0 and kl[4.0] > kl[2.0] > 0, kl


@pytest.mark.heavy
def test_path_patching_top_senders_under_two_seeds(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The seed draws the IOI pairs (templates, names, places). Measured on SmolLM2, seeds 0, 1, 2
    # through the CLI (docs/causal.md): at 3 pairs the clean mean logit difference moved from 0.8
    # to 4.5 and the relative changes several-fold (23.3: -74% at seed 0, -384% at seed 1); at
    # the default 16 pairs 23.3 was -73/-87/-74% and 29.1 -25/-36/-31%, receivers 23.3, 29.1,
    # 23.0 each time, and 20.0 led through the receivers' queries (-11 ± 3%, -16 ± 2%). Claimed
    # and checked here: 23.3 leads the senders -> logits map, lowering the logit difference, 29.1
    # among the three after it, lowering it too, both chosen as receivers; 20.0 leads through
    # the receivers' queries, lowering it.
    model = _smollm2(smollm2_cache, monkeypatch)
    params = path_patching.PathPatchingParams(**_defaults("path_patching"))
    for seed in (0, 1):
        metrics = path_patching.compute(model, params, seed=seed).metrics()
        assert metrics["clean"]["mean_logit_difference"] > 0.1, seed
        to_logits = {row["sender"]: row for row in metrics["top_senders_to_logits"]}
        first = metrics["top_senders_to_logits"][0]
        assert first["sender"] == "23.3" and first["relative_change_percent"] < 0, (seed, first)
        top_four = [row["sender"] for row in metrics["top_senders_to_logits"][:4]]
        assert "29.1" in top_four and to_logits["29.1"]["relative_change_percent"] < 0, seed
        assert {"23.3", "29.1"} <= set(metrics["receivers"]), (seed, metrics["receivers"])
        through = metrics["top_senders_to_receivers"][0]
        assert through["sender"] == "20.0" and through["relative_change_percent"] < 0, (
            seed,
            through,
        )
