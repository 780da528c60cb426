"""The Hugging Face paths, through the CLI as users run it: a ``gpt2`` in the local HF cache (and
the converted-weights cache following it, revision by revision), an unreachable hub failing fast,
the loud fallback to the bundled model, and ``--no-fallback``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.cli import UNREACHABLE_HUB, CliRun, run_cli
from tests.helpers.models import FAKE_SNAPSHOT
from unraveled.cli import main
from unraveled.errors import ModelUnavailableError
from unraveled.models import hub, load_model


def test_unreachable_hub_fails_fast_saying_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight_cache: Path
) -> None:
    monkeypatch.setattr(hub.hf_constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ModelUnavailableError) as raised:
        load_model("gpt2", fallback=None)
    message = str(raised.value)
    # The probe's answer: TransformerLens's own retries (about 23 s) never start.
    assert "not in the Hugging Face cache" in message and UNREACHABLE_HUB in message


def _hf_home_with_other_gpt2(tiny_gpt2_dir: Path, home: Path, revision: str) -> Path:
    """An HF_HOME holding another revision of ``gpt2``: the tiny checkpoint with other embeddings."""
    snapshot = home / "hub" / "models--gpt2" / "snapshots" / revision
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    model.save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    return home


def test_converted_weights_follow_the_hugging_face_cache_and_its_revision(
    hf_home_with_gpt2: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    run_dir = out / "gpt2" / "embeddings"
    small = [
        "params.local_neighbours=200",
        "params.local_subsets=2",
        "params.chunk_tokens=50",
        "params.first_dims=4",
    ]
    args = [
        "run",
        "embeddings",
        "--out",
        str(out),
        "--no-fallback",
        *(arg for setting in small for arg in ("--set", setting)),
    ]
    done = run_cli(args, {"HF_HOME": str(hf_home_with_gpt2), "UNRAVELED_CACHE": cache})
    assert done.returncode == 0, done.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model"]["used"] == "gpt2" and not manifest["model"]["is_fallback"]
    assert manifest["model"]["loaded_from"].startswith("Hugging Face cache")
    assert manifest["model"]["revision"] == FAKE_SNAPSHOT and manifest["model"]["d_model"] == 64
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["parameter_count"] == sum(p.numel() for p in hf.parameters()) == 3_320_640
    # The second invocation reads the converted-weights cache instead. It runs in this process: a
    # cache hit reads the Hugging Face cache only through huggingface_hub's HF_HUB_CACHE, patched
    # here. Layernorm reads the same raw weights as embeddings, and draws fewer figures.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", cache)
        patch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(hf_home_with_gpt2 / "hub"))
        assert main(["run", "layernorm", "--out", str(out), "--no-fallback"]) == 0
    manifest = json.loads((out / "gpt2" / "layernorm" / "manifest.json").read_text())
    assert manifest["model"]["from_weight_cache"] and manifest["model"]["revision"] == FAKE_SNAPSHOT
    # HF_HOME now points at an empty folder: the weights converted from the other cache are not gpt2
    # any more, and with --no-fallback the process exits 3 saying why, leaving the outputs as they were.
    before = _tree(out)
    empty = run_cli(args, {"HF_HOME": str(tmp_path / "empty-hf-home"), "UNRAVELED_CACHE": cache})
    assert empty.returncode == 3, empty.stderr
    stderr = " ".join(empty.stderr.split())
    assert (
        "not in the Hugging Face cache" in stderr
        and "falling back to smollm2-135m is off" in stderr
    )
    assert _tree(out) == before
    # Another revision of gpt2: a miss, converted from its own weights, and the manifest says which.
    other_revision = "fedcba9876543210fedcba9876543210fedcba98"
    other_home = _hf_home_with_other_gpt2(tiny_gpt2_dir, tmp_path / "other-hf-home", other_revision)
    other = run_cli(args, {"HF_HOME": str(other_home), "UNRAVELED_CACHE": cache})
    assert other.returncode == 0, other.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert (
        not manifest["model"]["from_weight_cache"]
        and manifest["model"]["revision"] == other_revision
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected_mean = float(hf.transformer.wte.weight.detach().double().mean()) + 1.0
    assert metrics["token_embedding_stats"]["mean_of_dim_means"] == pytest.approx(
        expected_mean, abs=1e-5
    )


@pytest.mark.slow
def test_unavailable_gpt2_falls_back_loudly_to_the_bundled_model(
    smollm2_fallback_run: CliRun,
) -> None:
    out, done = smollm2_fallback_run.out, smollm2_fallback_run.done
    assert done.returncode == 0, done.stderr
    assert "Falling back to the bundled smollm2-135m" in " ".join(done.stderr.split())
    manifest = json.loads((out / "smollm2-135m" / "embeddings" / "manifest.json").read_text())
    assert manifest["model"]["is_fallback"] and manifest["model"]["requested"] == "gpt2"
    assert manifest["model"]["label"] == "smollm2-135m (fallback: gpt2 unavailable)"
    assert manifest["model"]["from_weight_cache"]  # converted once, in another process
    metrics = json.loads((out / "smollm2-135m" / "embeddings" / "metrics.json").read_text())
    assert "rotary" in metrics["not_applicable"]["position embeddings"]
    index = (out / "index.html").read_text()
    assert "Fallback model." in index and "Not applicable: position embeddings" in index
    # The embedding and weight analyses study the bundled weights: the banner says what they are.
    note = manifest["model"]["weights_note"]
    assert "SmolLM2-135M-Instruct" in note and "quantized to 4 bits (GGUF Q4_1)" in note
    assert f"Note that {note}." in index


@pytest.mark.parametrize("how", [["--no-fallback"], []])
def test_no_fallback_exits_3_and_writes_nothing(
    how: list[str],
    tmp_path: Path,
    weight_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In this process (gpt2 neither cached nor downloadable); a real process's exit status 3 is
    # checked in test_converted_weights_follow_the_hugging_face_cache_and_its_revision.
    out = tmp_path / "out"
    monkeypatch.setattr(hub.hf_constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    if not how:
        monkeypatch.setenv("UNRAVELED_NO_FALLBACK", "1")
    assert main(["run", "embeddings", "--out", str(out), *how]) == 3
    stderr = " ".join(capsys.readouterr().err.split())
    assert (
        "not in the Hugging Face cache" in stderr
        and "falling back to smollm2-135m is off" in stderr
    )
    assert not out.exists() or not any(out.rglob("*.json"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
