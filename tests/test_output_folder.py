"""The output folder's hard edges through the CLI (issue 19, items 10-15 and 18): only the
toolkit's own runs are ever written into or replaced; a bad manifest, an interrupted swap or page
rebuild, a link, a file or a full disk where a run goes, two models of one name and two runs at
once each end in exit 0 with everything in place, or in a clear message with nothing written and
earlier outputs byte-identical."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unraveled import outputs
from unraveled.cli import main
from unraveled.manifest import MANIFEST, SCHEMA_VERSION, read_manifest

RUN = ("tiny-gpt2", "layernorm")


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file contents, and where each link points (never followed)."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")) if folder.exists() else []:
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())


def _index_links(out: Path) -> list[str]:
    text = (out / "index.html").read_text()
    return [part.split('"')[0] for part in text.split('href="')[1:]]


def _config_named(folder: Path, name: str, experiment: str = "layernorm") -> Path:
    """A config of another name running ``experiment``: a second run folder at the cost of one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"experiment: {experiment}\ndescription: {name}\n", encoding="utf-8")
    return path


@pytest.fixture
def out(published: Path, tmp_path: Path, warm_weight_cache: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(published, copy, symlinks=True)
    return copy


# 10. A user's own files are never written into.
WEB_APP_MANIFEST = {
    "name": "My app",
    "short_name": "app",
    "start_url": ".",
    "display": "standalone",
    "icons": [{"src": "icon.png", "sizes": "192x192"}],
}


def test_a_web_app_beside_the_runs_is_left_alone(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = out / "site" / "app"
    app.mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps(WEB_APP_MANIFEST))
    (app / "index.html").write_text("<html>my own page</html>")
    before = _tree(out / "site")
    second = _config_named(tmp_path / "configs", "layernorm_again")
    assert main(["run", str(second), "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    assert _tree(out / "site") == before
    assert not any("site/" in link for link in _index_links(out))
    assert "site/app/manifest.json: not a run's manifest" in _err(capsys)


def test_a_folder_that_is_not_a_run_is_never_replaced(
    out: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = out / "tiny-gpt2" / "mlp"
    theirs.mkdir()
    (theirs / "manifest.json").write_text(json.dumps(WEB_APP_MANIFEST))
    (theirs / "notes.txt").write_text("mine")
    before = _tree(out)
    assert main(["run", "mlp", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 2
    message = _err(capsys)
    assert "--out" in message and str(theirs) in message and "not a run of unraveled" in message
    assert _tree(out) == before


def test_runs_carry_the_schema_version(out: Path) -> None:
    manifest = json.loads((out / "tiny-gpt2" / "layernorm" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["model_identity"].startswith("checkpoint ") and manifest[
        "model_identity"
    ].endswith("tiny-gpt2")


def test_every_entry_a_run_writes_is_typed_and_reads_back_to_the_same_file(
    out: Path, tmp_path: Path
) -> None:
    run_dir = out / "tiny-gpt2" / "layernorm"
    manifest, problem = read_manifest(run_dir)
    assert problem is None and manifest is not None
    # Nothing the runner writes is left untyped (extra="allow" would take a new entry silently).
    records = [manifest, manifest.model, manifest.resolved_config, *manifest.figures]
    assert all(record.model_extra == {} for record in records)
    assert manifest.figures and manifest.peak_rss_mb is not None
    # The typed manifest, written again, is the very file the run wrote: same entries, same order.
    outputs.write_manifest(tmp_path, manifest)
    assert (tmp_path / MANIFEST).read_bytes() == (run_dir / MANIFEST).read_bytes()


# 11. One wrong-shaped manifest is skipped with a warning, never the end of every later run.
def _wrong(manifest: dict[str, Any], shape: str) -> Any:
    changed = json.loads(json.dumps(manifest))
    if shape == "list":
        return [changed]
    if shape == "string":
        return "manifest"
    if shape == "no model":
        del changed["model"]
    elif shape == "model a string":
        changed["model"] = "gpt2"
    elif shape == "resolved_config a list":
        changed["resolved_config"] = []
    elif shape == "figures a number":
        changed["figures"] = 5
    elif shape == "figure without file":
        changed["figures"] = [{"caption": "no file"}]
    elif shape == "views of numbers":
        changed["views"] = [1, 2]
    elif shape == "timings as text":
        changed["timings_seconds"] = {"total": "slow"}
    elif shape == "newer schema":
        changed["schema_version"] = SCHEMA_VERSION + 1
    return changed


def _broken_copy(out: Path, shape: str) -> tuple[Path, dict[str, bytes | str]]:
    """A copy of the published run whose manifest has the wrong ``shape``; its files as written."""
    broken = out / "tiny-gpt2" / "broken"
    shutil.copytree(out / "tiny-gpt2" / "layernorm", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(
        json.dumps(_wrong({**manifest, "config": "broken"}, shape))
    )
    return broken, _tree(broken)


def test_a_run_beside_a_wrong_shaped_manifest_skips_it_with_a_warning(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken, before = _broken_copy(out, "no model")
    second = _config_named(tmp_path / "configs", "layernorm_again")
    assert main(["run", str(second), "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    assert f"skipping {broken} in the report" in _err(capsys)
    links = _index_links(out)
    assert (
        "tiny-gpt2/layernorm_again/index.html" in links
        and "tiny-gpt2/layernorm/index.html" in links
    )
    assert not any("broken" in link for link in links)
    assert _tree(broken) == before


# Every shape through `unraveled report`, which rebuilds the pages as a run does (write_pages)
# without running a model again; the test above shows a run skipping one the same way.
@pytest.mark.parametrize(
    "shape",
    [
        "list",
        "string",
        "no model",
        "model a string",
        "resolved_config a list",
        "figures a number",
        "figure without file",
        "views of numbers",
        "timings as text",
        "newer schema",
    ],
)
def test_a_wrong_shaped_manifest_is_skipped_with_a_warning(
    shape: str, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken, before = _broken_copy(out, shape)
    (out / "index.html").unlink()  # so the links below are the rebuilt index's
    assert main(["report", str(out)]) == 0
    assert f"skipping {broken} in the report" in _err(capsys)
    links = _index_links(out)
    assert "tiny-gpt2/layernorm/index.html" in links
    assert not any("broken" in link for link in links)
    assert _tree(broken) == before


# 12. A swap interrupted between its renames.
def test_a_swap_killed_between_its_renames_is_undone_by_any_later_run(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    run_dir = out / "tiny-gpt2" / "layernorm"
    before = _tree(run_dir)
    # What kill -9 after the first rename leaves: the config's run moved aside, nothing in its
    # place.
    os.replace(run_dir, run_dir.with_name(".layernorm.previous"))
    second = _config_named(tmp_path / "configs", "layernorm_again")
    assert main(["run", str(second), "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    after = _tree(run_dir)
    assert {name: data for name, data in after.items() if name != "index.html"} == {
        name: data for name, data in before.items() if name != "index.html"
    }
    assert not list((out / "tiny-gpt2").glob(".*"))
    assert "tiny-gpt2/layernorm/index.html" in _index_links(out)
    for link in _index_links(out):
        assert (out / link.split("#")[0]).exists(), link


def test_a_swap_killed_after_its_second_rename_keeps_the_new_run(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    run_dir = out / "tiny-gpt2" / "layernorm"
    shutil.copytree(run_dir, run_dir.with_name(".layernorm.previous"))
    (run_dir / "metrics.json").write_text('{"new": 1}\n')
    before = _tree(run_dir)
    second = _config_named(tmp_path / "configs", "layernorm_again")
    assert main(["run", str(second), "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    assert (run_dir / "metrics.json").read_text() == '{"new": 1}\n'
    assert {k: v for k, v in _tree(run_dir).items() if k != "index.html"} == {
        k: v for k, v in before.items() if k != "index.html"
    }
    assert not list((out / "tiny-gpt2").glob(".*"))


def test_ctrl_c_inside_the_swap_waits_for_its_end(
    out: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_ctrl_c(source: Any, destination: Any) -> None:
        real_replace(source, destination)
        calls.append(Path(destination).name)
        if Path(destination).name == ".layernorm.previous":  # between the swap's two renames
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs.os, "replace", replace_then_ctrl_c)
    # Ctrl-C as a CLI process handles it: an earlier test in this worker (a local Ray) may have
    # left SIGINT ignored, and an ignored Ctrl-C rightly lets the run finish.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = main(
            [
                "run",
                "layernorm",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
                "--set",
                "seed=3",
            ]
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130 and "interrupted" in capsys.readouterr().err
    assert ".layernorm.previous" in calls  # the Ctrl-C did arrive inside the window
    manifest = json.loads((out / "tiny-gpt2" / "layernorm" / "manifest.json").read_text())
    assert manifest["seed"] == 3  # the swap finished: the new run in place, nothing hidden
    assert not list((out / "tiny-gpt2").glob(".*"))


# 13. A file or a link where a run folder goes.
def test_a_file_where_the_run_goes_is_refused(
    out: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (out / "tiny-gpt2" / "mlp").write_text("my notes")
    before = _tree(out)
    assert main(["run", "mlp", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 2
    message = _err(capsys)
    assert str(out / "tiny-gpt2" / "mlp") in message and "is a file" in message
    assert _tree(out) == before


@pytest.mark.parametrize("where", ["model folder", "run folder"])
def test_a_link_where_runs_go_is_refused_and_never_followed(
    where: str, out: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    if where == "model folder":
        shutil.move(out / "tiny-gpt2", outside)
        link = out / "tiny-gpt2"
    else:
        shutil.move(out / "tiny-gpt2" / "layernorm", outside)
        link = out / "tiny-gpt2" / "layernorm"
    link.symlink_to(outside)
    before, before_outside = _tree(out), _tree(outside)
    assert main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 2
    message = _err(capsys)
    assert str(link) in message and "link" in message
    assert _tree(out) == before and _tree(outside) == before_outside


def test_a_run_of_another_config_never_writes_through_a_link(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(out / "tiny-gpt2", outside)
    (outside / "layernorm" / "index.html").write_text("outside --out")
    (out / "elsewhere").symlink_to(outside)
    before_outside = _tree(outside)
    second = _config_named(tmp_path / "configs", "layernorm_again")
    assert main(["run", str(second), "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    assert _tree(outside) == before_outside
    assert not any(link.startswith("elsewhere") for link in _index_links(out))


# 14. Two models that would share a folder; one model named twice.
@pytest.fixture
def two_checkpoints(tiny_gpt2_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "ck" / "a" / "tiny-gpt2", tmp_path / "ck" / "b" / "tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, first)
    shutil.copytree(tiny_gpt2_dir, second)
    return first, second


def test_two_checkpoints_of_one_name_each_get_a_folder(
    two_checkpoints: tuple[Path, Path],
    tmp_path: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = two_checkpoints
    out = tmp_path / "out"
    assert (
        main(["run", "layernorm", "--model", str(first), "--model", str(second), "--out", str(out)])
        == 0
    )
    assert "wrote 2 run(s)" in _err(capsys)
    identities = {
        json.loads((out / folder / "layernorm" / "manifest.json").read_text())["model_identity"]
        for folder in ("tiny-gpt2", "tiny-gpt2-2")
    }
    assert identities == {f"checkpoint {first}", f"checkpoint {second}"}
    assert (out / "compare" / "layernorm.html").is_file()
    # Later, the second alone: it goes to its own folder again; the first's run is untouched.
    kept = _tree(out / "tiny-gpt2" / "layernorm")
    kept.pop("index.html")
    assert (
        main(["run", "layernorm", "--model", str(second), "--out", str(out), "--set", "seed=2"])
        == 0
    )
    assert (
        json.loads((out / "tiny-gpt2-2" / "layernorm" / "manifest.json").read_text())["seed"] == 2
    )
    after = _tree(out / "tiny-gpt2" / "layernorm")
    after.pop("index.html")
    assert after == kept


def test_one_model_named_twice_runs_once(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "layernorm",
                "--model",
                str(tiny_gpt2_dir),
                "--model",
                f"{tiny_gpt2_dir}/",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote 1 run(s)" in _err(capsys)
    assert sorted(path.name for path in out.iterdir()) == ["index.html", "tiny-gpt2"]


def test_a_fallback_never_takes_the_folder_of_the_model_it_stands_in_with(tmp_path: Path) -> None:
    from unraveled.models import PlannedModel
    from unraveled.models.sources import BUNDLED_MODELS, HubModel

    bundled = BUNDLED_MODELS["smollm2-135m"]
    genuine, standing_in = (
        PlannedModel("smollm2-135m", "--model", bundled, bundled).identity,
        PlannedModel(
            "gpt2", "c.yaml", HubModel("gpt2", "gpt2"), bundled, fallback_reason="unavailable"
        ).identity,
    )
    assert (
        genuine == "bundled smollm2-135m"
        and standing_in == "bundled smollm2-135m standing in for hub gpt2"
    )
    out = tmp_path / "out"
    run_dir = out / "smollm2-135m" / "embeddings"
    run_dir.mkdir(parents=True)
    manifest = {
        "config": "embeddings",
        "title": "t",
        "resolved_config": {"experiment": "embeddings"},
        "model": {"used": "smollm2-135m", "label": "smollm2-135m"},
    }
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "model_identity": genuine}))
    assert outputs.model_folder(out, "smollm2-135m", standing_in, {}) == "smollm2-135m-2"
    assert outputs.model_folder(out, "smollm2-135m", genuine, {}) == "smollm2-135m"
    taken: dict[str, str] = {}
    assert [
        outputs.model_folder(tmp_path / "empty", "m", identity, taken)
        for identity in ("a", "b", "a")
    ] == ["m", "m-2", "m"]
    # The report's own folders are never a model's, whatever the model is called.
    assert [
        outputs.model_folder(tmp_path / "empty", name, "c", {}) for name in ("compare", "assets")
    ] == ["compare-2", "assets-2"]


# 15. Output-folder faults: a clear message before computing, or nothing half-published.
@pytest.mark.parametrize(
    ("what", "fragment"),
    [
        ("index.html a folder", "index.html is a folder"),
        ("index.html a dangling link", "index.html is a link"),
        ("compare a file", "compare is a file"),
        ("assets a link", "assets is a link"),
        ("model folder a dangling link", "tiny-gpt2 is a link"),
    ],
)
def test_the_wrong_thing_in_the_pages_place_is_refused_before_loading(
    what: str,
    fragment: str,
    out: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from unraveled import runner

    if what == "index.html a folder":
        (out / "index.html").unlink()
        (out / "index.html").mkdir()
    elif what == "index.html a dangling link":
        (out / "index.html").unlink()
        (out / "index.html").symlink_to(out / "nowhere.html")
    elif what == "compare a file":
        (out / "compare").write_text("mine")
    elif what == "assets a link":
        shutil.rmtree(out / "assets", ignore_errors=True)
        (out.parent / "elsewhere").mkdir()
        (out / "assets").symlink_to(out.parent / "elsewhere")
    else:
        shutil.rmtree(out / "tiny-gpt2")
        (out / "tiny-gpt2").symlink_to(out / "nowhere")
    monkeypatch.setattr(
        runner, "load_planned", lambda *a, **k: pytest.fail("loaded a model before refusing --out")
    )
    before = _tree(out)
    assert main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 2
    message = _err(capsys)
    assert "--out" in message and fragment in message and "Traceback" not in message
    assert _tree(out) == before


def test_an_interrupted_page_rebuild_is_finished_by_the_next_run(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    run_dir = out / "tiny-gpt2" / "layernorm"
    # What a kill during the rebuild leaves: the run without its page, a temporary file of a dead
    # process.
    (run_dir / "index.html").unlink()
    (out / ".index.html.tmp-999999999-abcd").write_text("<html>half")
    (run_dir / ".index.html.tmp-999999999-efgh").write_text("<html>half")
    second = _config_named(tmp_path / "configs", "layernorm_again")
    assert main(["run", str(second), "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    assert (run_dir / "index.html").is_file()
    assert "tiny-gpt2/layernorm/index.html" in _index_links(out)
    assert not [path for path in out.rglob(".*tmp-*")]


def test_a_start_that_is_refused_still_rebuilds_what_an_interrupted_rebuild_left(
    out: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = out / "tiny-gpt2" / "layernorm"
    (run_dir / "index.html").unlink()
    # A run published by a process killed before its page rebuild: on disk, in no page.
    unlisted = out / "tiny-gpt2" / "unlisted"
    shutil.copytree(run_dir, unlisted)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (unlisted / "manifest.json").write_text(json.dumps({**manifest, "config": "unlisted"}))
    assert "tiny-gpt2/unlisted/index.html" not in _index_links(out)
    assert (
        main(
            [
                "run",
                "attention",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
                "--set",
                "params.head=9",
            ]
        )
        == 2
    )
    assert (run_dir / "index.html").is_file() and (unlisted / "index.html").is_file()
    assert "tiny-gpt2/unlisted/index.html" in _index_links(out)


def test_an_unwritable_model_folder_is_refused_before_computing(
    out: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir = out / "tiny-gpt2"
    real_access = os.access
    # Root writes anywhere; a read-only mount is what an ordinary user's read-only folder looks like
    # to root.
    monkeypatch.setattr(
        outputs.os,
        "access",
        lambda path, mode, **k: False if Path(path) == model_dir else real_access(path, mode, **k),
    )
    before = _tree(out)
    assert main(["run", "mlp", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 2
    message = _err(capsys)
    assert str(model_dir) in message and "not writable" in message
    assert _tree(out) == before


def test_a_full_disk_publishes_nothing_and_says_so(
    out: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from unraveled import runner

    real = runner.outputs.write_json

    def full(path: Path, value: Any) -> None:
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, value)

    monkeypatch.setattr(runner.outputs, "write_json", full)
    before = _tree(out)
    assert (
        main(
            [
                "run",
                "layernorm",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
                "--set",
                "seed=9",
            ]
        )
        == 1
    )
    message = _err(capsys)
    assert (
        "No space left on device" in message
        and "nothing of this run was published" in message
        and "Traceback" not in message
    )
    assert _tree(out) == before


def _mount_or_skip(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"can't mount a small tmpfs here: {done.stderr.strip()}")


def test_a_read_only_model_folder_is_refused_before_computing(
    out: Path, tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = out / "tiny-gpt2"
    runs = tmp_path / "runs"
    shutil.move(model_dir, runs)
    model_dir.mkdir()
    _mount_or_skip("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(model_dir))
    try:
        shutil.copytree(runs, model_dir, dirs_exist_ok=True)
        _mount_or_skip("-o", "remount,ro", str(model_dir))
        before = _tree(out)
        assert main(["run", "mlp", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 2
        message = _err(capsys)
        assert str(model_dir) in message and "not writable" in message
        assert _tree(out) == before
    finally:
        subprocess.run(["umount", "-l", str(model_dir)], check=False)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs, where this machine lets the tests mount one (skipped elsewhere)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    _mount_or_skip("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_publishes_nothing_and_says_so(
    tiny_filesystem: Path,
    published: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tiny_filesystem / "out"
    shutil.copytree(published, out)
    free = shutil.disk_usage(tiny_filesystem).free
    (tiny_filesystem / "filler").write_bytes(
        b"\0" * max(free - 64 * 1024, 0)
    )  # 64 KB left: less than a run
    before = _tree(out)
    assert (
        main(
            [
                "run",
                "layernorm",
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
                "--set",
                "seed=9",
            ]
        )
        == 1
    )
    message = _err(capsys)
    assert "No space left on device" in message and "Traceback" not in message
    assert _tree(out) == before


def test_a_second_store_of_one_cache_entry_keeps_the_first(
    tiny_gpt2_dir: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from unraveled.models import weight_cache as cache

    real_replace = os.replace
    stored: list[Path] = []

    def another_run_stores_first(source: Any, destination: Any) -> None:
        destination = Path(destination)
        if destination.parent.name == "weights" and not stored:  # the other run's copy lands first
            real_replace(shutil.copytree(source, destination.with_name(".other")), destination)
            stored.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(cache.os, "replace", another_run_stores_first)
    assert (
        main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "out")])
        == 0
    )
    assert stored and cache.has_entry(stored[0].name)
    assert not [path for path in stored[0].parent.iterdir() if path.name.startswith(".")]


def test_two_first_time_runs_of_one_model_at_once(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    env = {"UNRAVELED_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "unraveled", "run", "layernorm", "--model", str(tiny_gpt2_dir)]
    full_env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", **env}
    runs = [
        subprocess.Popen(
            [*args, "--out", str(tmp_path / f"out{number}")],
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in (1, 2)
    ]
    results = [(run.wait(timeout=600), run.stderr.read() if run.stderr else "") for run in runs]
    assert [status for status, _ in results] == [0, 0], results
    assert all(
        (tmp_path / f"out{number}" / "tiny-gpt2" / "layernorm" / "manifest.json").is_file()
        for number in (1, 2)
    )


def test_two_runs_into_one_folder_at_once_both_reach_the_index(
    tiny_gpt2_dir: Path, tmp_path: Path, shared_weight_cache_dir: Path
) -> None:
    configs = tmp_path / "configs"
    names = ["first", "second"]
    for name in names:
        _config_named(configs, name)
    out = tmp_path / "out"
    full_env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "UNRAVELED_CACHE": str(shared_weight_cache_dir),
    }
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "unraveled",
                "run",
                str(configs / f"{name}.yaml"),
                "--model",
                str(tiny_gpt2_dir),
                "--out",
                str(out),
            ],
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    results = [(run.wait(timeout=600), run.stderr.read() if run.stderr else "") for run in runs]
    assert [status for status, _ in results] == [0, 0], results
    links = _index_links(out)
    assert all(f"tiny-gpt2/{name}/index.html" in links for name in names)


# 18. Waiting for another process's lock, saying so.
# Holds the lock on a folder until told to let go (or for a minute), and writes a file just before.
LOCK_HOLDER = (
    "import fcntl, os, pathlib, select, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
    "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
    "select.select([sys.stdin], [], [], 60); pathlib.Path(sys.argv[2]).touch()"
)


class _LetGoOnceWaiting(logging.Handler):
    """Keeps what ``unraveled.outputs`` logs, and tells the lock's holder to let go once a message
    says this process waits for it."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        super().__init__(logging.INFO)
        self.holder = holder
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.getMessage().startswith("waiting for") and self.holder.stdin is not None:
            self.holder.stdin.write("go\n")
            self.holder.stdin.flush()


def _run_into(out: Path, tiny_gpt2_dir: Path) -> None:
    args = ["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out), "--set", "seed=1"]
    assert main(args) == 0


def _rebuild_pages(out: Path, tiny_gpt2_dir: Path) -> None:
    from unraveled.render.pages import write_pages

    write_pages(out)


@pytest.mark.parametrize(
    ("waiter", "purpose"),
    [(_run_into, "recovering interrupted runs"), (_rebuild_pages, "rebuilding the pages")],
    ids=["run", "page rebuild"],
)
def test_a_run_or_page_rebuild_waits_for_the_process_holding_the_lock_and_says_who(
    waiter: Callable[[Path, Path], None],
    purpose: str,
    out: Path,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never interleaved with another process's run or rebuild: an index written from what one
    run read before the other published would lose the other's run."""
    released = tmp_path / "released"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out), str(released)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    log = logging.getLogger("unraveled.outputs")
    handler = _LetGoOnceWaiting(holder)
    monkeypatch.setattr(log, "level", logging.INFO)
    log.addHandler(handler)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiter(out, tiny_gpt2_dir)
        assert released.exists()  # done only once the holder had let go
    finally:
        log.removeHandler(handler)
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=90)
    said = " ".join(" ".join(handler.messages).split())
    assert (
        f"waiting for pid {holder.pid} (" in said
        and "import fcntl" in said
        and f"holds the lock on {out} ({purpose} there)" in said
    ), said
    assert f"got the lock on {out}" in said
