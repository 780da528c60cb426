"""The HTML outputs in a real headless Chromium, with no network: views render, links resolve.

Skipped, saying why, where Chromium isn't installed; ``.ci/run`` installs it so CI runs these.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import index_targets
from unraveled.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found (apt-get install chromium); .ci/run installs it")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--run-all-compositor-stages-before-draw", "--virtual-time-budget=15000",
    # Nothing may come from the network: send every host to an address where nothing listens.
    "--host-resolver-rules=MAP * 127.0.0.1:9", "--proxy-server=127.0.0.1:9",
    # Without this, headless Chromium prints nothing of the page's console.
    "--enable-logging=stderr", "--v=0",
]


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()], capture_output=True, text=True, timeout=120)


def console_messages(run: subprocess.CompletedProcess[str]) -> list[str]:
    """What the page wrote to its console (errors and uncaught exceptions included)."""
    return re.findall(r":CONSOLE[^\]]*\] (.*)", run.stderr)


def test_console_check_catches_a_broken_page(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text('<html><body><script>console.error("boom"); notDefined();</script></body></html>')
    messages = console_messages(chromium(page, tmp_path / "profile", "--dump-dom"))
    assert any("boom" in m for m in messages) and any("Uncaught ReferenceError" in m for m in messages)


@pytest.fixture(scope="module")
def attention_outputs(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("browser") / "out"
    assert main(["run", "attention", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    return out


def test_attention_view_renders_offline(attention_outputs: Path, tmp_path: Path) -> None:
    page = attention_outputs / "tiny-gpt2" / "attention" / "views" / "attention_layer_01.html"
    dumped = chromium(page, tmp_path / "dom", "--dump-dom")
    dom = dumped.stdout
    assert console_messages(dumped) == []
    # circuitsvis drew one thumbnail canvas per head plus the zoomed head: the bundle ran offline.
    assert len(re.findall(r"<canvas", dom)) == 4 + 1
    assert all(f"L1H{head}" in dom for head in range(4))
    shot = tmp_path / "view.png"
    done = chromium(page, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1200,1200")
    assert shot.is_file(), done.stderr
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"


def test_index_page_renders_and_every_link_resolves(attention_outputs: Path, tmp_path: Path) -> None:
    index = attention_outputs / "index.html"
    dumped = chromium(index, tmp_path / "dom", "--dump-dom")
    assert console_messages(dumped) == []
    assert "Attention patterns, sinks and entropy" in dumped.stdout
    targets = index_targets(attention_outputs)
    assert any(t.endswith("attention_all_layers.html") for t in targets)
    assert all((attention_outputs / target).is_file() for target in targets)
