"""attribution_patching end to end: estimates beside exact values for every head, MLP and
residual point; correlations and times in the metrics. (The estimate's correctness is tested in
test_patching.py, where the metric is linear.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.conftest import SharedTinyModels
from unraveled.experiments import attribution_patching
from unraveled.cli import main
from unraveled.errors import ParamError
from unraveled.datasets.ioi import ROLES, IOIParams


def test_estimates_sit_beside_exact_values(tiny_gpt2_dir: Path, tiny_model: SharedTinyModels) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    result = attribution_patching.compute(model, attribution_patching.AttributionPatchingParams(ioi=IOIParams(n_pairs=4), exact_residual=True), seed=0)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert result.heads_estimate.shape == result.heads_exact.shape == (n_layers, n_heads)
    assert result.residual_estimate.shape == result.residual_exact.shape == (n_layers + 1, len(ROLES))
    # The residual stream after the last block, at the last token, is all the answer reads.
    assert result.residual_exact[-1, ROLES.index("end")] == pytest.approx(1.0, abs=1e-4)
    # Positions before the prompts differ restore nothing, exactly and by the estimate.
    for role in ("IO", "S1", "S1+1"):
        assert np.abs(result.residual_exact[:, ROLES.index(role)]).max() < 1e-5
        assert np.abs(result.residual_estimate[:, ROLES.index(role)]).max() < 1e-5
    found = result.correlations()["heads"]
    assert found["pearson"] == pytest.approx(np.corrcoef(result.heads_estimate.ravel(), result.heads_exact.ravel())[0, 1], abs=1e-6)
    ranks = [stats.rankdata(values.ravel()) for values in (result.heads_estimate, result.heads_exact)]
    assert found["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-6)
    errors = result.largest_errors()
    gaps = [abs(row["estimate"] - row["exact"]) for row in errors]
    assert gaps == sorted(gaps, reverse=True)


def test_attribution_patching_runs_through_cli_smoke(tiny_llama_dir: Path, tmp_path: Path, warm_weight_cache: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", "attribution_patching", "--model", str(tiny_llama_dir), "--out", str(out), "--set", "params.ioi.n_pairs=3"]) == 0
    run_dir = out / tiny_llama_dir.name / "attribution_patching"
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == {"01_estimate_vs_exact", "02_heads_exact_and_estimate", "03_residual_exact_and_estimate"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The config leaves exact residual patching off: the residual stream has an estimate only.
    assert set(metrics["correlation_estimate_vs_exact"]) == {"heads", "mlps", "heads_and_mlps"}
    assert set(metrics["seconds"]["exact_patching"]) == {"heads", "mlps"}
    assert metrics["residual_exact"] is None and len(metrics["residual_estimate"]) == len(metrics["residual_points"])


def test_names_that_are_not_one_token_fail_the_model_check(tiny_gpt2_dir: Path, tiny_model: SharedTinyModels) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    names = ["Mary", "John", "Tom", "Xylophonicus"]
    assert len(model.to_tokens(" Xylophonicus", prepend_bos=False)[0]) > 1
    params = attribution_patching.AttributionPatchingParams(ioi=IOIParams(names=names))
    with pytest.raises(ParamError, match=r"params\.ioi\.names: 'Xylophonicus' is \d+ tokens"):
        attribution_patching.check(model, params)
