"""Writing outputs without ever leaving a half-written folder or file behind.

A run is written into a hidden staging folder beside its target and swapped in with renames;
if a run dies mid-swap, the previous outputs are restored on the next start. Staging folders
carry their writer's process id, so a run never deletes the staging folder of another run that
is still alive, and the swap itself holds a lock on the target. Files and folders follow the
user's umask, like any other file they write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_STAGING = re.compile(r"\.(?P<name>.+)\.staging-(?P<pid>\d+)-[^/]+")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
    path.write_text(json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def current_umask() -> int:
    """The process's umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``target`` lives in while renaming in it.

    The lock is on the folder itself, so it leaves no file behind, and the kernel releases it if
    the process dies.
    """
    handle = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def run_target(out_dir: Path, model_slug: str, config_name: str) -> Path:
    """``OUT/<model>/<config>``, refusing any name that would put a run anywhere else.

    Raises:
        ValueError: For an empty, dotted or path-like name (``.``, ``..``, ``a/b``).
    """
    for kind, name in (("model", model_slug), ("config", config_name)):
        if not _PLAIN_NAME.fullmatch(name) or name.startswith("."):
            raise ValueError(f"refusing to publish under {kind} folder name {name!r}: expected a plain name")
    return out_dir / model_slug / config_name


def make_staging_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to write a run into, named with this process's id."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        recover(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
    # mkdtemp creates 0700 folders; give it the permissions a plain mkdir would.
    os.chmod(staging, 0o777 & ~current_umask())
    return staging


def publish(staging: Path, target: Path, out_dir: Path) -> None:
    """Swap ``staging`` in as ``target`` (which must be ``out_dir/<model>/<config>``).

    The old ``target`` is removed only once the new one is in place.
    """
    if run_target(out_dir, target.parent.name, target.name) != target or staging.parent != target.parent:
        raise ValueError(f"refusing to publish {staging} as {target}: runs are published as {out_dir}/<model>/<config>")
    previous = _previous(target)
    with _locked(target):
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(target, previous)
        os.replace(staging, target)
        shutil.rmtree(previous, ignore_errors=True)


def recover(target: Path) -> None:
    """Undo a swap that was killed halfway, and drop staging folders whose writer has died.

    Call with the target's lock held.
    """
    previous = _previous(target)
    if previous.exists() and not target.exists():
        os.replace(previous, target)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        match = _STAGING.fullmatch(stale.name)
        if match is not None and match["name"] == target.name and not _is_alive(int(match["pid"])):
            shutil.rmtree(stale, ignore_errors=True)
