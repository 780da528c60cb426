"""Where the Ray engine runs: a cluster at ``RAY_ADDRESS``, or a Ray of the run's own.

A cluster at ``RAY_ADDRESS`` is checked before any model loads; otherwise a Ray is started on
this machine for one run, in the run's own temporary folder, and cleaned up.

Importing this module does not import Ray: the check talks to the cluster from a child process
it can stop, because ``ray.init`` on an address that never answers retries for minutes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from unraveled.config import LoadedConfig
from unraveled.engines.ray_watchdog import SESSION_MARKER, descendants, is_own_folder, sweep
from unraveled.errors import ConfigError, UnraveledError

logger = logging.getLogger(__name__)

CONNECT_BUDGET_S = (
    10.0  # for the child process, from its start: Python, Ray's import and reaching the cluster
)
# Reaching the cluster gets at least this long after Ray's import, when that import alone was slow
# (a busy machine, not the cluster's fault); the import itself gets IMPORT_BUDGET_S.
MIN_CONNECT_S = 4.0
IMPORT_BUDGET_S = 60.0
TCP_TIMEOUT_S = 3.0
ADDRESS_FORMS = "HOST:PORT of its head (the GCS port, 6379 by default), ray://HOST:PORT or auto"
# Ray's Unix sockets live at FOLDER/session_<date>_<pid>/sockets/plasma_store, and a socket
# path can't exceed 107 bytes.
MAX_TEMP_ROOT_CHARS = 107 - len(
    "/unraveled-ray-1234567-9/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store"
)

_PROBE = r"""
import json, os, sys
import ray
print("imported", flush=True)
try:
    ray.init(
        address=sys.argv[1], include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    answer = {"total": ray.cluster_resources(), "free": ray.available_resources()}
except BaseException as error:
    answer = {"error": f"{type(error).__name__}: {error}".strip()}
print(json.dumps(answer), flush=True)
os._exit(0)
"""


class RayEngineError(UnraveledError):
    """The Ray engine can't go on: no worker can be placed, or every worker died (exit status 1)."""


def ray_address() -> str | None:
    """``RAY_ADDRESS`` as the Ray engine reads it.

    None (also for ``local``) starts Ray on this machine.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return None if address in ("", "local") else address


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; None for ``auto``.

    Raises:
        ValueError: Neither form.
    """
    if address == "auto":
        return None
    if "://" in address and not address.startswith("ray://"):
        raise ValueError(
            f"is a {address.split('://')[0]}:// URL (a Ray Jobs or dashboard address?)"
        )
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("is not an address")
    return host, int(port)


def _tcp_problem(host: str, port: int) -> str | None:
    """Why nothing can be reached at ``host:port``, or None when something accepts a connection."""
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT_S):
            return None
    except socket.gaierror as error:
        return f"the host name {host!r} does not resolve ({error.strerror})"
    except TimeoutError:
        return f"no answer from {host}:{port} within {TCP_TIMEOUT_S:.0f} s"
    except OSError as error:
        return f"connecting to {host}:{port} failed: {error.strerror or error}"


def probe_cluster(address: str) -> dict[str, Any]:
    """Join the cluster at ``address`` from a child process, stopped if it takes too long.

    The child is stopped ``CONNECT_BUDGET_S`` after it started (or ``MIN_CONNECT_S`` after it
    imported Ray, when that alone took longer).

    Returns:
        ``{"total": resources, "free": resources}`` as Ray reports them, or ``{"error": why}``.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    started = time.monotonic()
    with (
        tempfile.TemporaryFile() as errors,
        subprocess.Popen(
            [sys.executable, "-c", _PROBE, address],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": address},
        ) as child,
    ):
        assert child.stdout is not None

        def read(stream: Any = child.stdout) -> None:
            for line in stream:
                lines.put(line.strip())
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            try:
                while (
                    imported := lines.get(
                        timeout=max(started + IMPORT_BUDGET_S - time.monotonic(), 0.0)
                    )
                ) not in ("imported", None):
                    pass  # something else printed on start-up (a sitecustomize, say)
            except queue.Empty:
                return {
                    "error": "the child process could not import Ray within "
                    f"{IMPORT_BUDGET_S:.0f} s"
                }
            if imported is None:
                return {"error": f"the child process could not import Ray ({_last_line(errors)})"}
            deadline = max(started + CONNECT_BUDGET_S, time.monotonic() + MIN_CONNECT_S)
            try:
                answer = _answer(lines, deadline)
            except queue.Empty:
                last = _last_line(errors)
                return {
                    "error": f"no Ray cluster answered within {time.monotonic() - started:.0f} s"
                    + (f" (Ray said: {last})" if last else "")
                }
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        if answer is None:
            return {"error": f"the child process ended without an answer ({_last_line(errors)})"}
        try:
            found = json.loads(answer)
        except ValueError:
            found = None
        if not isinstance(found, dict) or not (
            "error" in found
            or (isinstance(found.get("total"), dict) and isinstance(found.get("free"), dict))
        ):
            return {"error": f"the child process answered something unreadable: {answer[:200]!r}"}
        return found


def _answer(lines: queue.Queue[str | None], deadline: float) -> str | None:
    """The probe's answer: the last line starting with ``{`` it wrote before it ended.

    Ray may print other lines around it; None when there was none.

    Raises:
        queue.Empty: The child had not ended by ``deadline`` (a ``time.monotonic()``).
    """
    answer = None
    while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.0))) is not None:
        if line.startswith("{"):
            answer = line
    return answer


def _last_line(stream: Any) -> str:
    """The last non-empty line a child wrote to ``stream`` (a temporary file), for a message."""
    stream.seek(0)
    text = stream.read().decode(errors="replace")
    found = [line.strip() for line in text.splitlines() if line.strip()]
    return found[-1][-300:] if found else ""


def check_ray(workers: int | None, source: str) -> None:
    """Before any model loads: reach the cluster ``RAY_ADDRESS`` names, or fail saying how.

    Without ``RAY_ADDRESS`` (or with ``local``) the run starts its own Ray, sized to
    ``workers``: nothing to check.

    Args:
        workers: ``params.ray_workers``.
        source: ``params.engine=ray`` and where it came from, for messages.

    Raises:
        ConfigError: ``RAY_ADDRESS`` is not an address, nothing answers there, it is not a Ray
            cluster that lets this process in, or the cluster has no CPU for a worker (exit 2).
    """
    address = ray_address()
    if address is None:
        return

    def fail(problem: str, tried: str) -> ConfigError:
        return ConfigError(
            "RAY_ADDRESS",
            None,
            f"{address!r}: {problem} (tried {tried}). {source} runs on the Ray cluster "
            f"RAY_ADDRESS names: {ADDRESS_FORMS}; unset RAY_ADDRESS to start Ray on this machine, "
            "or set params.engine=local",
        )

    try:
        host_port = _host_port(address)
    except ValueError as error:
        raise fail(str(error), "reading it as an address") from None
    if host_port is not None:
        problem = _tcp_problem(*host_port)
        if problem is not None:
            raise fail(problem, f"a TCP connection to {host_port[0]}:{host_port[1]}")
    answer = probe_cluster(address)
    if "error" in answer:
        raise fail(
            answer["error"],
            f"ray.init(address={address!r}) in a child process, for up to {CONNECT_BUDGET_S:.0f} s",
        )
    total_cpus = int(answer["total"].get("CPU", 0))
    free_cpus = int(answer["free"].get("CPU", 0))
    if total_cpus == 0:
        raise fail("the cluster has no CPU to place a worker on", "ray.cluster_resources()")
    logger.info("ray: cluster at %s reached: %d CPUs, %d free", address, total_cpus, free_cpus)
    if workers is not None and workers > free_cpus:
        logger.warning(
            "ray: params.ray_workers=%d but the cluster at %s has %d free CPU(s) of %d now: "
            "the run will use as many workers as it can place then",
            workers,
            address,
            free_cpus,
            total_cpus,
        )


def check_engines(configs: Sequence[LoadedConfig]) -> None:
    """``check_ray`` for the configs that run on Ray (once per invocation: one ``RAY_ADDRESS``)."""
    for config in configs:
        if getattr(config.params, "engine", None) == "ray":
            from_set = ", from --set" if "params.engine" in config.set_keys else ""
            check_ray(
                getattr(config.params, "ray_workers", None),
                f"params.engine=ray ({config.path}{from_set})",
            )
            return


def _temp_root() -> str:
    """The system's temporary folder, or /tmp where that path is too long for Ray's sockets."""
    root = tempfile.gettempdir()
    return root if len(root) <= MAX_TEMP_ROOT_CHARS else "/tmp"


def _remove_abandoned(root: str) -> None:
    """Remove the Ray folders (and stop the Ray processes) of earlier runs whose driver is gone.

    Real folders of this user's only (``sweep`` leaves links and other users' entries alone).
    """
    for folder in Path(root).glob("unraveled-ray-*"):
        pid = folder.name.removeprefix("unraveled-ray-").partition("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and is_own_folder(str(folder)):
            sweep(str(folder))


def _new_folder(root: str) -> str:
    """A new folder ``unraveled-ray-PID-N`` in ``root``.

    Named after the driver, for ``_remove_abandoned``, and numbered, as this process may have run
    Ray before or an earlier process with this pid may have left its folder (kept until
    ``_remove_abandoned`` sees that pid dead).
    """
    number = 0
    while True:
        folder = os.path.join(root, f"unraveled-ray-{os.getpid()}-{number}")
        try:
            os.mkdir(folder, 0o700)
            return folder
        except FileExistsError:
            number += 1


@contextmanager
def local_ray(workers: int | None) -> Iterator[None]:
    """Ray started on this machine with ``workers`` CPUs (default: all), for the ``with`` block.

    Its session files go into a folder of this run's own under the system's temporary folder,
    removed afterwards; its processes (this process's descendants started since, and those marked
    with ``SESSION_MARKER``, that are recognisably Ray's) are stopped afterwards, also by a
    watchdog process when this one is killed.
    """
    import ray

    root = _temp_root()
    _remove_abandoned(root)
    folder = _new_folder(root)
    started = time.time()
    watchdog = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("ray_watchdog.py")),
            str(os.getpid()),
            folder,
            repr(started),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    previous = os.environ.get(SESSION_MARKER)
    # Inherited by the processes Ray starts (and by any another thread starts meanwhile: the
    # cleanup stops only those that are recognisably Ray's).
    os.environ[SESSION_MARKER] = folder
    try:
        try:
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                _temp_dir=folder,
            )
        finally:
            if previous is None:
                del os.environ[SESSION_MARKER]
            else:
                os.environ[SESSION_MARKER] = previous
        yield
    finally:
        ray_processes = [
            process for process in descendants(os.getpid(), started) if process.pid != watchdog.pid
        ]
        ray.shutdown()
        left = sweep(folder, ray_processes)
        if left:
            logger.debug("ray: stopped %d process(es) left after ray.shutdown", left)
        watchdog.terminate()
        watchdog.wait()
