"""Model loading: local checkpoints through TransformerLens's conversion, the converted-weights
cache, and name resolution. The Hugging Face cache and hub paths run in test_model_sources.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unraveled.errors import BadCheckpointError, ConfigError
from unraveled.models import hub, load_model
from unraveled.models import weight_cache as converted_weights
from unraveled.models.plan import plan_model
from unraveled.models.sources import HubModel, LocalCheckpoint

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Interpretability: taking GPT-2 apart, one head at a time.",
]


def _hf_log_probs(folder: Path, text: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.log_softmax(-1)


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("weights", ["processed", "raw"])
def test_local_checkpoint_matches_transformers_log_probs(
    checkpoint: str, weights: str, request: pytest.FixtureRequest, weight_cache: Path
) -> None:
    folder = request.getfixturevalue(checkpoint)
    loaded = load_model(str(folder), weights)
    assert loaded.loaded_from.startswith("local checkpoint")
    for text in PROMPTS:
        expected = _hf_log_probs(folder, text)
        got = loaded.model(text, prepend_bos=False).log_softmax(-1)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4


def test_processed_weights_fold_layernorm_and_raw_keep_gammas(
    tiny_gpt2_dir: Path, weight_cache: Path
) -> None:
    processed = load_model(str(tiny_gpt2_dir), "processed").model
    raw = load_model(str(tiny_gpt2_dir), "raw").model
    assert processed.cfg.normalization_type == "LNPre"
    assert raw.cfg.normalization_type == "LN"
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert torch.allclose(raw.blocks[1].ln1.w, hf.transformer.h[1].ln_1.weight)
    assert not torch.allclose(raw.blocks[1].ln1.w, torch.ones_like(raw.blocks[1].ln1.w))


def test_weight_cache_serves_the_second_load_identically(
    tiny_llama_dir: Path, weight_cache: Path
) -> None:
    first = load_model(str(tiny_llama_dir), "processed")
    second = load_model(str(tiny_llama_dir), "processed")
    assert not first.from_weight_cache and second.from_weight_cache
    assert second.loaded_from.startswith("converted-weights cache")
    assert list(weight_cache.glob("weights/tiny-llama-processed-*/model.safetensors"))
    tokens = first.model.to_tokens(PROMPTS[0])
    assert torch.equal(first.model(tokens), second.model(tokens))


def test_weight_cache_is_invalidated_when_the_checkpoint_changes(
    tiny_gpt2_dir: Path, tmp_path: Path, weight_cache: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_gpt2_dir, copy)
    load_model(str(copy), "raw")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert not load_model(str(copy), "raw").from_weight_cache


def test_directory_without_config_is_refused_with_what_was_expected(
    tmp_path: Path, weight_cache: Path
) -> None:
    with pytest.raises(BadCheckpointError, match=r"no config\.json"):
        load_model(str(tmp_path))  # a folder the user named is bad input: no fallback


def _named(name: str) -> object:
    return plan_model(name, "--model", chosen=True).named


def test_resolve_model_kinds(tiny_gpt2_dir: Path) -> None:
    assert _named("gpt2") == HubModel("gpt2", "gpt2")
    assert isinstance(_named(str(tiny_gpt2_dir)), LocalCheckpoint)
    assert _named("smollm2-135m").gguf_path() is not None


def test_unknown_model_name_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'gpt2'"):
        _named("gtp2")


def test_fixture_tokenizer_is_real_gpt2(gpt2_tokenizer) -> None:
    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer("Hello world").input_ids == [15496, 995]


def test_tests_and_their_subprocesses_never_touch_the_users_caches(
    isolated_caches: dict[str, Path],
) -> None:
    expected = [str(isolated_caches["UNRAVELED_CACHE"]), str(isolated_caches["HF_HOME"] / "hub")]
    assert [str(converted_weights.cache_root()), hub.hf_cache_dir()] == expected
    probe = (
        "from unraveled.models import hub, weight_cache; "
        "print(weight_cache.cache_root()); print(hub.hf_cache_dir())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == expected
    assert not any(Path(path).is_relative_to(Path.home() / ".cache") for path in expected)
