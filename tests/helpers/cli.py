"""Running the toolkit as a user would: a fresh ``python -m unraveled`` process, with no network."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# An address where nothing listens: a hub that refuses at once, on any machine.
UNREACHABLE_HUB = "http://127.0.0.1:9"


@dataclass(frozen=True)
class CliRun:
    """One ``python -m unraveled`` invocation: where it wrote, and what it returned and printed."""

    out: Path
    done: subprocess.CompletedProcess[str]


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path = REPO_ROOT, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m unraveled ARGS`` in a fresh process, as a user would, with ``env`` added."""
    full_env = {
        **os.environ,
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "unraveled", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class TwoModelReport:
    """Outputs of two configs run on both tiny models in one invocation, and the loads it made."""

    out: Path
    loads: list[tuple[str, str]]  # (model, weights) per load the runner made
