"""The only places unraveled reaches past a dependency's public API: one module per dependency.

Each module says why it must, which versions it was checked against, and checks before each use
that the installed version is one of those and that what it relies on is there: a dependency
that changed stops the run with an ``IncompatibleDependencyError`` saying what to install, rather
than silently computing something else.

- ``transformer_lens``: weight processing without its defensive copies, and its model-name
  table read without importing it.
- ``umap``: exact nearest neighbours behind UMAP's search-index interface, and its numba kernels
  cached on disk.
- ``mkl``: handing back the buffers MKL (torch's BLAS on x86) keeps for reuse.
"""

from __future__ import annotations

import re
from importlib import metadata

from unraveled.errors import UnraveledError


class IncompatibleDependencyError(UnraveledError):
    """An installed dependency is not a version unraveled's use of its internals was checked on."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``transformer-lens``), as pip reports it."""
    return metadata.version(distribution)


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``3.9.0`` and ``3.9.0rc1`` give ``(3, 9, 0)``."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def require_version(
    distribution: str, lowest: tuple[int, ...], below: tuple[int, ...], relies_on: str
) -> None:
    """Raise unless the installed ``distribution`` is at least ``lowest`` and below ``below``.

    Args:
        distribution: The distribution's name on PyPI.
        lowest: The first release known to work.
        below: The first release not checked.
        relies_on: What unraveled relies on, for the message.

    Raises:
        IncompatibleDependencyError: The installed version is outside that range.
    """
    version = installed_version(distribution)
    if not lowest <= release(version) < below:
        wanted = f"{distribution}>={_dotted(lowest)},<{_dotted(below)}"
        raise IncompatibleDependencyError(
            f"{distribution} {version} is installed, but unraveled relies on {relies_on}, checked "
            f"only for {wanted}: install that (pip install '{wanted}')"
        )


def missing(distribution: str, name: str, relies_on: str) -> IncompatibleDependencyError:
    """The error for a name ``distribution`` no longer has, though its version is a checked one."""
    return IncompatibleDependencyError(
        f"{distribution} {installed_version(distribution)} has no {name}, which unraveled relies "
        f"on for {relies_on}: reinstall unraveled's dependencies (pip install -e .), or report it"
    )


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)
