"""Where configs come from: the built-in ones shipped in the package, and a folder of your own.

Through the CLI, from a temporary folder that is not the checkout, as a user who ran
``pip install unraveled`` would: in a fresh process, except where a test must replace the runner
or a second run would only repeat the seconds a new process takes to import torch. And the wheel
built from the repository, checked to hold every config where the loader reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import REPO_ROOT, run_cli
from unraveled.cli import main
from unraveled.config import BUILTIN_CONFIGS

SHIPPED = sorted(path.stem for path in (REPO_ROOT / "configs").glob("*.yaml"))


def _rows(listing: str) -> dict[str, str]:
    """``unraveled list``'s table as {config: the rest of its row}."""
    rows = {}
    for line in listing.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) > 2 and cells[0]:
            rows[cells[0]] = " | ".join(cells[1:])
    return rows


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """An empty working folder far from the checkout: no configs/ in it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_list_from_a_folder_without_configs_shows_every_builtin(elsewhere: Path) -> None:
    done = run_cli(["list"], {"COLUMNS": "240"}, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    assert sorted(rows) == SHIPPED
    assert all(row.startswith("built-in |") for row in rows.values()), rows
    assert (
        f"built-in configs: {REPO_ROOT / 'configs'}/ · your folder: none (give --config-dir DIR)"
        in done.stdout
    )
    assert list(elsewhere.iterdir()) == []


def test_run_a_builtin_config_from_a_folder_without_configs(
    elsewhere: Path, tiny_gpt2_dir: Path, shared_weight_cache_dir: Path
) -> None:
    out = elsewhere / "out"
    # layernorm: the quickest config on the tiny model; every built-in is found the same way.
    args = ["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", "out"]
    done = run_cli(args, {"UNRAVELED_CACHE": str(shared_weight_cache_dir)}, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "tiny-gpt2" / "layernorm" / "manifest.json").read_text())
    # An editable install reads the checkout's configs/ itself; a wheel, its own copy (see below).
    shipped = REPO_ROOT / "configs" / "layernorm.yaml"
    assert Path(manifest["config_file"]).resolve() == shipped.resolve()
    assert (
        manifest["resolved_config"]["description"]
        == yaml.safe_load(shipped.read_text())["description"]
    )
    assert (out / "index.html").is_file()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["out"]


def test_run_all_from_a_folder_without_configs_selects_every_builtin(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected: list[str] = []
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(
        "unraveled.runner.run_configs",
        lambda plan, *args, **kwargs: selected.extend(c.name for c in plan.configs) or [],
    )
    assert main(["run", "--all", "--out", str(elsewhere / "out")]) == 0
    assert selected == SHIPPED


OVERRIDE = "experiment: layernorm\ndescription: My own layernorm run.\nseed: 7\n"
ADDITION = "experiment: layernorm\ndescription: A config only my folder has.\nseed: 5\n"


def test_config_dir_adds_configs_and_overrides_builtins(
    tmp_path: Path,
    elsewhere: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mine = tmp_path / "my-configs"
    _write(mine, "layernorm", OVERRIDE)
    _write(mine, "extra_norms", ADDITION)

    listing = run_cli(["list", "--config-dir", str(mine)], {"COLUMNS": "240"}, cwd=elsewhere)
    assert listing.returncode == 0, listing.stderr
    rows = _rows(listing.stdout)
    assert sorted(rows) == sorted([*SHIPPED, "extra_norms"])
    assert (
        rows["layernorm"].startswith(f"{mine}/ (overrides built-in) | layernorm |")
        and "My own layernorm run." in rows["layernorm"]
    )
    assert rows["extra_norms"].startswith(f"{mine}/ | layernorm |")
    assert rows["embeddings"].startswith("built-in |")
    assert f"your folder: {mine}/" in listing.stdout

    # The run in this process (torch is imported once per session; a new process takes seconds
    # to import it), from the same working folder: listing above went through a fresh process.
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "out"
    assert (
        main(
            [
                "run",
                "layernorm",
                "extra_norms",
                "--config-dir",
                str(mine),
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"layernorm: {mine / 'layernorm.yaml'}, which overrides the built-in config" in " ".join(
        capsys.readouterr().err.split()
    )
    for name, seed, description in [
        ("layernorm", 7, "My own layernorm run."),
        ("extra_norms", 5, "A config only my folder has."),
    ]:
        manifest = json.loads((out / "tiny-gpt2" / name / "manifest.json").read_text())
        assert manifest["config_file"] == str(mine / f"{name}.yaml")
        assert (
            manifest["resolved_config"]["seed"] == seed
            and manifest["resolved_config"]["description"] == description
        )


HYDRA_TRAIN = "defaults:\n  - model: resnet\n  - _self_\ntrainer:\n  max_epochs: 10\n"


@pytest.fixture
def foreign_project(elsewhere: Path) -> Path:
    """A working folder whose configs/ belongs to another tool (Hydra), one file named as ours."""
    _write(elsewhere / "configs", "train", HYDRA_TRAIN)
    _write(
        elsewhere / "configs", "mlp", "experiment: mlp\ndescription: Another project's mlp file.\n"
    )
    return elsewhere


def test_a_foreign_configs_folder_is_not_read_without_config_dir(foreign_project: Path) -> None:
    done = run_cli(["list"], {"COLUMNS": "240"}, cwd=foreign_project)
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    assert sorted(rows) == SHIPPED and all(row.startswith("built-in |") for row in rows.values()), (
        rows
    )
    assert "Another project's mlp file." not in done.stdout
    assert (
        "your folder: none (give --config-dir DIR; ./configs is read only as --config-dir configs)"
        in " ".join(done.stdout.split())
    )


def test_run_all_beside_a_foreign_configs_folder_runs_the_builtins(
    foreign_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    selected: list[tuple[str, str]] = []
    monkeypatch.chdir(foreign_project)
    monkeypatch.setattr(
        "unraveled.runner.run_configs",
        lambda plan, *args, **kwargs: (
            selected.extend((c.name, c.source) for c in plan.configs) or []
        ),
    )
    assert main(["run", "--all", "--out", "out"]) == 0
    assert selected == [(name, "built-in") for name in SHIPPED]
    assert sorted(path.name for path in foreign_project.iterdir()) == [
        "configs"
    ]  # nothing written: run_configs was replaced


def test_a_configs_folder_named_with_config_dir_is_read(
    foreign_project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(foreign_project)
    # Named, it is read: the Hydra file is then a config, and not a valid one.
    assert main(["list", "--config-dir", "configs"]) == 2
    assert "configs/train.yaml: " in " ".join(capsys.readouterr().err.split())
    (foreign_project / "configs" / "train.yaml").unlink()
    assert main(["list", "--config-dir", "configs"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert (
        rows["mlp"].startswith("configs/ (overrides built-in) | mlp |")
        and "Another project's mlp file." in rows["mlp"]
    )
    assert rows["attention"].startswith("built-in |")


def test_the_checkouts_own_configs_folder_is_the_builtin_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from unraveled.config import ConfigSources

    monkeypatch.chdir(REPO_ROOT)
    assert (
        ConfigSources.locate().folder is None
        and ConfigSources.locate(Path("configs")).folder is None
    )


def test_unknown_name_lists_both_sources_and_suggests_the_close_name(
    tmp_path: Path, elsewhere: Path
) -> None:
    mine = tmp_path / "my-configs"
    _write(mine, "extra_norms", ADDITION)
    (mine / "extra_norm.yml").write_text(ADDITION)
    done = run_cli(
        ["run", "extra_norm", "--config-dir", str(mine), "--out", "out"], {}, cwd=elsewhere
    )
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "no config named 'extra_norm'; did you mean 'extra_norms'?" in message
    assert (
        f"(built-in: {', '.join(SHIPPED)}; in {mine}/: extra_norms); "
        f"{mine / 'extra_norm.yml'} is not read: config files end in .yaml" in message
    )
    alone = run_cli(["run", "embedings", "--out", "out"], {}, cwd=elsewhere)
    assert (
        alone.returncode == 2
        and "did you mean 'embeddings'?" in alone.stderr
        and "--config-dir" in alone.stderr
    )
    assert list(elsewhere.iterdir()) == []


def test_missing_builtin_configs_say_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What an editable install made before the configs shipped sees: no unraveled.configs package.
    monkeypatch.setattr("unraveled.config.BUILTIN_CONFIGS", "unraveled.no_such_configs")
    assert main(["list"]) == 1  # a broken installation, not bad input
    assert (
        "unraveled.no_such_configs: the built-in configs are not installed; reinstall unraveled"
        in " ".join(capsys.readouterr().err.split())
    )


@pytest.mark.parametrize(
    "command", [["list"], ["run", "--all", "--out", "out"], ["run", "embeddings", "--out", "out"]]
)
@pytest.mark.parametrize("where", ["missing", "a file"])
def test_bad_config_dir_exits_2_naming_it(
    command: list[str], where: str, elsewhere: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "my-configs"
    if where == "a file":
        folder.write_text("")
    done = run_cli([*command, "--config-dir", str(folder)], {}, cwd=elsewhere)
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert (
        f"--config-dir: {folder}: " in message
        and ("no such folder" if where == "missing" else "is a file") in message
    )
    assert list(elsewhere.iterdir()) == []


def _copy_of_the_checkout(destination: Path) -> Path:
    """The repository's files without its virtualenv, git data, outputs and build leftovers."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
    )
    return Path(shutil.copytree(REPO_ROOT, destination, ignore=ignore))


def test_the_wheel_ships_every_config_where_the_loader_reads_it(tmp_path: Path) -> None:
    checkout_before = sorted(os.listdir(REPO_ROOT))
    # setuptools writes build/ and *.egg-info next to the sources: build from a copy, never the
    # checkout.
    source = _copy_of_the_checkout(tmp_path / "source")
    dist = tmp_path / "dist"
    build = [
        sys.executable,
        "-c",
        "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))",
        str(dist),
    ]
    built = subprocess.run(build, cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert sorted(os.listdir(REPO_ROOT)) == checkout_before
    # setuptools warns of a folder that is importable but not in `packages` (and would drop it in
    # a later release).
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr

    (wheel,) = dist.glob("unraveled-*.whl")
    package_folder = BUILTIN_CONFIGS.replace(".", "/")
    with zipfile.ZipFile(wheel) as archive:
        for name in SHIPPED:
            assert (
                archive.read(f"{package_folder}/{name}.yaml")
                == (REPO_ROOT / "configs" / f"{name}.yaml").read_bytes()
            )
        for template in sorted((REPO_ROOT / "unraveled" / "templates").iterdir()):
            assert archive.read(f"unraveled/templates/{template.name}") == template.read_bytes()
        # Every module of the checkout ships: a subpackage missing from `packages` is dropped
        # without a word (the experiments import theirs only when they compute).
        shipped = set(archive.namelist())
        modules = [
            *(
                path.relative_to(REPO_ROOT).as_posix()
                for path in (REPO_ROOT / "unraveled").rglob("*.py")
            ),
            *(
                f"unraveled/experiments/{path.name}"
                for path in (REPO_ROOT / "experiments").glob("*.py")
            ),
        ]
        assert [module for module in modules if module not in shipped] == []
        assert not [
            entry
            for entry in archive.namelist()
            if entry.split("/")[0] in {"configs", "experiments", "benchmarks", "tests"}
            or entry.startswith("unraveled/bench")
        ]
        archive.extractall(tmp_path / "site")

    # The unpacked wheel, first on the path, from an empty folder: the installed package reads its
    # own copy.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site"), "COLUMNS": "240"}
    probe = (
        "import unraveled, unraveled.config as c; "
        "print(unraveled.__file__); print(c.builtin_config_dir())"
    )
    where = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.split() == [
        str(tmp_path / "site" / "unraveled" / "__init__.py"),
        str(tmp_path / "site" / package_folder),
    ]
    listing = run_cli(["list"], env, cwd=elsewhere)
    assert listing.returncode == 0, listing.stderr
    rows = _rows(listing.stdout)
    assert sorted(rows) == SHIPPED and all(row.startswith("built-in |") for row in rows.values())
    assert f"built-in configs: {tmp_path / 'site' / package_folder}/ ·" in listing.stdout
