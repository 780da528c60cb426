"""Measurements in processes of their own.

``unraveled`` runs as a user runs it, and a bench function is called in a fresh Python process
with its own environment.

A measurement that needs its own converted-weights cache (``UNRAVELED_CACHE``) or its own Ray
settings gets them as the environment of the process it runs in, the documented way to set them,
so the bench never changes its own environment halfway. A process's peak resident memory is its
own ``VmHWM``, read by the process itself as it ends: the kernel's ``ru_maxrss`` of a child
starts from the peak of the process that started it (Linux carries it over ``exec``), so after
the bench has loaded a model in-process every child would seem to peak at least as high.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Finished:
    """A process that ran to the end: what its function returned, its wall seconds, its peak."""

    value: Any
    seconds: float
    peak_mb: float


def own_peak_mb() -> float:
    """This process's peak resident memory since it started (``VmHWM``), in MiB."""
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise RuntimeError("no VmHWM in /proc/self/status: the bench measures memory on Linux")
    return int(match[1]) / 1024


def _run(what: Sequence[str], environment: Mapping[str, str]) -> Finished:
    """Run ``python -m benchmarks.processes RESULT *what`` from the repository's root."""
    with tempfile.TemporaryDirectory(prefix="unraveled-bench-") as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", __name__, str(result), *what]
        started = time.perf_counter()
        done = subprocess.run(
            command, env={**os.environ, **environment}, cwd=REPO_ROOT, stdout=subprocess.DEVNULL
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(what)} exited with {done.returncode}")
        written = json.loads(result.read_text(encoding="utf-8"))
    return Finished(written["value"], seconds, written["peak_mb"])


def run_cli(args: Sequence[str], cache: Path) -> Finished:
    """``unraveled ARGS`` in a fresh process, offline, ``cache`` its converted-weights cache."""
    return _run(["cli", *args], {"UNRAVELED_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})


def call_in_child(
    function: Callable[..., Any], *args: Any, environment: Mapping[str, str] | None = None
) -> Finished:
    """``function(*args)`` in a fresh Python process, with ``environment`` added to this one's.

    ``function`` is imported there by name, so it must be a module-level function of an
    importable module (not of the ``__main__`` script); its arguments and what it returns
    travel as JSON.
    """
    if function.__module__ == "__main__" or "." in function.__qualname__:
        raise ValueError(f"{function.__qualname__} can't be imported by name in another process")
    what = ["call", function.__module__, function.__qualname__, json.dumps(args)]
    return _run(what, environment or {})


def main(argv: Sequence[str]) -> int:
    """In the child: run ``unraveled`` or call the function; write its result and peak as JSON."""
    result, kind, *rest = argv
    value = None
    status = 0
    if kind == "cli":
        sys.argv = ["unraveled", *rest]
        try:
            runpy.run_module("unraveled", run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    else:
        module, name, args = rest
        value = getattr(importlib.import_module(module), name)(*json.loads(args))
    Path(result).write_text(json.dumps({"value": value, "peak_mb": own_peak_mb()}), "utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
