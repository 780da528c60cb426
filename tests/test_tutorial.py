"""docs/tutorial.py runs top to bottom, as a notebook in a Jupyter kernel, on the tiny GPT-2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.py"


def test_tutorial_runs_top_to_bottom(
    tiny_gpt2_dir: Path, warm_weight_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jupytext
    from nbclient import NotebookClient

    notebook = jupytext.read(TUTORIAL)
    # The kernel is this interpreter's: its kernelspec runs "python" from PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("UNRAVELED_TUTORIAL_MODEL", str(tiny_gpt2_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]
    shown = [output.get("data", {}) for output in outputs]
    assert any("image/png" in data for data in shown), "no figure shown inline"
    views = [
        data["text/html"] for data in shown if "circuitsvis" in data.get("text/html", "").lower()
    ]
    assert views, "no view shown inline"
    assert (tmp_path / "tutorial-outputs" / "index.html").is_file()
    assert (tmp_path / "tutorial-outputs" / "tiny-gpt2" / "logit_lens" / "manifest.json").is_file()
    assert (tmp_path / "tutorial-outputs" / "tiny-gpt2" / "attention" / "views").is_dir()
