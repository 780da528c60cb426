"""Clean up after a local Ray this toolkit started, even when its driver is killed.

A local Ray's processes are the driver's descendants that appear once Ray starts (GCS, raylet,
the raylet's agents, workers). ``stop`` kills those still running that are recognisably Ray by
their command line (``is_ray_command``): a shell, editor or ``tail`` the user started is never
touched. ``sweep`` also kills the Ray processes of the session found otherwise
(``session_processes``) and removes the folder, but only a real folder of this user's (never
through a symbolic link). The driver does both after ``ray.shutdown``; this file, run as a script
beside the driver (``python ray_watchdog.py PID FOLDER STARTED``), notes the driver's descendants
while it lives and does both when it dies without doing so (kill -9): Ray's own reaper stops the
GCS and the raylet then, but the raylet's two agents, orphaned, wait a minute on a GCS that is
gone.

Run by path, not as ``-m unraveled...``, so that it imports nothing of the toolkit (torch,
TransformerLens): only the standard library and psutil. Run by path, its own folder
(``unraveled/engines``) comes first on ``sys.path``, where ``ray.py`` is the toolkit's engine: so
this file must never ``import ray`` (it would import that module, not Ray).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterable

import psutil

SESSION_MARKER = "UNRAVELED_RAY_SESSION"
POLL_SECONDS = 0.5
# A Ray process's command line: the GCS and the raylet (programs of Ray's package), workers and
# agents once retitled (``ray::AtlasWorker``, ``ray::DashboardAgent``), and Ray's own Python scripts
# (a worker before it is retitled, the agents, the head's monitors). Matched on the program and its
# script only, so that ``tail -f .../raylet.out`` or an editor on a Ray log is never taken for Ray.
RAY_PROGRAMS = ("/ray/core/src/ray/gcs/gcs_server", "/ray/core/src/ray/raylet/raylet")
RAY_SCRIPTS = (
    "/ray/_private/workers/default_worker.py",
    "/ray/dashboard/agent.py",
    "/ray/_private/runtime_env/agent/main.py",
    "/ray/_private/log_monitor.py",
    "/ray/autoscaler/_private/monitor.py",
    "/ray/dashboard/dashboard.py",
)


def is_ray_command(process: psutil.Process) -> bool:
    """Whether ``process``'s command line is one of a Ray's own processes.

    False when the command line is unreadable or the process is gone.
    """
    try:
        command = process.cmdline()
    except psutil.Error:
        return False
    if not command:
        return False
    program = command[0]
    if program.startswith("ray::") or program.endswith(RAY_PROGRAMS):
        return True
    # python [-u] SCRIPT ...: the first argument that isn't an option
    script = next((argument for argument in command[1:] if not argument.startswith("-")), "")
    return os.path.basename(program).startswith("python") and script.endswith(RAY_SCRIPTS)


def is_own_folder(folder: str) -> bool:
    """Whether ``folder`` itself (not what a link there points to) is a directory of this user's."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def session_processes(folder: str) -> list[psutil.Process]:
    """This user's Ray processes of the session in ``folder``.

    Those recognisably Ray by their command line, and either carrying ``SESSION_MARKER=folder``
    in their environment or holding a file open in the folder (a process that retitles itself,
    as Ray's agents do, may overwrite its environment; it keeps its log files open there).
    """
    inside = os.path.join(os.path.abspath(folder), "")
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid() or not is_ray_command(process):
            continue
        try:
            if process.environ().get(SESSION_MARKER) == folder or any(
                opened.path.startswith(inside) for opened in process.open_files()
            ):
                found.append(process)
        except (psutil.Error, OSError):  # gone, or another user's
            continue
    return found


def descendants(pid: int, since: float) -> list[psutil.Process]:
    """The processes below ``pid`` started at or after ``since`` (a ``time.time()``).

    This process itself is left out.
    """
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
    """Kill those of ``processes`` still running that are Ray's; returns how many.

    psutil checks each is still the same process; its command line is read now, as it may have
    started as another.
    """
    running = [process for process in processes if process.is_running() and is_ray_command(process)]
    for process in running:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(running, timeout=5)
    return len(running)


def sweep(folder: str, processes: Iterable[psutil.Process] = ()) -> int:
    """Stop the Ray processes among ``processes`` and the session's, then remove the folder.

    Returns how many were stopped. A ``folder`` that is a link, not a directory or another
    user's is left alone, and so is anything it names.
    """
    if not is_own_folder(folder):
        return stop(processes)
    stopped = stop([*processes, *session_processes(folder)])
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


def watch(driver_pid: int, folder: str, since: float) -> None:
    """Note the driver's descendants started since ``since`` until it exits, then sweep its Ray.

    Whatever of that Ray is left when the driver is gone is stopped, and its folder removed.
    """
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
    watch(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
