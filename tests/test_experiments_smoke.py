"""Every experiment end to end through the CLI on the tiny models: figures and metrics appear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unraveled.cli import main

FAST = {
    "layernorm": [],
    "attention": ["--set", "params.head=3"],
    "mlp": ["--set", "params.toy_vectors=50", "--set", "params.toy_steps=20"],
    "token_journey": ["--set", "params.umap_fit_tokens=300", "--set", "params.token_index=2"],
    "logit_lens": [],
    "head_taxonomy": ["--set", "params.repeat_batch=2", "--set", "params.repeat_length=8"],
    "logit_attribution": [],
    "activation_patching": [],
}
EXPECTED_FIGURES = {
    "layernorm": {"01_layer_normalization_3d", "02_ln1_gammas", "03_ln2_gammas", "04_applied_scale"},
    "attention": {"04_attention_heatmaps", "05_layer_wise_attention", "06_head_entropy_and_sink"},
    "mlp": {"06_angle_distribution", "07_mlp_activations"},
    "token_journey": {"01_journey", "02_cosine_similarities", "03_cosine_similarities_next", "04_mean_distance_across_layers"},
    "logit_lens": {"01_logit_lens_grid", "02_final_prediction_by_layer"},
    "head_taxonomy": {"01_head_scores", "02_top_heads"},
    "logit_attribution": {"01_attribution_per_layer", "02_attribution_per_head"},
    "activation_patching": {"01_residual_patching", "02_head_patching"},
}


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("config", sorted(FAST))
def test_experiment_runs_through_cli_smoke(config: str, checkpoint: str, request: pytest.FixtureRequest, tmp_path: Path, warm_weight_cache: Path) -> None:
    folder = request.getfixturevalue(checkpoint)
    out = tmp_path / "out"
    assert main(["run", config, "--model", str(folder), "--out", str(out), *FAST[config]]) == 0
    run_dir = out / folder.name / config
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == EXPECTED_FIGURES[config]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics
    if config == "attention":
        assert len(metrics["entropy_by_head"]) == 2 and len(metrics["entropy_by_head"][0]) == 4
    if config == "head_taxonomy":
        assert len(metrics["top_heads"]["induction"]) == 8 and (run_dir / "views" / "top_induction_heads.html").is_file()
    if config == "logit_attribution":
        assert metrics["sum_of_contributions"] == pytest.approx(metrics["logit_difference"], abs=1e-4)
    if config == "token_journey":
        assert metrics["hidden_state_convention"].startswith("layer 0 = embeddings")
        assert len(metrics["cosine_to_own_embedding"]) == 3  # embeddings + 2 layers


def test_out_of_range_head_is_a_clear_error(tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "attention", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "out"), "--set", "params.head=7"]) == 2
    assert "params.head: 7 is out of range: the model has 4 heads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
