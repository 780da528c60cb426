"""Writing outputs without ever leaving a half-written folder or file behind.

A run is written into a hidden staging folder beside its target and swapped in with renames;
if a run dies mid-swap, the previous outputs are restored on the next start.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def make_staging_dir(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to write a run into."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def publish(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``; the old ``target`` is removed only once the new one is in place."""
    previous = _previous(target)
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def recover(target: Path) -> None:
    """Undo a swap that was killed halfway, and drop staging folders of runs that died."""
    previous = _previous(target)
    if previous.exists() and not target.exists():
        os.replace(previous, target)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
