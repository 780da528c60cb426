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
        load_model("gpt2")
    message = str(raised.value)
    # The probe's answer: TransformerLens's own retries (about 23 s) never start.
    assert "not in the Hugging Face cache" in message and UNREACHABLE_HUB in message


def _hf_home_with_other_gpt2(tiny_gpt2_dir: Path, home: Path, revision: str) -> Path:
    """An HF_HOME holding another revision of ``gpt2``: the tiny checkpoint, other embeddings."""
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
    # HF_HOME now points at an empty folder: the weights converted from the other cache are not
    # gpt2 any more, and with --no-fallback the process exits 3 saying why, leaving the outputs as
    # they were.
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


@pytest.mark.heavy
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


# Issue 20: the fallback serves only the default model; a model the user names is never replaced.
@pytest.mark.parametrize("how", ["--model", "config file"])
def test_a_named_model_that_cant_be_had_exits_3_saying_why_and_writes_nothing(
    how: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    if how == "--model":
        args, given_by = ["embeddings", "--model", "pythia-70m"], "--model"
    else:
        config = tmp_path / "mine.yaml"
        config.write_text("experiment: embeddings\ndescription: d\nmodel: pythia-70m\n")
        args, given_by = [str(config)], str(config)
    done = run_cli(
        ["run", *args, "--out", str(out)],
        {"HF_HOME": str(tmp_path / "empty-hf-home"), "UNRAVELED_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 3, done.stderr
    stderr = " ".join(done.stderr.split())
    assert (
        "model 'pythia-70m' (EleutherAI/pythia-70m) is not in the Hugging Face cache" in stderr
        and f"the hub at {UNREACHABLE_HUB} did not answer" in stderr
        and f"({given_by} names 'pythia-70m', so no other model stands in for it;" in stderr
    )
    assert "Falling back" not in stderr and "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_only_the_default_model_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The plan alone, nothing loaded: gpt2 where no --model is given and the config names the
    default (or no model) stands in as the bundled model; the same gpt2 named is refused."""
    from unraveled.config import load_config
    from unraveled.models import plan_runs

    monkeypatch.setattr(hub.hf_constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    default = tmp_path / "default.yaml"
    default.write_text("experiment: layernorm\ndescription: d\n")  # no model: the default
    configs = [load_config("layernorm"), load_config(str(default))]  # `model: gpt2`, and none
    (planned,) = plan_runs(configs).models
    assert planned.is_fallback and planned.source.name == "smollm2-135m"
    assert planned.label() == "smollm2-135m (fallback: gpt2 unavailable)"
    assert "Falling back to the bundled smollm2-135m" in caplog.text
    for named in (["gpt2"], ["smollm2-135m", "gpt2"]):
        with pytest.raises(ModelUnavailableError, match="--model names 'gpt2'"):
            plan_runs(configs, named)
    mine = tmp_path / "mine.yaml"
    mine.write_text("experiment: layernorm\ndescription: d\nmodel: gpt2-small\n")  # gpt2, chosen
    with pytest.raises(ModelUnavailableError, match=f"{mine} names 'gpt2-small'"):
        plan_runs([load_config(str(mine))])
    with pytest.raises(ModelUnavailableError, match="falling back to smollm2-135m is off"):
        plan_runs(configs, allow_fallback=False)


@pytest.mark.parametrize(
    "models", [[], ["gpt2", "GPT2"]], ids=["the default", "two spellings of one model"]
)
def test_the_hub_is_probed_at_most_once_per_model_per_invocation(
    models: list[str],
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    weight_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gpt2 in no cache, the hub answering: one probe, though the prompts are checked on it, its
    processed and raw weights both load and it may be named twice. The download is a copy of the
    tiny checkpoint (the hub itself can't be reached here)."""
    import shutil

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(hub_cache))
    probes: list[str] = []

    def answering_hub(*args: object, **kwargs: object) -> None:
        probes.append("probe")

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        snapshot = hub_cache / f"models--{repo_id}" / "snapshots" / FAKE_SNAPSHOT
        shutil.copytree(tiny_gpt2_dir, snapshot, dirs_exist_ok=True)
        (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text(FAKE_SNAPSHOT)
        return str(snapshot)

    monkeypatch.setattr(hub, "hub_unreachable_reason", answering_hub)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    out = tmp_path / "out"
    args = ["run", "logit_lens", "layernorm", "--out", str(out)]  # processed, then raw weights
    assert main([*args, *(arg for name in models for arg in ("--model", name))]) == 0
    assert probes == ["probe"]
    manifests = [json.loads((out / "gpt2" / c / "manifest.json").read_text()) for c in args[1:3]]
    assert [m["model"]["loaded_from"] for m in manifests] == [
        "Hugging Face hub (gpt2)",
        f"Hugging Face cache ({hub_cache / 'models--gpt2' / 'snapshots' / FAKE_SNAPSHOT})",
    ]
    assert [path.name for path in out.iterdir() if path.name.lower() == "gpt2"] == ["gpt2"]
