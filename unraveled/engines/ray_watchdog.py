"""Clean up after a local Ray this toolkit started, even when its driver is killed.

A local Ray's processes are the driver's descendants that appear once Ray starts (GCS, raylet,
the raylet's agents, workers). ``stop`` kills those still running; ``sweep`` also kills any
process of the session found otherwise (``session_processes``: its log files are in the run's
own Ray folder) and removes the folder. The driver does both after ``ray.shutdown``; this file,
run as a script beside the driver (``python ray_watchdog.py PID FOLDER``), notes the driver's
descendants while it lives and does both when it dies without doing so (kill -9): Ray's own
reaper stops the GCS and the raylet then, but the raylet's two agents, orphaned, wait a minute
on a GCS that is gone.

Run by path, not as ``-m unraveled...``, so that it imports nothing of the toolkit (torch,
TransformerLens): only the standard library and psutil.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable

import psutil

SESSION_MARKER = "UNRAVELED_RAY_SESSION"
POLL_SECONDS = 0.5


def session_processes(folder: str) -> list[psutil.Process]:
    """This user's processes of the Ray session in ``folder``: those that carry
    ``SESSION_MARKER=folder`` in their environment, work in the folder or hold a file open in it
    (every Ray process holds its log files there, whatever it was retitled to)."""
    inside = os.path.join(os.path.realpath(folder), "")
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if (
                process.environ().get(SESSION_MARKER) == folder
                or os.path.join(process.cwd(), "").startswith(inside)
                or any(opened.path.startswith(inside) for opened in process.open_files())
            ):
                found.append(process)
        except (psutil.Error, OSError):  # gone, or another user's
            continue
    return found


def descendants(pid: int, since: float) -> list[psutil.Process]:
    """The processes below ``pid`` started at or after ``since`` (a ``time.time()``), this one excepted."""
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    kept = []
    for process in found:
        try:
            if process.pid != os.getpid() and process.create_time() >= since:
                kept.append(process)
        except psutil.Error:
            continue
    return kept


def stop(processes: Iterable[psutil.Process]) -> int:
    """Kill those of ``processes`` still running (psutil checks each is still the same process); returns how many."""
    running = [process for process in processes if process.is_running()]
    for process in running:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(running, timeout=5)
    return len(running)


def sweep(folder: str, processes: Iterable[psutil.Process] = ()) -> int:
    """Stop ``processes`` and every process marked with ``folder``, then remove the folder; returns how many were stopped."""
    stopped = stop([*processes, *session_processes(folder)])
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


def watch(driver_pid: int, folder: str) -> None:
    """Note the driver's new descendants until it exits, then sweep whatever of its Ray is left."""
    since = time.time()
    seen: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(driver_pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
            for process in descendants(driver_pid, since):
                seen.setdefault(process.pid, process)
            time.sleep(POLL_SECONDS)
    except psutil.NoSuchProcess:
        pass
    sweep(folder, seen.values())


if __name__ == "__main__":
    # Started in its own session; also deaf to SIGINT, so a Ctrl-C meant for the driver can't
    # stop the cleanup of the Ray it leaves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.argv[2])
