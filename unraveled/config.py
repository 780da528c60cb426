"""YAML run configs: the built-in ones and a folder of your own, validated strictly.

Config names are looked up in two places. The built-in configs are the YAML files of the
repository's ``configs/`` folder, installed with the package as ``unraveled.configs`` and read
through ``importlib.resources`` (an editable install reads the checkout's folder itself), so
``unraveled run embeddings`` works from any folder. A folder of your own is read only when named
(``--config-dir DIR``): it adds its configs, and one named like a built-in config overrides it.
A ``./configs`` folder is never read implicitly: in another project it may hold anything (a Hydra
``train.yaml``), and in a checkout it is the built-in folder already.

A config names an experiment and its params; every error names the file, the field, what was
expected and, for a misspelt name, what was probably meant. Validation reads YAML and the
experiments' param schemas only: it never imports torch or TransformerLens, so a bad config is
reported in well under a second.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
import reprlib
import types
import typing
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unraveled.errors import ConfigError, UnraveledError
from unraveled.experiment import Experiment, Params, available_experiments, load_experiment

# The package the built-in configs install as (pyproject.toml maps it to configs/).
BUILTIN_CONFIGS = "unraveled.configs"
BUILTIN = "built-in"
OVERRIDES_BUILTIN = "(overrides built-in)"
# Not read unless named with --config-dir; mentioned by `unraveled list` when it exists.
WORKING_CONFIG_DIR = Path("configs")
# The model a config runs on when it names none (and no --model is given): the only model that
# falls back to the bundled one when it can't be had (unraveled.models.plan).
DEFAULT_MODEL = "gpt2"
# A config's name becomes a folder name under OUT/<model>/: plain identifiers only, so no name
# can point at the model's folder itself ("..yaml" has the stem ".") or outside it.
CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# A run config is a few hundred characters. Aliases let a tiny file expand to gigabytes
# ("billion laughs"); refuse documents whose aliases would expand beyond this many characters.
MAX_EXPANDED_CHARS = 1_000_000
SEED_LIMIT = 2**32
# A description may quote what runs: {params.prompt}, {params.ioi.n_pairs}, {seed}. Rendered from
# the resolved values, so a --set prompt is the one the page and the manifest quote.
DESCRIPTION_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxdict = _short.maxtuple = 6
_short.maxlevel = 3


def shorten(value: Any) -> str:
    """``repr(value)`` cut to a readable length, safe for huge or deeply shared structures."""
    return _short.repr(value)


class RunConfig(BaseModel):
    """The top level of a config file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    experiment: str = Field(description="Name of a module in experiments/.")
    description: str = Field(description="One or two sentences for the index page.")
    model: str | None = Field(
        default=None, min_length=1, description="Model name or local checkpoint path."
    )
    seed: int = Field(
        default=0,
        ge=0,
        lt=SEED_LIMIT,
        description="Seed for every random choice of the run (0 <= seed < 2**32).",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The experiment's params.")


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config: the file it came from, its top level and its typed params."""

    name: str
    path: Path
    run: RunConfig
    params: Params
    experiment: Experiment[Any, Any]
    source: str  # as `unraveled list` shows it: built-in, DIR/, DIR/ (overrides built-in) or file
    set_keys: frozenset[str] = (
        frozenset()
    )  # the keys --set gave values to: params.prompt, seed, ...

    def field_label(self, key: str) -> str:
        """``key`` (``params.prompt``) as messages name it, saying if ``--set`` gave its value."""
        return _field_label(key, self.set_keys)

    @property
    def model(self) -> str:
        """The model the config runs on without ``--model``: its own, else ``DEFAULT_MODEL``."""
        return self.run.model or DEFAULT_MODEL

    def resolved(self) -> dict[str, Any]:
        """The config as it will run, defaults filled in, for the manifest."""
        return {**self.run.model_dump(), "params": self.params.model_dump(mode="json")}

    @property
    def description(self) -> str:
        """The description, each ``{params.NAME}`` and ``{seed}`` replaced by the run's value."""
        return render_description(self.run.description, self.resolved(), str(self.path))

    def overrides(self) -> dict[str, Any]:
        """Each key ``--set`` gave (``params.prompt``), with the value it ran with."""
        resolved = self.resolved()
        return {key: _lookup(resolved, key) for key in sorted(self.set_keys)}


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    """``values["params"]["ioi"]["n_pairs"]`` for ``params.ioi.n_pairs``; KeyError when absent."""
    value: Any = values
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


# Bidirectional classes that can reorder the text around them: right-to-left letters and the
# embedding, override and isolate controls (an unclosed U+202E reverses everything after it).
_BIDI_CLASSES = {"R", "AL", "AN", "RLE", "RLO", "LRE", "LRO", "RLI", "LRI", "FSI", "PDF", "PDI"}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        if any(unicodedata.bidirectional(char) in _BIDI_CLASSES for char in value):
            # Isolated (FIRST STRONG ISOLATE ... POP DIRECTIONAL ISOLATE, the text form of <bdi>):
            # a right-to-left prompt or a stray override reorders only itself, not the description.
            return f"\u2068{value}\u2069"
        return value
    if isinstance(value, list):
        return ", ".join(_as_text(item) for item in value)
    return (
        "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def render_description(
    template: str, resolved: dict[str, Any], source: str, field: str = "description"
) -> str:
    """``template`` with its placeholders filled from the resolved config.

    The resolved config is what ``LoadedConfig.resolved`` returns.

    Only ``{params.NAME}`` (dotted for nested params) and ``{seed}`` are placeholders; other
    braces are text.

    Raises:
        ConfigError: For a placeholder naming no param, naming the params there are.
    """

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name != "seed" and not name.startswith("params."):
            raise ConfigError(
                source,
                field,
                f"{{{name}}} is not a placeholder: "
                "a description quotes {params.NAME} or {seed}",
            )
        try:
            return _as_text(_lookup(resolved, name))
        except KeyError:
            known = list(resolved["params"])
            raise ConfigError(
                source,
                field,
                f"{{{name}}} names no param"
                f"{did_you_mean(name.removeprefix('params.'), known)} "
                f"(params: {', '.join(known)})",
            ) from None

    return DESCRIPTION_PLACEHOLDER.sub(value, template)


def _from_set(key: str, set_keys: Collection[str]) -> bool:
    """Whether ``--set`` gave ``key``'s value, or part of it, or the value it is part of."""
    return any(
        key == set_key or set_key.startswith(f"{key}.") or key.startswith(f"{set_key}.")
        for set_key in set_keys
    )


def _field_label(key: str, set_keys: Collection[str]) -> str:
    # A list item by its index, as Python writes it: params.pairs[3].corrupted.
    shown = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)
    return f"{shown} (from --set)" if _from_set(key, set_keys) else shown


def builtin_config_dir() -> Path:
    """The folder holding the built-in configs, as installed with the package.

    Raises:
        UnraveledError: When the installation lacks them (exit status 1: an editable install
            made before they shipped; reinstall it).
    """
    try:
        folder = importlib.resources.files(BUILTIN_CONFIGS)
    except ModuleNotFoundError:
        raise UnraveledError(
            f"{BUILTIN_CONFIGS}: the built-in configs are not installed; "
            "reinstall unraveled (in a checkout: pip install -e .)"
        ) from None
    # A zipped install is refused: configs are named by their file path everywhere.
    if not isinstance(folder, Path):
        raise UnraveledError(
            f"{BUILTIN_CONFIGS}: installed as {folder!r}, not a folder; "
            "install unraveled unzipped (pip install)"
        )
    return folder


def _within_working_folder(path: Path) -> Path:
    """``path`` relative to the working folder when inside it, else as is.

    Inside a checkout, a built-in config then reads ``configs/x.yaml``.
    """
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


@dataclass(frozen=True)
class ConfigSources:
    """Where config names are looked up: the built-in configs, then a folder of your own.

    Build it with ``ConfigSources.locate``: it checks the folder, and drops it when it is the
    built-in folder itself (``--config-dir configs`` in a checkout installed editable).
    """

    builtin: Path
    folder: Path | None

    @classmethod
    def locate(cls, config_dir: Path | None = None) -> ConfigSources:
        """The built-in configs, plus ``config_dir`` when given (None: the built-in configs only).

        Raises:
            ConfigError: When ``config_dir`` is given but is not a folder holding configs.
        """
        builtin = _within_working_folder(builtin_config_dir())
        folder = config_dir
        if folder is None:
            return cls(builtin, None)
        if not folder.is_dir():
            problem = "is a file, not a folder" if folder.exists() else "no such folder"
            raise ConfigError(
                "--config-dir",
                None,
                f"{folder}: {problem} (looked for {folder.resolve()}); "
                "give a folder of NAME.yaml configs",
            )
        if not any(folder.glob("*.yaml")):
            raise ConfigError(
                "--config-dir",
                None,
                f"{folder}: no configs (*.yaml) in {folder.resolve()}; "
                "give a folder of NAME.yaml configs",
            )
        return cls(builtin, None if folder.resolve() == builtin.resolve() else folder)

    def builtin_files(self) -> dict[str, Path]:
        """The built-in configs by name."""
        return {path.stem: path for path in sorted(self.builtin.glob("*.yaml"))}

    def folder_files(self) -> dict[str, Path]:
        """The folder's configs by name (none without a folder)."""
        return (
            {path.stem: path for path in sorted(self.folder.glob("*.yaml"))} if self.folder else {}
        )

    def files(self) -> dict[str, Path]:
        """Every config by name, sorted; a folder's config replaces the built-in one of its name."""
        return dict(sorted((self.builtin_files() | self.folder_files()).items()))

    def source(self, name: str) -> str:
        """Where the config ``name`` comes from, as ``unraveled list`` shows it."""
        if name not in self.folder_files():
            return BUILTIN
        return f"{self.folder}/" + (f" {OVERRIDES_BUILTIN}" if name in self.builtin_files() else "")

    def _yours(self) -> str:
        if self.folder:
            return f"{self.folder}/"
        # A ./configs of another project is not read: say so, since it used to be.
        unread = (
            WORKING_CONFIG_DIR.is_dir() and WORKING_CONFIG_DIR.resolve() != self.builtin.resolve()
        )
        return "none (give --config-dir DIR" + (
            "; ./configs is read only as --config-dir configs)" if unread else ")"
        )

    def describe(self) -> str:
        """Both sources in a line, for ``unraveled list``: where to copy a built-in config from."""
        return f"built-in configs: {self.builtin}/ · your folder: {self._yours()}"

    def unknown_name_problem(self, name: str) -> str:
        """Why ``name`` is not a config: both sources listed, and the closest name suggested."""
        builtin, own = self.builtin_files(), self.folder_files()
        yours = (
            f"in {self.folder}/: {', '.join(own)}"
            if self.folder
            else f"your folder: {self._yours()}"
        )
        problem = (
            f"no config named {name!r}{did_you_mean(name, list(builtin | own))} "
            f"(built-in: {', '.join(builtin) or 'none'}; {yours})"
        )
        misnamed = self.folder / f"{name}.yml" if self.folder else None
        return problem + (
            f"; {misnamed} is not read: config files end in .yaml"
            if misnamed and misnamed.is_file()
            else ""
        )


def config_names(config_dir: Path | None = None) -> list[str]:
    """Names of the configs (file names without ``.yaml``): the built-in ones and ``config_dir``'s.

    Args:
        config_dir: A folder of your own configs; None: the built-in configs only.

    Raises:
        ConfigError: When ``config_dir`` is given but is not a folder holding configs.
    """
    return list(ConfigSources.locate(config_dir).files())


def did_you_mean(word: str, choices: list[str]) -> str:
    """``"; did you mean 'X'?"`` for the choice closest to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_name(name: str, source: str) -> None:
    if not CONFIG_NAME.fullmatch(name):
        raise ConfigError(
            source,
            None,
            "config names must be plain identifiers "
            "(letters, digits, '_' and '-', not starting with '-'), "
            f"got {shorten(name)}: the name becomes the run's output folder",
        )


def _config_path(name: str, sources: ConfigSources) -> tuple[Path, str]:
    """The file a config name or YAML path stands for, and where it comes from."""
    as_path = Path(name)
    if as_path.suffix in {".yaml", ".yml"}:
        _check_name(as_path.stem, str(as_path))
        if not as_path.is_file():
            raise ConfigError(str(as_path), None, "no such file")
        return as_path, "file"
    _check_name(name, name)
    path = sources.files().get(name)
    if path is None:
        raise ConfigError(name, None, sources.unknown_name_problem(name))
    return path, sources.source(name)


def _expanded_chars(node: yaml.Node, memo: dict[int, int]) -> int:
    """Characters ``node`` stands for with every alias expanded, shared nodes counted each time."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_EXPANDED_CHARS + 1  # a node that contains itself expands without end
    if isinstance(node, yaml.ScalarNode):
        size = len(node.value) + 1
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_chars(child, memo) for child in node.value)
    else:
        size = 1 + sum(_expanded_chars(k, memo) + _expanded_chars(v, memo) for k, v in node.value)
    memo[key] = size = min(size, MAX_EXPANDED_CHARS + 1)
    return size


def _duplicate_key(node: yaml.Node, path: str, seen: set[int]) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping under ``node``: its dotted name and both lines."""
    if id(node) in seen:  # an alias of a node already checked
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{index}]", child) for index, child in enumerate(node.value)]
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        children = []
        for key, value in node.value:
            name = f"{path}.{key.value}" if path else str(key.value)
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in lines:
                    return name, lines[key.value], key.start_mark.line + 1
                lines[key.value] = key.start_mark.line + 1
            children.append((name, value))
    else:
        return None
    for child_path, child in children:
        found = _duplicate_key(child, child_path, seen)
        if found is not None:
            return found
    return None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return f"not valid YAML{where}: {problem}" + (f" ({context})" if context else "")


def parse_yaml(text: str, source: str, field: str | None = None) -> Any:
    """Parse one YAML document safely: plain data only, aliases expanding to a bounded size."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_chars(node, {}) > MAX_EXPANDED_CHARS:
            raise ConfigError(
                source,
                field,
                f"its aliases expand to more than {MAX_EXPANDED_CHARS:,} characters "
                "(an alias bomb?); write values out",
            )
        duplicate = _duplicate_key(node, field or "", set())
        if duplicate is not None:
            key, first, second = duplicate
            # YAML parsers keep the last value silently; a config that says one thing twice is a
            # mistake.
            raise ConfigError(source, key, f"given twice, at lines {first} and {second}; keep one")
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(source, field, _yaml_problem(error)) from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> Any:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            str(path),
            None,
            f"not UTF-8 text (byte {error.start} is {data[error.start]:#04x}); "
            "save the file as UTF-8",
        ) from None
    return parse_yaml(text, str(path))


def _is_text_field(annotation: Any) -> bool:
    """Whether a field holds text: ``str``, ``str | None`` or a ``Literal`` of strings."""
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return len(args) == 1 and _is_text_field(args[0])
    return False


def _split_override(override: str) -> tuple[list[str], str]:
    key, sep, value = override.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(
            "--set", shorten(override), "expected --set KEY=VALUE, e.g. --set params.layer=3"
        )
    return parts, value


def _override_value(parts: list[str], text: str, schema: type[BaseModel], key: str) -> Any:
    """A text field's value is taken as written; any other value is read as YAML."""
    field = schema.model_fields.get(parts[-1]) if len(parts) == 1 else None
    if field is not None and _is_text_field(field.annotation):
        return text
    return parse_yaml(text, "--set", key)


def _apply_override(raw: dict[str, Any], parts: list[str], value: Any, source: str) -> None:
    node = raw
    for parent in parts[:-1]:
        child = node.setdefault(parent, {})
        if not isinstance(child, dict):
            raise ConfigError(
                source, ".".join(parts), f"{parent!r} is not a mapping, so it has no {parts[-1]!r}"
            )
        node = child
    node[parts[-1]] = value


def _format_validation_error(
    error: ValidationError,
    source: str,
    prefix: str,
    schema: type[BaseModel],
    set_keys: Collection[str],
    set_source: str,
) -> ConfigError:
    """The schema's complaints as one error: the first field in the headline, the rest below.

    A field ``--set`` gave is labelled ``(from --set)`` and, when it comes first, the error is
    ``set_source``'s, not the file's: the file's value is not the one at fault.
    """
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        if item["type"] == "extra_forbidden":
            valid = list(schema.model_fields)
            problem = (
                f"unknown key{did_you_mean(str(item['loc'][-1]), valid)} "
                f"(valid keys: {', '.join(valid)})"
            )
        elif item["type"] == "missing":
            problem = "required, but missing"
        else:
            problem = f"{item['msg']}, got {shorten(item['input'])}"
        problems.append((field, problem))
    first_field, first_problem = problems[0]
    rest = "".join(
        f"\n  {_field_label(field, set_keys)}: {problem}" for field, problem in problems[1:]
    )
    where = set_source if _from_set(first_field, set_keys) else source
    return ConfigError(where, _field_label(first_field, set_keys), first_problem + rest)


def load_config(
    name: str, config_dir: Path | None = None, overrides: list[str] | None = None
) -> LoadedConfig:
    """Read, override and validate one config.

    Args:
        name: A config name (``embeddings``: ``DIR/embeddings.yaml`` if the folder has it, else
            the built-in one) or a YAML path.
        config_dir: A folder of your own configs, adding to and overriding the built-in ones;
            None: the built-in configs only.
        overrides: ``KEY=VALUE`` strings (``params.layer=3``, ``seed=1``). A value for a text
            field is taken as written (``--set 'params.prompt=Item #1: yes'`` is that prompt);
            any other value is read as YAML (``3``, ``0.5``, ``true``, ``[a, b]``).

    Returns:
        The validated config with its experiment and typed params.

    Raises:
        ConfigError: For a bad name or ``config_dir``, a missing or unreadable file, invalid YAML,
            an unknown key, a wrong type or value, or an unknown experiment.
    """
    path, origin = _config_path(name, ConfigSources.locate(config_dir))
    source = str(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(
            source, None, "expected a mapping with keys experiment, description, params"
        )
    split = [_split_override(override) for override in overrides or []]
    set_keys = frozenset(".".join(parts) for parts, _ in split)
    set_source = f"--set for {path.stem}"
    for parts, text in split:
        if parts[0] == "experiment":
            raise ConfigError(
                "--set",
                "experiment",
                "a config's experiment can't be overridden (its outputs are named by the config); "
                "copy the config file instead",
            )
        if parts[0] != "params":
            _apply_override(
                raw, parts, _override_value(parts, text, RunConfig, ".".join(parts)), set_source
            )
    try:
        run = RunConfig.model_validate(
            {key: value for key, value in raw.items() if key != "params"} | {"params": {}}
        )
    except ValidationError as error:
        raise _format_validation_error(error, source, "", RunConfig, set_keys, set_source) from None
    if not isinstance(raw.get("params") or {}, dict):
        raise ConfigError(
            source,
            "params",
            f"expected a mapping of the experiment's params, got {shorten(raw['params'])}",
        )
    known = available_experiments()
    if run.experiment not in known:
        raise ConfigError(
            source,
            "experiment",
            f"unknown experiment {shorten(run.experiment)}"
            f"{did_you_mean(run.experiment, known)} (available: {', '.join(known)})",
        )
    experiment = load_experiment(run.experiment)
    raw_params = dict(raw.get("params") or {})
    for parts, text in split:
        if parts[0] == "params":
            if len(parts) == 1:
                raise ConfigError(
                    "--set", "params", "set one param at a time: --set params.NAME=VALUE"
                )
            _apply_override(
                raw_params,
                parts[1:],
                _override_value(parts[1:], text, experiment.params, ".".join(parts)),
                set_source,
            )
    try:
        params = experiment.params.model_validate(raw_params)
    except ValidationError as error:
        raise _format_validation_error(
            error, source, "params", experiment.params, set_keys, set_source
        ) from None
    run = run.model_copy(update={"params": raw_params})
    loaded = LoadedConfig(
        name=path.stem,
        path=path,
        run=run,
        params=params,
        experiment=experiment,
        source=origin,
        set_keys=set_keys,
    )
    # A placeholder naming no param is an error now, before any model loads, not on the page.
    from_set = _from_set("description", set_keys)
    render_description(
        run.description,
        loaded.resolved(),
        set_source if from_set else source,
        _field_label("description", set_keys),
    )
    return loaded
