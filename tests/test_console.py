"""What a user sees on the console: progress lines name the model actually used, and log lines
stay whole when the output is not a terminal (CI, ``make all > log``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import CliRun
from unraveled.cli import main


def test_log_lines_are_not_wrapped_off_a_terminal(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / ("a-long-folder-name-" * 6) / "out"
    assert main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any(line.endswith(f"-> {out / 'tiny-gpt2' / 'layernorm'}") for line in lines), lines
    assert any(line.endswith(f"open {out / 'index.html'}") for line in lines), lines


@pytest.mark.heavy
def test_progress_names_the_model_actually_used(smollm2_fallback_run: CliRun) -> None:
    # gpt2 is neither cached nor downloadable: the run fell back to the bundled model.
    done = smollm2_fallback_run.done
    assert done.returncode == 0, done.stderr
    progress = [
        line
        for line in done.stderr.splitlines()
        if "[1/1] embeddings: Token and position embeddings on" in line
    ]
    assert len(progress) == 1 and progress[0].endswith(
        "on smollm2-135m (fallback: gpt2 unavailable)"
    ), done.stderr
