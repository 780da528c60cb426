"""The CLI end to end on the tiny models: the files it writes, the index, and atomic outputs."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import unraveled.experiments.layernorm as layernorm_module

from unraveled.cli import main

SMALL = [
    "--set",
    "params.local_neighbours=100",
    "--set",
    "params.chunk_tokens=50",
    "--set",
    "params.local_subsets=2",
    "--set",
    "params.first_dims=4",
]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"href", "src"} and value and not value.startswith("#"):
                self.targets.append(value.split("#")[0])


def index_targets(out: Path) -> list[str]:
    parser = _Links()
    parser.feed((out / "index.html").read_text())
    return parser.targets


def test_run_embeddings_writes_figures_metrics_manifest_and_index_smoke(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    assert (
        main(["run", "embeddings", "--model", str(tiny_gpt2_dir), "--out", str(out), *SMALL]) == 0
    )
    run_dir = out / "tiny-gpt2" / "embeddings"
    figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert len(figures) == 10 and figures[0] == "01_token_embedding_chunk.png"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["token_embedding_shape"] == [50257, 64] and metrics[
        "position_embedding_shape"
    ] == [64, 64]
    assert metrics["first_tokens"][:3] == ["!", '"', "#"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resolved_config"]["params"]["local_neighbours"] == 100
    assert manifest["model"]["weights"] == "raw" and manifest["versions"][
        "transformer-lens"
    ].startswith("3.")
    assert set(manifest["timings_seconds"]) == {"compute", "render", "total"}
    targets = index_targets(out)
    assert "tiny-gpt2/embeddings/thumbs/01_token_embedding_chunk.jpg" in targets
    assert all((out / target).is_file() for target in targets)
    assert not re.search(r"https?://", (out / "index.html").read_text())


def test_rotary_model_marks_position_parts_not_applicable(
    tiny_llama_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    assert (
        main(["run", "embeddings", "--model", str(tiny_llama_dir), "--out", str(out), *SMALL]) == 0
    )
    run_dir = out / "tiny-llama" / "embeddings"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["position_embedding_shape"] is None
        and "rotary" in metrics["not_applicable"]["position embeddings"]
    )
    assert not (run_dir / "figures" / "04_position_embedding_chunk.png").exists()
    assert "Not applicable: position embeddings" in (out / "index.html").read_text()


def test_failed_run_keeps_previous_outputs_intact(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    run_dir = out / "tiny-gpt2" / "layernorm"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def render_then_fail(result):  # type: ignore[no-untyped-def]
        yield from list(layernorm_module.render(result))[:2]
        raise RuntimeError("killed halfway through rendering")

    broken = layernorm_module.EXPERIMENT.__class__(
        **{**layernorm_module.EXPERIMENT.__dict__, "render": render_then_fail}
    )
    monkeypatch.setattr(layernorm_module, "EXPERIMENT", broken)
    with pytest.raises(RuntimeError, match="killed halfway"):
        main(
            [
                "run",
                "layernorm",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
                "--set",
                "seed=5",
            ]
        )
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in (out / "tiny-gpt2").iterdir()] == ["layernorm"]


def test_interrupted_swap_is_recovered(tmp_path: Path) -> None:
    from unraveled import outputs

    target = tmp_path / "model" / "run"
    previous = tmp_path / "model" / ".run.previous"
    previous.mkdir(parents=True)
    (previous / "metrics.json").write_text("{}")
    staging = outputs.make_staging_dir(target)
    assert (target / "metrics.json").read_text() == "{}" and staging.parent == target.parent


def test_run_hides_the_imports_from_the_garbage_collector_only_while_it_runs(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    import unraveled.runner as runner

    seen: dict[str, object] = {}

    def run_configs(*args: object, **kwargs: object) -> list[Path]:
        seen.update(frozen=gc.get_freeze_count(), enabled=gc.isenabled())
        return []

    monkeypatch.setattr(runner, "run_configs", run_configs)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert (
        main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "out")])
        == 0
    )
    # torch, transformers and TransformerLens's objects out of the collector's sight during the
    # run...
    assert seen["enabled"] is True and isinstance(seen["frozen"], int) and seen["frozen"] > 100_000
    # ... and back in it afterwards, so a caller's later garbage is collected as before.
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_list_and_models_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert "embeddings" in capsys.readouterr().out
    assert main(["models", "smollm2-135m"]) == 0
    assert "bundled GGUF" in capsys.readouterr().out
