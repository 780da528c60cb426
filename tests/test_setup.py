"""The Makefile's setup: where torch comes from.

PyPI's Linux torch is the multi-GB CUDA build, so the index is the user's choice
(``TORCH_INDEX_URL``), and without one setup uses pip's own configuration, which must keep working
on machines that reach only a mirror or a local wheel house. ``make -n`` prints the commands
without running any.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers.cli import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def _torch_install(extra: list[str], env: dict[str, str]) -> str:
    """The line of ``make setup`` that installs torch, printed, not run (-B: as in a new clone)."""
    full_env = {key: value for key, value in os.environ.items() if key != "TORCH_INDEX_URL"} | env
    planned = subprocess.run(
        ["make", "-n", "-B", "setup", *extra],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in planned.stdout.splitlines() if "torch==" in line]
    return line


def test_torch_comes_from_pip_s_own_index_unless_told_otherwise() -> None:
    assert _torch_install([], {}).split()[-4:] == ["pip", "install", "--quiet", "torch==2.13.0"]


@pytest.mark.parametrize("how", ["environment", "make variable"])
def test_torch_index_url_picks_the_cpu_or_a_cuda_build(how: str) -> None:
    url = "https://download.pytorch.org/whl/cpu"
    line = (
        _torch_install([f"TORCH_INDEX_URL={url}"], {})
        if how == "make variable"
        else _torch_install([], {"TORCH_INDEX_URL": url})
    )
    assert line.split()[-4:] == ["--quiet", "--index-url", url, "torch==2.13.0"]
