"""Writing outputs without ever leaving a half-written folder or file behind.

A run is written into a hidden staging folder beside its target and swapped in with renames;
if a run dies mid-swap, the previous outputs are restored on the next start. Staging folders
carry their writer's process id, so a run never deletes the staging folder of another run that
is still alive, and the swap itself holds a lock on the target. Files and folders follow the
user's umask, like any other file they write.

Only the toolkit's own runs are ever replaced: a run folder is recognised by its manifest
(:class:`unraveled.manifest.RunManifest`, schema-versioned), never by a file name alone, and
nothing under ``--out`` that is a link, a file where a folder belongs or a folder of someone
else's is written into. A run waiting for another process's lock says which process holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unraveled.errors import ConfigError
from unraveled.manifest import MANIFEST, RunManifest, read_manifest

logger = logging.getLogger(__name__)

_STAGING = re.compile(r"\.(?P<name>.+)\.staging-(?P<pid>\d+)-[^/]+")
# A swapped-out run folder on its way to deletion, and a page's temporary file: both carry
# their writer's process id, so only those of dead processes are cleaned up.
_TRASH = re.compile(r"\.(?P<name>.+)\.trash-(?P<pid>\d+)-[^/]+")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^/]+")
_PREVIOUS = re.compile(r"\.(?P<name>.+)\.previous")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
PAGE = "index.html"
COMPARE_DIR = "compare"
ASSETS_DIR = "assets"  # the views' shared script (unraveled.render.views)


def to_jsonable(value: Any) -> Any:
    """Numpy and torch values as plain JSON; NaN and infinities become null."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented, strict JSON."""
    path.write_text(
        json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )


def write_manifest(run_dir: Path, manifest: RunManifest) -> None:
    """Write ``manifest`` as ``run_dir/manifest.json``: the fields it was given, in order."""
    write_json(run_dir / MANIFEST, manifest.as_written())


def current_umask() -> int:
    """The process's umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        # mkstemp creates 0600 files; give the file the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder, ignoring one already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run_dirs(out_dir: Path) -> Iterator[Path]:
    """Candidate run folders, ``OUT/<model>/<config>``: real folders only.

    Hidden ones (staging, previous) and links are left out, so nothing outside ``out_dir`` is
    ever read as a run.
    """
    if not out_dir.is_dir():
        return
    for model_dir in sorted(out_dir.iterdir()):
        if model_dir.name.startswith(".") or model_dir.is_symlink() or not model_dir.is_dir():
            continue
        for run_dir in sorted(model_dir.iterdir()):
            if (
                not run_dir.name.startswith(".")
                and not run_dir.is_symlink()
                and (run_dir / MANIFEST).is_file()
            ):
                yield run_dir


def _not_replaceable(path: Path) -> str | None:
    """Why ``path`` (a run's target) may not be replaced by a run, or None when it may.

    It may when it is absent, an empty folder, or one of the toolkit's runs.
    """
    if path.is_symlink():
        return f"{path} is a link (to {os.readlink(path)}); runs never write through links"
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} is a file, not a run folder"
    if not any(path.iterdir()):
        return None
    _, problem = read_manifest(path)
    return (
        None
        if problem is None
        else f"{path} holds something that is not a run of unraveled ({problem})"
    )


def check_output_folder(out_dir: Path, targets: Iterable[Path] = ()) -> None:
    """Refuse an ``out_dir`` the runs and pages can't be written into, before anything is.

    Refused: an ``out_dir`` where writing would replace something that isn't the toolkit's own.

    Args:
        out_dir: ``--out``.
        targets: The run folders about to be written, ``OUT/<model>/<config>``.

    Raises:
        ConfigError: Naming ``--out``, the path and what is in the way (exit 2).
    """
    problems = []
    index, compare = out_dir / PAGE, out_dir / COMPARE_DIR
    if index.is_symlink() or (index.exists() and not index.is_file()):
        problems.append(
            f"{index} is {'a link' if index.is_symlink() else 'a folder'}; "
            "the report's index is written there"
        )
    for folder, holds in (
        (compare, "the compare pages are"),
        (out_dir / ASSETS_DIR, "the views' shared script is"),
    ):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            problems.append(
                f"{folder} is {'a link' if folder.is_symlink() else 'a file'}; "
                f"{holds} written in that folder"
            )
    for target in dict.fromkeys(targets):
        model_dir = target.parent
        if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
            kind = f"a link (to {os.readlink(model_dir)})" if model_dir.is_symlink() else "a file"
            problems.append(
                f"{model_dir} is {kind}; runs of this model are written in that folder, "
                "and never through links"
            )
            continue
        if model_dir.is_dir() and not os.access(model_dir, os.W_OK | os.X_OK):
            problems.append(
                f"{model_dir} is not writable (read-only folder or file system); "
                "runs of this model are written in that folder"
            )
            continue
        problem = _not_replaceable(target)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ConfigError(
            "--out",
            None,
            "; ".join(dict.fromkeys(problems))
            + ". Move it away or choose another --out; nothing was written",
        )


# --- which folder each model writes ------------------------------------------------------------


def folder_identities(model_dir: Path) -> set[str | None]:
    """The ``model_identity`` of every run in ``model_dir`` (None for a run that predates it)."""
    if model_dir.is_symlink() or not model_dir.is_dir():
        return set()
    found: set[str | None] = set()
    for run_dir in model_dir.iterdir():
        if run_dir.name.startswith("."):
            continue
        manifest, _ = read_manifest(run_dir)
        if manifest is not None:
            found.add(manifest.model_identity)
    return found


def model_folder(out_dir: Path, slug: str, identity: str, taken: dict[str, str]) -> str:
    """The folder under ``out_dir`` for the model ``identity``, whose plain name is ``slug``.

    ``slug`` when it is free or already holds this model's runs; else ``slug-2``, ``slug-3``...,
    the first free one or holding this model: two checkpoint folders both named ``tiny-gpt2``,
    or a model that fell back beside the model it fell back to, each keep their own runs.
    Runs from before identities were recorded count as any model's (they used to be replaced).

    Args:
        out_dir: ``--out``.
        slug: The model's plain folder name.
        identity: What tells this model from another of the same name (``model_identity``).
        taken: Folders already given to models in this invocation, by name; updated.
    """
    number = 1
    while True:
        name = slug if number == 1 else f"{slug}-{number}"
        number += 1
        if name in (COMPARE_DIR, ASSETS_DIR):  # the report's own folders, never a model's
            continue
        if name in taken:
            if taken[name] == identity:
                return name
            continue
        others = folder_identities(out_dir / name) - {None, identity}
        if not others:
            taken[name] = identity
            return name


# --- locks -------------------------------------------------------------------------------------


def lock_holders(folder: Path) -> list[str]:
    """Who holds a lock on ``folder``, as ``pid N (command line)``, read from ``/proc/locks``.

    Empty where that can't be read.
    """
    try:
        stat = folder.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return []
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    holders = []
    for line in locks.splitlines():
        fields = line.split()
        if "FLOCK" in fields and inode in fields and "->" not in fields:
            pid = fields[fields.index(inode) - 1]
            try:
                command = (
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                    .strip()
                )
            except OSError:
                command = ""
            holders.append(f"pid {pid}" + (f" ({command[:200]})" if command else ""))
    return holders


@contextlib.contextmanager
def _locked(folder: Path, purpose: str = "publishing runs") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while renaming or rebuilding pages in it.

    The lock is on the folder itself, so it leaves no file behind, and the kernel releases it if
    the process dies. When another process holds it, say which one and that this run waits.
    """
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = ", ".join(lock_holders(folder)) or "another process"
            logger.warning(
                "waiting for %s, which holds the lock on %s (%s there)", holders, folder, purpose
            )
            started = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            logger.info("got the lock on %s after %.1f s", folder, time.perf_counter() - started)
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done.

    A swap is two renames, and stopping between them would leave the config's earlier outputs
    hidden.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)
        elif received and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


# --- staging and the swap ----------------------------------------------------------------------


def run_target(out_dir: Path, model_slug: str, config_name: str) -> Path:
    """``OUT/<model>/<config>``, refusing any name that would put a run anywhere else.

    Raises:
        ValueError: For an empty, dotted or path-like name (``.``, ``..``, ``a/b``).
    """
    for kind, name in (("model", model_slug), ("config", config_name)):
        if not _PLAIN_NAME.fullmatch(name) or name.startswith("."):
            raise ValueError(
                f"refusing to publish under {kind} folder name {name!r}: expected a plain name"
            )
    return out_dir / model_slug / config_name


def make_staging_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to write a run into, named with this process's id."""
    if target.parent.is_symlink():
        raise ConfigError(
            "--out", None, f"{target.parent} is a link; runs never write through links"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        recover(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent)
    )
    # mkdtemp creates 0700 folders; give it the permissions a plain mkdir would.
    os.chmod(staging, 0o777 & ~current_umask())
    return staging


def publish(staging: Path, target: Path, out_dir: Path) -> None:
    """Swap ``staging`` in as ``target`` (which must be ``out_dir/<model>/<config>``).

    The old ``target`` is removed only once the new one is in place, and only if it is one of
    the toolkit's runs. Ctrl-C is held back between the renames; a kill there is undone by the
    next run's ``recover_output_folder``.

    Raises:
        ConfigError: When ``target`` is something else than a run (exit 2); nothing is replaced.
    """
    if (
        run_target(out_dir, target.parent.name, target.name) != target
        or staging.parent != target.parent
    ):
        raise ValueError(
            f"refusing to publish {staging} as {target}: "
            f"runs are published as {out_dir}/<model>/<config>"
        )
    previous = _previous(target)
    trash = None
    try:
        with _locked(target.parent):
            problem = _not_replaceable(target)
            if problem is not None:
                raise ConfigError(
                    "--out",
                    None,
                    f"{problem}; move it away or choose another --out (this run was not published)",
                )
            with _ctrl_c_deferred():
                if (
                    previous.exists() or previous.is_symlink()
                ):  # a stale one: the lock is held, no swap is under way
                    os.replace(previous, _trash_name(previous))
                if target.exists():
                    os.replace(target, previous)
                os.replace(staging, target)
                if previous.exists():
                    trash = _trash_name(previous)
                    os.replace(previous, trash)
    finally:
        if (
            trash is not None
        ):  # deleting can take a while: outside the lock (and after a held-back Ctrl-C)
            _remove(trash)


def _trash_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.trash-{os.getpid()}-{secrets.token_hex(4)}")


def recover(target: Path) -> None:
    """Undo a swap that was killed halfway, and drop staging folders whose writer has died.

    Call with the lock on the target's folder held.
    """
    previous = _previous(target)
    if previous.exists() and not target.exists() and not target.is_symlink():
        os.replace(previous, target)
        logger.warning(
            "restored %s, which an interrupted run had moved aside to %s", target, previous
        )
    elif (
        previous.is_dir()
        and not previous.is_symlink()
        and read_manifest(previous, target.name)[1] is None
    ):  # killed after the new run was in place
        shutil.rmtree(previous, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        match = _STAGING.fullmatch(stale.name)
        if match is not None and match["name"] == target.name and not _is_alive(int(match["pid"])):
            shutil.rmtree(stale, ignore_errors=True)


def _remove_dead_writers_files(folder: Path, pattern: re.Pattern[str]) -> bool:
    removed = False
    for path in folder.glob(".*"):
        match = pattern.fullmatch(path.name)
        if match is not None and not _is_alive(int(match["pid"])):
            _remove(path)
            removed = True
    return removed


def recover_output_folder(out_dir: Path) -> bool:
    """Put ``out_dir`` back in order after runs that were killed.

    Restores every run an interrupted swap had moved aside and removes what dead runs left
    (swapped-out folders, pages' temporary files). Returns whether the pages need rebuilding:
    something was recovered or removed, a run has no page, or the index is older than a run.

    Call at the start of every run into ``out_dir``, before anything is written.
    """
    if not out_dir.is_dir():
        return False
    rebuild = False
    with _locked(out_dir, "recovering interrupted runs"):
        rebuild |= _remove_dead_writers_files(out_dir, _TEMPORARY)
        if (out_dir / COMPARE_DIR).is_dir() and not (out_dir / COMPARE_DIR).is_symlink():
            rebuild |= _remove_dead_writers_files(out_dir / COMPARE_DIR, _TEMPORARY)
        for model_dir in sorted(out_dir.iterdir()):
            if model_dir.name.startswith(".") or model_dir.is_symlink() or not model_dir.is_dir():
                continue
            interrupted = [
                path
                for path in model_dir.glob(".*.previous")
                if _PREVIOUS.fullmatch(path.name) and not path.is_symlink()
            ]
            if interrupted:
                with _locked(model_dir):
                    for previous in interrupted:
                        recover(model_dir / _PREVIOUS.fullmatch(previous.name)["name"])  # type: ignore[index]
                rebuild = True
            _remove_dead_writers_files(model_dir, _TRASH)
        index = out_dir / PAGE
        newest_index = index.stat().st_mtime if index.is_file() else None
        for run_dir in run_dirs(out_dir):
            if read_manifest(run_dir)[0] is None:  # not a run: never written into
                continue
            rebuild |= _remove_dead_writers_files(run_dir, _TEMPORARY)
            if (
                not (run_dir / PAGE).is_file()
                or newest_index is None
                or (run_dir / MANIFEST).stat().st_mtime > newest_index
            ):
                rebuild = True
    return rebuild


@contextlib.contextmanager
def pages_locked(out_dir: Path) -> Iterator[None]:
    """Hold the lock on ``out_dir`` while its pages are rebuilt.

    Two runs into one folder then rebuild one after the other, each from every run on disk, so
    neither index loses a run.
    """
    with _locked(out_dir, "rebuilding the pages"):
        yield
