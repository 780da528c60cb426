"""Config validation: every error names the file, the field and what was expected; exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from unraveled.cli import main
from unraveled.config import load_config
from unraveled.errors import ConfigError


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = "experiment: embeddings\ndescription: d\nseed: 3\nparams:\n  chunk_tokens: 20\n"


def test_good_config_fills_defaults(tmp_path: Path) -> None:
    _write(tmp_path, "good", GOOD)
    config = load_config("good", tmp_path)
    assert (
        config.run.seed == 3
        and config.params.chunk_tokens == 20
        and config.params.chunk_dims == 150
    )
    assert config.resolved()["params"]["local_neighbours"] == 1000


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("experiment: embeddings\ndescription: d\nparamz: {}\n", "paramz", "did you mean 'params'"),
        ("experiment: embedings\ndescription: d\n", "experiment", "did you mean 'embeddings'"),
        (
            "experiment: embeddings\ndescription: d\nparams:\n  chunk_token: 5\n",
            "params.chunk_token",
            "did you mean 'chunk_tokens'",
        ),
        (
            "experiment: embeddings\ndescription: d\nparams:\n  chunk_tokens: lots\n",
            "params.chunk_tokens",
            "valid integer, got 'lots'",
        ),
        (
            "experiment: embeddings\ndescription: d\nparams:\n  chunk_tokens: 0\n",
            "params.chunk_tokens",
            "greater than or equal to 1",
        ),
        ("experiment: embeddings\ndescription: d\nseed: '1'\n", "seed", "valid integer"),
        ("experiment: embeddings\n", "description", "required, but missing"),
    ],
)
def test_bad_config_names_file_field_and_expectation(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    path = _write(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as raised:
        load_config("bad", tmp_path)
    assert raised.value.source == str(path) and raised.value.field == field
    assert fragment in str(raised.value)


def test_missing_config_suggests_the_close_name(tmp_path: Path) -> None:
    _write(tmp_path, "embeddings", GOOD)
    with pytest.raises(ConfigError, match="did you mean 'embeddings'"):
        load_config("embedings", tmp_path)


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    _write(tmp_path, "broken", "experiment: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("broken", tmp_path)
    _write(tmp_path, "listy", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config("listy", tmp_path)


def test_set_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    _write(tmp_path, "good", GOOD)
    assert load_config("good", tmp_path, ["params.chunk_dims=7", "seed=9"]).params.chunk_dims == 7
    with pytest.raises(ConfigError, match=r"params\.chunk_dims"):
        load_config("good", tmp_path, ["params.chunk_dims=-1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("good", tmp_path, ["params.chunk_dims"])


def test_cli_bad_config_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "configs", "good", GOOD)
    _write(
        tmp_path / "configs",
        "bad",
        "experiment: embeddings\ndescription: d\nparams:\n  chunk_tokens: x\n",
    )
    out = tmp_path / "out"
    status = main(
        ["run", "good", "bad", "--config-dir", str(tmp_path / "configs"), "--out", str(out)]
    )
    assert status == 2
    assert "bad.yaml: params.chunk_tokens" in capsys.readouterr().err
    assert not out.exists()


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["run", "--config-dir", str(tmp_path)]) == 2
    assert main(["run", "--bogus-flag"]) == 2
    assert main(["run", "nope", "--config-dir", str(tmp_path)]) == 2


def test_shipped_configs_are_valid() -> None:
    from unraveled.config import config_names

    names = config_names()
    assert "embeddings" in names
    for name in names:
        load_config(name)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        (
            "experiment: embeddings\ndescription: first\nparams: {}\ndescription: second\n",
            "description",
            (2, 4),
        ),
        (
            "experiment: embeddings\ndescription: d\n"
            "params:\n  chunk_tokens: 5\n  chunk_dims: 5\n  chunk_tokens: 6\n",
            "params.chunk_tokens",
            (4, 6),
        ),
    ],
)
def test_cli_refuses_a_key_given_twice_naming_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, lines: tuple[int, int]
) -> None:
    path = _write(tmp_path / "configs", "twice", text)
    out = tmp_path / "out"
    assert main(["run", "twice", "--config-dir", str(tmp_path / "configs"), "--out", str(out)]) == 2
    assert (
        f"{path}: {key}: given twice, at lines {lines[0]} and {lines[1]}" in capsys.readouterr().err
    )
    assert not out.exists()


def test_a_key_repeated_through_an_alias_or_merge_is_not_a_duplicate(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "merged",
        "experiment: embeddings\ndescription: d\n"
        "params:\n  <<: {chunk_tokens: 5, chunk_dims: 4}\n  chunk_tokens: 6\n",
    )
    # A merge's key is overridden, not repeated.
    assert load_config("merged", tmp_path).params.chunk_tokens == 6
    _write(
        tmp_path,
        "aliased",
        "experiment: embeddings\ndescription: d\nparams: {chunk_tokens: &n 5, chunk_dims: *n}\n",
    )
    assert load_config("aliased", tmp_path).params.chunk_dims == 5


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ("params.chunk_tokens=0", "params.chunk_tokens", "greater than or equal to 1, got 0"),
        ("params.chunk_token=5", "params.chunk_token", "did you mean 'chunk_tokens'"),
        ("seed=-1", "seed", "greater than or equal to 0, got -1"),
    ],
)
def test_cli_set_errors_say_from_set_and_not_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, field: str, fragment: str
) -> None:
    path = _write(tmp_path / "configs", "good", GOOD)
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "good",
                "--config-dir",
                str(tmp_path / "configs"),
                "--out",
                str(out),
                "--set",
                override,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"--set for good: {field} (from --set): " in err and fragment in err
    assert str(path) not in err  # the file's value is fine
    assert not out.exists()


def test_file_errors_beside_a_set_value_still_name_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "bad", "experiment: embeddings\ndescription: d\nparams:\n  chunk_tokens: 0\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config("bad", tmp_path, ["params.chunk_dims=5"])
    assert raised.value.source == str(path) and raised.value.field == "params.chunk_tokens"
