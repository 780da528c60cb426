"""A headless Chromium with no network, for the tests of the HTML outputs.

Tests get it through the ``browser`` fixture (tests/conftest.py), which skips them, saying why,
where Chromium isn't installed, and puts them in the ``browser`` tier.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--run-all-compositor-stages-before-draw",
    "--virtual-time-budget=15000",
    # Nothing may come from the network: send every host to an address where nothing listens.
    "--host-resolver-rules=MAP * 127.0.0.1:9",
    "--proxy-server=127.0.0.1:9",
    # Without this, headless Chromium prints nothing of the page's console.
    "--enable-logging=stderr",
    "--v=0",
]


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in a headless Chromium with its own profile folder, ``extra`` flags added."""
    if CHROMIUM is None:
        raise FileNotFoundError("Chromium not found (apt-get install chromium)")
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_messages(run: subprocess.CompletedProcess[str]) -> list[str]:
    """What the page wrote to its console (errors and uncaught exceptions included)."""
    return re.findall(r":CONSOLE[^\]]*\] (.*)", run.stderr)
