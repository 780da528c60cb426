"""What a user sees on the console: progress lines name the model actually used, and log lines
stay whole when the output is not a terminal (CI, ``make all > log``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unraveled.cli import main
from unraveled.models import hub


def test_log_lines_are_not_wrapped_off_a_terminal(tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("a-long-folder-name-" * 6) / "out"
    assert main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any(line.endswith(f"-> {out / 'tiny-gpt2' / 'layernorm'}") for line in lines), lines
    assert any(line.endswith(f"open {out / 'index.html'}") for line in lines), lines


@pytest.mark.slow
def test_progress_names_the_model_actually_used(smollm2_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("UNRAVELED_CACHE", str(smollm2_cache))
    # gpt2 is neither cached nor downloadable: the run falls back to the bundled model.
    monkeypatch.setattr(hub, "cached_snapshot", lambda repo_id: None)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "the hub is unreachable (test)")
    # layernorm reads raw weights, as the other SmolLM2 tests do: one conversion per session.
    assert main(["run", "layernorm", "--model", "gpt2", "--out", str(tmp_path / "out")]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if "[1/1] layernorm: LayerNorm geometry and gammas on" in line]
    assert len(progress) == 1 and progress[0].endswith("on smollm2-135m (fallback: gpt2 unavailable)")
