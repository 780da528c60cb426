"""Across experiment modules: a model check an experiment defines is the one the runner calls, so
a param the model can't take stops the whole invocation before anything is written."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import REPO_ROOT
from unraveled.cli import main
from unraveled.experiment import EXPERIMENTS_PACKAGE, available_experiments


@pytest.mark.parametrize("name", available_experiments())
def test_a_check_the_module_defines_is_the_one_its_experiment_uses(name: str) -> None:
    module = importlib.import_module(f"{EXPERIMENTS_PACKAGE}.{name}")
    defined = getattr(module, "check", None)
    if defined is None:
        assert module.EXPERIMENT.check is None, (
            f"experiments/{name}.py: EXPERIMENT.check is set but the module defines no check"
        )
        return
    assert inspect.isfunction(defined) and defined.__module__ == module.__name__
    assert module.EXPERIMENT.check is defined, (
        f"experiments/{name}.py defines check() but EXPERIMENT does not register it (check=check)"
    )


def test_a_multi_token_ioi_name_exits_2_naming_the_field_before_any_config_is_written(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """logit_lens runs first and would be published before ioi_circuit failed, were the name not
    checked with every config right after the model loads."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "ioi_circuit.yaml").read_text())
    config["params"]["ioi"]["names"] = ["Mary", "John", "Tom", "Xylophonicus"]
    mine = tmp_path / "configs"
    mine.mkdir()
    (mine / "ioi_circuit.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = [
        "run",
        "logit_lens",
        "ioi_circuit",
        "--model",
        str(tiny_gpt2_dir),
        "--config-dir",
        str(mine),
        "--out",
        str(out),
    ]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "ioi_circuit.yaml: params.ioi.names" in err
        and "'Xylophonicus' is" in err
        and "use single-token names" in err
    ), err
    assert not out.exists()
