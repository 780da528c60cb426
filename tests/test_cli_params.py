"""``unraveled params NAME`` and ``unraveled --version``, in-process."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tests.helpers.cli import REPO_ROOT
from unraveled.cli import main
from unraveled.experiment import available_experiments, load_experiment


def _rows(capsys: pytest.CaptureFixture[str], name: str) -> dict[str, list[str]]:
    """The printed table's rows by param name: [type, default, bounds, description]."""
    assert main(["params", name]) == 0
    rows: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) != 5:
            continue
        if cells[0]:
            rows[cells[0]] = cells[1:]
        else:  # a wrapped cell goes on in the next line
            last = rows[next(reversed(rows))]
            rows[next(reversed(rows))] = [
                f"{old} {new}".strip() for old, new in zip(last, cells[1:], strict=True)
            ]
    return rows


def test_params_prints_types_defaults_bounds_choices_and_nested_params(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = _rows(capsys, "activation_patching")
    assert rows["ioi.n_pairs"] == ["int", "8", ">= 1; <= 512", "Number of prompt pairs."]
    assert rows["prompts"][:3] == ["str", "'pair'", "one of 'pair', 'ioi', 'pairs'"]
    assert rows["ioi"][:2] == ["IOIParams", "(below)"]
    assert rows["ioi.names"][0] == "list[str]" and rows["ioi.names"][2] == "min_length 3"
    assert "one token" in rows["clean_answer"][2]
    assert "at most 128 tokens" in rows["clean"][2]
    # The schema's order (the user's pairs' params, from their base class, come first).
    assert [row for row in rows if "." not in row] == list(
        load_experiment("activation_patching").params.model_fields
    )


@pytest.mark.parametrize("name", available_experiments())
def test_every_printed_bound_and_default_is_what_the_schema_does(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each int bound printed holds at its edge and fails one past it; defaults are the real."""
    params = load_experiment(name).params
    defaults = params()
    rows = _rows(capsys, name)
    assert [key for key in rows if "." not in key] == list(params.model_fields)
    for key, (kind, default, bounds, _) in rows.items():
        if "." in key:
            continue
        value = getattr(defaults, key)
        if isinstance(value, (bool, int, float, str)) or value is None:
            shown = default.removesuffix("…")  # a long default is cut short
            assert repr(value) == default or (shown != default and repr(value).startswith(shown))
        if kind not in {"int", "int | None"}:
            continue
        for symbol, step, error in ((">=", -1, "greater_than_equal"), ("<=", 1, "less_than_equal")):
            edge = re.search(rf"(?:^|; ){symbol} (\d+)", bounds)
            if edge:
                assert error not in _errors(params, key, int(edge[1])), key
                assert error in _errors(params, key, int(edge[1]) + step), key
            else:  # no bound printed: there is none
                assert error not in _errors(params, key, step * 10**9), key


@pytest.mark.parametrize("name", available_experiments())
def test_every_printed_default_nested_included_is_the_params_default(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A nested field's default is what Params() holds there (its parent's default), not its
    class's own: steering's vector prompts and sampling, say."""
    defaults = load_experiment(name).params()
    for key, (_, default, _, _) in _rows(capsys, name).items():
        value: Any = defaults
        for part in key.split("."):
            if value is None:  # a nested block whose parent defaults to None: its class's own
                break
            value = getattr(value, part)
        else:
            if isinstance(value, BaseModel):
                assert default == "(below)", key
                continue
            shown = default.removesuffix("…")  # a long default is cut short
            assert repr(value) == default or (shown != default and repr(value).startswith(shown)), (
                key
            )


def _errors(params: type[BaseModel], key: str, value: int) -> set[str]:
    """The kinds of error validating ``key=value`` raises (another field's checks may object)."""
    try:
        params(**{key: value})
    except ValidationError as error:
        return {detail["type"] for detail in error.errors()}
    return set()


@pytest.mark.parametrize("name", available_experiments())
def test_python_only_params_are_marked_and_a_config_cannot_give_them(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rows = _rows(capsys, name)
    marked = {key for key, row in rows.items() if row[2].startswith("Python only")}
    # docs/python-api.md: a metric of your own is a param of these, from Python only.
    if name in {"activation_patching", "attribution_patching", "ioi_circuit"}:
        assert "metric" in marked
    for key in marked:
        out = tmp_path / "out"
        args = ["run", name, "--model", str(tmp_path / "no_model"), "--out", str(out)]
        assert main([*args, "--set", f"params.{key}=print"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"params.{key} (from --set)" in err
        # The value is quoted once: the param's own message and the config layer both said it.
        assert err.count("got 'print'") == 1
        assert not out.exists()


def test_params_of_an_unknown_experiment_exits_2_with_the_closest_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["params", "logit_len"]) == 2
    err = capsys.readouterr().err
    assert "logit_len: not an experiment; did you mean 'logit_lens'?" in " ".join(err.split())


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    project = tomllib.loads(Path(REPO_ROOT, "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out == f"unraveled {project['version']}\n"
