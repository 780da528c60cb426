"""Every experiment end to end through the CLI on the tiny models: the figures appear, each one
names the model in its title, and a headline number of each is checked against transformers or a
known answer."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure as MplFigure
from transformers import AutoModelForCausalLM, GPT2TokenizerFast

from unraveled.cli import main

FAST = {
    "layernorm": [],
    "attention": ["--set", "params.head=3"],
    "mlp": [
        "--set",
        "params.toy_vectors=50",
        "--set",
        "params.toy_dims=10",
        "--set",
        "params.toy_steps=20",
    ],
    "token_journey": ["--set", "params.umap_fit_tokens=300", "--set", "params.token_index=2"],
    "logit_lens": [],
    "head_taxonomy": ["--set", "params.repeat_batch=2", "--set", "params.repeat_length=8"],
    "logit_attribution": [],
    "activation_patching": [],
}
EXPECTED_FIGURES = {
    "layernorm": {
        "01_layer_normalization_3d",
        "02_ln1_gammas",
        "03_ln2_gammas",
        "04_applied_scale",
    },
    "attention": {"04_attention_heatmaps", "05_layer_wise_attention", "06_head_entropy_and_sink"},
    "mlp": {"06_angle_distribution", "07_mlp_activations"},
    "token_journey": {
        "01_journey",
        "02_cosine_similarities",
        "03_cosine_similarities_next",
        "04_mean_distance_across_layers",
    },
    "logit_lens": {"01_logit_lens_grid", "02_final_prediction_by_layer"},
    "head_taxonomy": {"01_head_scores", "02_top_heads"},
    "logit_attribution": {"01_attribution_per_layer", "02_attribution_per_head"},
    "activation_patching": {"01_residual_patching", "02_head_patching"},
}
IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@functools.lru_cache(maxsize=2)
def _hf_model(folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _hf_last_logits(
    folder: Path, tokenizer: GPT2TokenizerFast, text: str, bos: bool
) -> torch.Tensor:
    ids = ([tokenizer.bos_token_id] if bos else []) + tokenizer(text).input_ids
    with torch.no_grad():
        return _hf_model(folder)(torch.tensor([ids])).logits[0, -1]


def _check_against_known_answers(
    config: str, metrics: dict[str, Any], folder: Path, tokenizer: GPT2TokenizerFast
) -> None:
    """One headline number per experiment, from transformers' own forward pass or a closed form."""
    bos = metrics.get("tokens", [""])[0] == tokenizer.bos_token
    if config == "layernorm":
        assert (
            metrics["toy"]["mean_norm_after"] == pytest.approx(math.sqrt(3))
            and metrics["toy"]["max_abs_coordinate_sum_after"] < 1e-9
        )
    elif config == "attention":
        prompt = "Alice gave Bob a goose, and he gave her a duck."
        assert metrics["tokens"] == [
            tokenizer.decode([i]) for i in tokenizer(prompt).input_ids
        ]  # no BOS, as the original
        assert len(metrics["entropy_by_head"]) == 2 and len(metrics["entropy_by_head"][0]) == 4
    elif config == "mlp":
        toy = metrics["superposition_toy"]
        assert toy["pairs"] == 50 * 49 // 2
        welch = math.sqrt((50 - 10) / (10 * 49))  # 50 unit vectors in 10 dimensions
        assert toy["welch_bound_rms_cosine"] == pytest.approx(welch) and toy["rms_cosine"] >= welch
    elif config == "token_journey":
        sentence = "He killed two birds with one stone by taking a quick action"
        assert metrics["predicted_next_token"] == tokenizer.decode(
            [int(_hf_last_logits(folder, tokenizer, sentence, False).argmax())]
        )
        assert metrics["states"][0] == "embeddings" and metrics["states"][1] == "after block 0"
        assert len(metrics["cosine_to_own_embedding"]) == 3  # embeddings + 2 blocks
    elif config == "logit_lens":
        assert metrics["final_prediction"] == tokenizer.decode(
            [int(_hf_last_logits(folder, tokenizer, IOI_PROMPT, bos).argmax())]
        )
    elif config == "head_taxonomy":
        for name in ("induction", "previous_token", "duplicate_token", "first_token"):
            scores = np.array(metrics["scores"][name])
            assert scores.shape == (2, 4) and scores.min() >= 0 and scores.max() <= 1 + 1e-6
            ranked = [entry["score"] for entry in metrics["top_heads"][name]]
            assert (
                len(ranked) == 8
                and ranked == sorted(ranked, reverse=True)
                and ranked[0] == pytest.approx(scores.max())
            )
    elif config in ("logit_attribution", "activation_patching"):
        # " Mary" minus " John" at the last position, as transformers computes it.
        logits = _hf_last_logits(folder, tokenizer, IOI_PROMPT, bos=True)
        expected = float(
            logits[tokenizer(" Mary").input_ids[0]] - logits[tokenizer(" John").input_ids[0]]
        )
        if config == "logit_attribution":
            assert metrics["logit_difference"] == pytest.approx(expected, abs=1e-4)
            assert metrics["sum_of_contributions"] == pytest.approx(
                metrics["logit_difference"], abs=1e-4
            )
        else:
            assert metrics["clean_logit_difference"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(name, marks=pytest.mark.umap) if name == "token_journey" else name
        for name in sorted(FAST)
    ],
)
def test_experiment_runs_through_cli_smoke(
    config: str,
    checkpoint: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    warm_weight_cache: Path,
    gpt2_tokenizer: GPT2TokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = request.getfixturevalue(checkpoint)
    out = tmp_path / "out"
    titles: dict[str, str] = {}
    savefig = MplFigure.savefig

    def recording_savefig(figure: MplFigure, path: Any, *args: Any, **kwargs: Any) -> None:
        titles[Path(path).stem] = figure.get_suptitle()
        savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(MplFigure, "savefig", recording_savefig)
    assert main(["run", config, "--model", str(folder), "--out", str(out), *FAST[config]]) == 0
    run_dir = out / folder.name / config
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == EXPECTED_FIGURES[config]
    # The README's promise: the model actually used is in every figure's title.
    assert set(titles) == EXPECTED_FIGURES[config]
    assert all(f"model: {folder.name}" in title for title in titles.values()), titles
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _check_against_known_answers(config, metrics, folder, gpt2_tokenizer)
    if config == "head_taxonomy":
        assert (run_dir / "views" / "top_induction_heads.html").is_file()


def test_out_of_range_head_is_a_clear_error(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "run",
                "attention",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(tmp_path / "out"),
                "--set",
                "params.head=7",
            ]
        )
        == 2
    )
    assert (
        "configs/attention.yaml: params.head (from --set): 7 is out of range: the model has 4 heads"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()
