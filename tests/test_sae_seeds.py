"""sae_features' headline claims hold under a change of seed, at the default config on SmolLM2.

The seed chooses the windows (train and held out), the SAE's initial weights and shuffle, the
planted features and the IOI pairs: everything random in the run. The bands are from seeds 0, 1
and 2 through the CLI (docs/sae.md, "Across seeds"), widened as each constant says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from unraveled.experiments import sae_features

# Measured through the CLI at seeds 0, 1, 2 (docs/sae.md, "Across seeds"): CE loss recovered
# 0.662, 0.472, 0.472, its standard error over the 16 held-out windows 0.010 to 0.017: the
# seeds move it ten times more than the windows do, so the band is the seeds' range widened
# by about half of it (0.1) on each side.
RECOVERED_BAND = (0.35, 0.8)
# Two seeds' CE loss recovered differ by at most this (measured: up to 0.19).
RECOVERED_SEED_GAP = 0.3
# Variance explained 0.991, 0.984, 0.992 (window standard errors below 0.001): the floor
# leaves twice the seeds' range below the lowest.
VARIANCE_FLOOR = 0.97
# Planted directions recovered with the check's k = 4: 64, 60, 62, 63, 61, 63, 60, 62 of 64 at
# seeds 0-7 (at k = 2: 60, 56, 58, 59, 61): the 90% holds at each.
PLANTED_FLOOR = 0.9
# Estimate vs exact correlation over the top 10 features: 0.995, 0.995, 0.932. (The error
# term's estimate, -0.34, -2.0 and +0.29, changes sign with the seed: nothing is claimed.)
CORRELATION_FLOOR = 0.8


@pytest.mark.heavy
def test_default_headlines_survive_a_change_of_seed_on_smollm2(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unraveled.config import load_config
    from unraveled.models import load_model

    monkeypatch.setenv("UNRAVELED_CACHE", str(smollm2_cache))
    model = load_model("smollm2-135m", sae_features.EXPERIMENT.weights).model
    defaults = yaml.safe_load(load_config("sae_features").path.read_text(encoding="utf-8"))[
        "params"
    ]
    params = sae_features.SaeFeaturesParams(**defaults)
    assert params.architecture == "topk"
    recovered = []
    for seed in (0, 1):
        result = sae_features.compute(model, params, seed=seed)
        evaluation = result.evaluation
        # TopK: exactly k active features at every evaluated token ("L0: 16.0").
        assert evaluation.l0 == pytest.approx(params.k, abs=0.05), seed
        # The known answer: most planted directions recovered.
        assert result.planted is not None
        assert result.planted.recovered_fraction >= PLANTED_FLOOR, (seed, result.planted.max_cosine)
        # Splicing the SAE in costs loss, zeroing the hook costs more.
        assert (
            evaluation.ce_loss_clean < evaluation.ce_loss_spliced < evaluation.ce_loss_zero_ablation
        ), seed
        assert RECOVERED_BAND[0] <= evaluation.ce_loss_recovered <= RECOVERED_BAND[1], seed
        assert evaluation.explained_variance >= VARIANCE_FLOOR, seed
        recovered.append(evaluation.ce_loss_recovered)
        attribution = result.attribution
        assert attribution is not None
        assert attribution.correlation >= CORRELATION_FLOOR, seed
    assert abs(recovered[0] - recovered[1]) <= RECOVERED_SEED_GAP, recovered
