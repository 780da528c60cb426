"""Hostile input through the CLI: exit status 2, a message naming the file or option, the field
and what was expected, and nothing written (issue 9's fuzzing findings, one test each)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from unraveled import outputs
from unraveled.cli import main

TINY_EMBEDDINGS = ["--set", "params.local_neighbours=100", "--set", "params.chunk_tokens=50"]


def _config(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content: 'nothing written' means this didn't change."""
    return (
        {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        if folder.exists()
        else {}
    )


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2, err
    flat = " ".join(err.split())
    for fragment in fragments:
        assert fragment in flat, flat
    return flat


# 1. Config names become folder names.
@pytest.mark.parametrize("file_name", ["..yaml", "...yaml", "a b.yaml", "-x.yaml"])
def test_config_names_must_be_plain_identifiers(
    file_name: str, published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, file_name, "experiment: layernorm\ndescription: d\n")
    before = _tree(published)
    _refused(["run", str(path), "--out", str(published)], capsys, str(path), "plain identifiers")
    assert _tree(published) == before


@pytest.mark.parametrize("slug", [".", "..", "", "a/b", ".hidden"])
def test_publish_refuses_any_target_but_out_model_config(slug: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain name"):
        outputs.run_target(tmp_path, "tiny-gpt2", slug)
    with pytest.raises(ValueError, match="plain name"):
        outputs.run_target(tmp_path, slug, "layernorm")
    staging = tmp_path / "m" / ".x.staging-1-a"
    staging.mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing to publish"):
        outputs.publish(staging, tmp_path / "m", tmp_path)


# 2. Alias bombs, and huge values in messages.
BOMB = "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))


@pytest.mark.parametrize("field", ["description", "params.prompt"])
def test_alias_bomb_is_refused_at_once(
    field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = "*l9"
    body = (
        f"description: {value}\n"
        if field == "description"
        else f"description: d\nparams:\n  prompt: {value}\n"
    )
    path = _config(
        tmp_path, "bomb.yaml", 'l0: &l0 ["lol"]\n' + BOMB + "experiment: attention\n" + body
    )
    # Refused from the aliases' counted size: expanded, the 9**9 strings would never come back.
    message = _refused(
        ["run", str(path), "--out", str(tmp_path / "out")], capsys, str(path), "alias bomb"
    )
    assert len(message) < 1000
    assert not (tmp_path / "out").exists()


def test_rejected_values_are_shortened_in_messages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(
        tmp_path,
        "long.yaml",
        "experiment: attention\ndescription: [" + ", ".join(["word"] * 5000) + "]\n",
    )
    message = _refused(
        ["run", str(path), "--out", str(tmp_path / "out")],
        capsys,
        str(path),
        "description",
        "valid string",
    )
    assert len(message) < 600


# 3 and 5. Model-dependent params: checked right after the model loads, before any file.
@pytest.mark.parametrize(
    ("config", "setting", "fragments"),
    [
        (
            "attention",
            "params.prompt=" + "word " * 100,
            ["params.prompt", "102 tokens (BOS included)", "more than the 64", "model's context"],
        ),
        ("attention", "params.head=7", ["params.head", "7 is out of range", "4 heads", "0..3"]),
        (
            "token_journey",
            "params.token_index=40",
            ["params.token_index", "beyond the sentence", "12 tokens"],
        ),
        (
            "logit_attribution",
            "params.correct= Marylebone station",
            ["params.correct", "expected one token"],
        ),
        (
            "activation_patching",
            "params.corrupted=Mary went",
            ["params.corrupted", "same token length"],
        ),
        (
            "head_taxonomy",
            "params.repeat_length=40",
            ["params.repeat_length", "81 positions", "context of 64"],
        ),
        (
            "embeddings",
            "params.dimension_pairs=[[1, 99]]",
            ["params.dimension_pairs", "[1, 99]", "0..63"],
        ),
    ],
)
def test_model_dependent_params_refused_before_anything_is_written(
    config: str,
    setting: str,
    fragments: list[str],
    published: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _tree(published)
    key = setting.partition("=")[0]
    # The value came from --set, and the message says so (the file alone would point at a value
    # it doesn't hold).
    where = f"configs/{config}.yaml: {key} (from --set): "
    _refused(
        ["run", config, "--model", str(tiny_gpt2_dir), "--out", str(published), "--set", setting],
        capsys,
        where,
        *fragments,
    )
    assert _tree(published) == before


def test_logit_lens_documents_a_tighter_prompt_cap(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from unraveled.config import load_config

    assert load_config("logit_lens").experiment.max_prompt_tokens == 64
    assert load_config("attention").experiment.max_prompt_tokens == 128


# 4. Ctrl-C.
def test_ctrl_c_exits_130_saying_so_and_leaves_nothing_half_written(
    published: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from unraveled.experiments import layernorm

    def interrupted(*args: object) -> object:
        raise KeyboardInterrupt

    broken = layernorm.EXPERIMENT.__class__(
        **{**layernorm.EXPERIMENT.__dict__, "render": interrupted}
    )
    monkeypatch.setattr(layernorm, "EXPERIMENT", broken)
    before = _tree(published)
    status = main(
        [
            "run",
            "layernorm",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(published),
            "--set",
            "seed=4",
        ]
    )
    assert status == 130 and "interrupted" in capsys.readouterr().err
    assert _tree(published) == before
    assert not list((published / "tiny-gpt2").glob(".*staging*"))


# 5. Bad values in the config or on the command line.
@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "experiment: mlp\ndescription: d\nparams:\n  toy_vectors: 1e9\n",
            ["params.toy_vectors", "valid integer", "'1e9'"],
        ),
        (
            "experiment: mlp\ndescription: d\nparams:\n  toy_vectors: 1000000000\n",
            ["params.toy_vectors", "less than or equal to 5000"],
        ),
        ("experiment: mlp\ndescription: d\nseed: -1\n", ["seed", "greater than or equal to 0"]),
        ("experiment: mlp\ndescription: d\nseed: 4294967296\n", ["seed", "less than 4294967296"]),
        ("experiment: mlp\ndescription: [unclosed\n", ["not valid YAML at line 3, column 1"]),
        (
            "experiment: mlp\ndescription: d\nmodel: nonsense-model-name\n",
            ["model", "unknown model 'nonsense-model-name'"],
        ),
    ],
)
def test_bad_values_name_file_field_and_expectation(
    text: str, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, "bad.yaml", text)
    message = _refused(
        ["run", str(path), "--out", str(tmp_path / "out")], capsys, str(path), *fragments
    )
    assert "<unicode string>" not in message
    assert not (tmp_path / "out").exists()


def test_non_utf8_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes("experiment: mlp\ndescription: caf\xe9\n".encode("latin-1"))
    _refused(["run", str(path), "--out", str(tmp_path / "out")], capsys, str(path), "not UTF-8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--set", "params.toy_steps=[1"], ["--set: params.toy_steps", "not valid YAML"]),
        (["--set", "params.toy_steps"], ["--set", "KEY=VALUE"]),
        (["--set", "experiment=attention"], ["--set: experiment", "can't be overridden"]),
        (["--device", "nonsense"], ["--device", "not a torch device"]),
        (["--device", "cuda"], ["--device", "no CUDA GPU"]),
        (["--out", ""], ["--out", "empty"]),
        (["--model", "nonsense-model-name"], ["--model: model", "unknown model"]),
    ],
)
def test_bad_options_exit_2_before_loading_anything(
    args: list[str], fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setattr(
            "unraveled.runner.run_configs", lambda *a, **k: pytest.fail("ran despite bad input")
        )
        configs = Path(__file__).resolve().parent.parent / "configs"
        _refused(["run", "mlp", "--config-dir", str(configs), *args], capsys, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    _refused(["run", "mlp", "--out", str(target)], capsys, "--out", "is a file")
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_out_that_is_not_writable_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _refused(["run", "mlp", "--out", str(locked / "out")], capsys, "--out", "not a writable folder")


# 5 and 10. Checkpoint folders that are not checkpoints.
def _broken_checkpoint(source: Path, folder: Path, damage: str) -> Path:
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    if damage == "empty":
        for path in folder.iterdir():
            path.unlink()
    elif damage == "corrupt config.json":
        (folder / "config.json").write_text("{not json")
    elif damage == "no tokenizer":
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("empty", "no config.json"),
        ("corrupt config.json", "not valid JSON"),
        ("no tokenizer", "no tokenizer"),
        ("truncated weights", "not a usable checkpoint"),
    ],
)
def test_a_folder_that_is_not_a_checkpoint_is_bad_input(
    damage: str,
    fragment: str,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _broken_checkpoint(tiny_gpt2_dir, tmp_path / "broken", damage)
    _refused(
        ["run", "mlp", "--model", str(folder), "--out", str(tmp_path / "out")],
        capsys,
        str(folder),
        fragment,
    )
    assert not (tmp_path / "out").exists()
    if damage != "truncated weights":  # only loading reads the weights
        assert main(["models", str(folder)]) == 0
        assert "no:" in capsys.readouterr().out


# 6. Nothing is written when any config of the invocation is bad.
@pytest.mark.parametrize(
    ("bad", "fragment"),
    [("model: nonsense-model-name\n", "unknown model"), ("params:\n  head: 9\n", "params.head")],
)
def test_run_good_bad_writes_nothing(
    bad: str,
    fragment: str,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "configs"
    model = f"model: {tiny_gpt2_dir}\n"
    _config(folder, "good.yaml", "experiment: layernorm\ndescription: d\n" + model)
    _config(
        folder,
        "bad.yaml",
        "experiment: attention\ndescription: d\n" + (bad if "model" in bad else model + bad),
    )
    _refused(
        ["run", "good", "bad", "--config-dir", str(folder), "--out", str(tmp_path / "out")],
        capsys,
        "bad.yaml",
        fragment,
    )
    assert not (tmp_path / "out").exists()


# 7. --set values for text fields stay text.
@pytest.mark.parametrize("prompt", ["Item #1 is the best", "Note: x", "yes", "3", "[not, a, list]"])
def test_set_keeps_text_fields_as_written(prompt: str, tmp_path: Path) -> None:
    from unraveled.config import load_config

    config = load_config(
        "attention",
        overrides=[
            f"params.prompt={prompt}",
            "params.prepend_bos=true",
            "params.head=2",
            "description=Note: x",
        ],
    )
    assert (
        config.params.prompt == prompt
        and config.params.prepend_bos is True
        and config.params.head == 2
    )
    assert config.run.description == "Note: x"


# 8. Two runs of the same config at once.
def test_staging_folders_of_live_runs_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "model" / "run"
    live = outputs.make_staging_dir(target)  # this process: alive
    (live / "figure.png").write_bytes(b"half written by a live run")
    dead = target.parent / ".run.staging-999999999-abc"  # no such process
    dead.mkdir()
    other = outputs.make_staging_dir(target)
    assert (live / "figure.png").is_file() and not dead.exists() and other != live


# 9. No configs where the user looked.
@pytest.mark.parametrize("command", [["run", "--all"], ["list"]])
@pytest.mark.parametrize("where", ["missing", "a file", "empty"])
def test_missing_config_folder_is_bad_input(
    command: list[str], where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "configs"
    if where == "a file":
        folder.write_text("")
    elif where == "empty":
        folder.mkdir()
    _refused(
        [
            *command,
            "--config-dir",
            str(folder),
            *(["--out", str(tmp_path / "out")] if command[0] == "run" else []),
        ],
        capsys,
        str(folder),
        "--config-dir",
    )
    assert not (tmp_path / "out").exists()


# 11. Outputs follow the umask.
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(umask: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        target = tmp_path / "out" / "model" / "run"
        staging = outputs.make_staging_dir(target)
        outputs.publish(staging, target, tmp_path / "out")
        outputs.write_text_atomic(tmp_path / "out" / "index.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "index.html").stat().st_mode) == 0o666 & ~umask


def test_published_run_records_peak_memory(published: Path) -> None:
    manifest = json.loads((published / "tiny-gpt2" / "layernorm" / "manifest.json").read_text())
    assert 50 < manifest["peak_rss_mb"] < 24_000
