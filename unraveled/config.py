"""YAML run configs: one file per run in ``configs/``, validated strictly.

A config names an experiment and its params; every error names the file, the field, what was
expected and, for a misspelt name, what was probably meant.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unraveled.errors import ConfigError
from unraveled.experiment import Experiment, Params, available_experiments, load_experiment

DEFAULT_CONFIG_DIR = Path("configs")


class RunConfig(BaseModel):
    """The top level of a config file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    experiment: str = Field(description="Name of a module in experiments/.")
    description: str = Field(description="One or two sentences for the index page.")
    model: str | None = Field(default=None, description="Model name or local checkpoint path.")
    seed: int = Field(default=0, description="Seed for every random choice of the run.")
    params: dict[str, Any] = Field(default_factory=dict, description="The experiment's params.")


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config: the file it came from, its top level and its typed params."""

    name: str
    path: Path
    run: RunConfig
    params: Params
    experiment: Experiment[Any, Any]

    def resolved(self) -> dict[str, Any]:
        """The config as it will run, defaults filled in, for the manifest."""
        return {**self.run.model_dump(), "params": self.params.model_dump(mode="json")}


def config_names(config_dir: Path = DEFAULT_CONFIG_DIR) -> list[str]:
    """Names of the configs in ``config_dir`` (file names without ``.yaml``)."""
    return sorted(path.stem for path in config_dir.glob("*.yaml"))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _config_path(name: str, config_dir: Path) -> Path:
    as_path = Path(name)
    if as_path.suffix in {".yaml", ".yml"}:
        if not as_path.is_file():
            raise ConfigError(str(as_path), None, "no such file")
        return as_path
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        known = config_names(config_dir)
        raise ConfigError(
            name,
            None,
            f"no config named {name!r} in {config_dir}/{_did_you_mean(name, known)} "
            f"(available: {', '.join(known) or 'none'})",
        )
    return path


def _apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(source, override, "expected --set KEY=VALUE, e.g. --set params.layer=3")
    *parents, leaf = key.split(".")
    node = raw
    for parent in parents:
        child = node.setdefault(parent, {})
        if not isinstance(child, dict):
            raise ConfigError(source, key, f"{parent!r} is not a mapping, so it has no {leaf!r}")
        node = child
    node[leaf] = yaml.safe_load(value)


def _format_validation_error(
    error: ValidationError, source: str, prefix: str, schema: type[BaseModel]
) -> ConfigError:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        if item["type"] == "extra_forbidden":
            valid = list(schema.model_fields)
            problem = (
                f"unknown key{_did_you_mean(str(item['loc'][-1]), valid)} "
                f"(valid keys: {', '.join(valid)})"
            )
        elif item["type"] == "missing":
            problem = "required, but missing"
        else:
            problem = f"{item['msg']}, got {item['input']!r}"
        problems.append((field, problem))
    first_field, first_problem = problems[0]
    rest = "".join(f"\n  {field}: {problem}" for field, problem in problems[1:])
    return ConfigError(source, first_field, first_problem + rest)


def load_config(
    name: str, config_dir: Path = DEFAULT_CONFIG_DIR, overrides: list[str] | None = None
) -> LoadedConfig:
    """Read, override and validate one config.

    Args:
        name: A config name (``embeddings`` for ``configs/embeddings.yaml``) or a YAML path.
        config_dir: Where config names are looked up.
        overrides: ``KEY=VALUE`` strings (``params.layer=3``, ``seed=1``), values parsed as YAML.

    Returns:
        The validated config with its experiment and typed params.

    Raises:
        ConfigError: For a missing file, invalid YAML, an unknown key, a wrong type or value, or
            an unknown experiment.
    """
    path = _config_path(name, config_dir)
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(source, None, f"not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, None, "expected a mapping with keys experiment, description, params")
    for override in overrides or []:
        _apply_override(raw, override, source)
    try:
        run = RunConfig.model_validate(raw)
    except ValidationError as error:
        raise _format_validation_error(error, source, "", RunConfig) from None
    known = available_experiments()
    if run.experiment not in known:
        raise ConfigError(
            source,
            "experiment",
            f"unknown experiment {run.experiment!r}{_did_you_mean(run.experiment, known)} "
            f"(available: {', '.join(known)})",
        )
    experiment = load_experiment(run.experiment)
    try:
        params = experiment.params.model_validate(run.params)
    except ValidationError as error:
        raise _format_validation_error(error, source, "params", experiment.params) from None
    return LoadedConfig(name=path.stem, path=path, run=run, params=params, experiment=experiment)
