"""The Hugging Face paths, through the CLI as users run it: a ``gpt2`` in the local HF cache, an
unreachable hub failing fast, the loud fallback to the bundled model, and ``--no-fallback``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import UNREACHABLE_HUB, run_cli
from unraveled.errors import ModelUnavailableError
from unraveled.models import hub, load_model


def test_unreachable_hub_fails_fast_saying_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight_cache: Path) -> None:
    monkeypatch.setattr(hub.hf_constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as raised:
        load_model("gpt2", fallback=None)
    elapsed = time.perf_counter() - started
    message = str(raised.value)
    assert "not in the Hugging Face cache" in message and UNREACHABLE_HUB in message
    # TransformerLens's own retries take about 23 s; the probe answers at once here.
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_gpt2_from_the_hugging_face_cache_runs_offline(hf_home_with_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"HF_HOME": str(hf_home_with_gpt2), "UNRAVELED_CACHE": str(tmp_path / "cache")}
    done = run_cli(["run", "embeddings", "--out", str(out), "--no-fallback", "--set", "params.local_neighbours=200", "--set", "params.local_subsets=2"], env)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "gpt2" / "embeddings" / "manifest.json").read_text())
    assert manifest["model"]["used"] == "gpt2" and not manifest["model"]["is_fallback"]
    assert manifest["model"]["loaded_from"].startswith("Hugging Face cache")
    assert manifest["model"]["d_model"] == 64
    # The second invocation reads the converted-weights cache instead.
    again = run_cli(["run", "embeddings", "--out", str(out), "--no-fallback", "--set", "params.local_neighbours=200", "--set", "params.local_subsets=2"], env)
    assert again.returncode == 0, again.stderr
    manifest = json.loads((out / "gpt2" / "embeddings" / "manifest.json").read_text())
    assert manifest["model"]["from_weight_cache"]


@pytest.mark.slow
def test_unavailable_gpt2_falls_back_loudly_to_the_bundled_model(tmp_path: Path, smollm2_cache: Path) -> None:
    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "empty-hf-home"), "UNRAVELED_CACHE": str(smollm2_cache)}
    done = run_cli(["run", "embeddings", "--out", str(out), "--set", "params.local_subsets=2"], env)
    assert done.returncode == 0, done.stderr
    assert "Falling back to the bundled smollm2-135m" in " ".join(done.stderr.split())
    manifest = json.loads((out / "smollm2-135m" / "embeddings" / "manifest.json").read_text())
    assert manifest["model"]["is_fallback"] and manifest["model"]["requested"] == "gpt2"
    assert manifest["model"]["label"] == "smollm2-135m (fallback: gpt2 unavailable)"
    metrics = json.loads((out / "smollm2-135m" / "embeddings" / "metrics.json").read_text())
    assert "rotary" in metrics["not_applicable"]["position embeddings"]
    index = (out / "index.html").read_text()
    assert "Fallback model." in index and "Not applicable: position embeddings" in index


@pytest.mark.parametrize("how", [["--no-fallback"], []])
def test_no_fallback_exits_3_and_writes_nothing(how: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "empty-hf-home"), "UNRAVELED_CACHE": str(tmp_path / "cache")}
    if not how:
        env["UNRAVELED_NO_FALLBACK"] = "1"
    done = run_cli(["run", "embeddings", "--out", str(out), *how], env)
    assert done.returncode == 3, done.stderr
    stderr = " ".join(done.stderr.split())
    assert "not in the Hugging Face cache" in stderr and "falling back to smollm2-135m is off" in stderr
    assert not out.exists() or not any(out.rglob("*.json"))
