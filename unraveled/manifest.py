"""``manifest.json``, typed once: what a run records about itself.

The runner writes it, and the pages, the compare pages and the bench read it back, through
:class:`RunManifest` alone.

Every field the runner writes is declared here, in the order it writes them, so a manifest dumped
from the model is the file the runner has always written. Entries may carry more than the typed
fields (``extra="allow"``): a newer runner's additions are kept and shown, never refused. A
folder is one of the toolkit's runs only when its manifest validates (:func:`read_manifest`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

MANIFEST = "manifest.json"
# The version of the manifest's shape, written into every manifest as ``schema_version``: a
# folder is a run of this toolkit only if its manifest has this shape. Manifests written
# before the field existed are read when they have the shape in full.
SCHEMA_VERSION = 1


class _Record(BaseModel):
    """A manifest entry: the runner's fields are typed; a newer runner may record more."""

    model_config = ConfigDict(extra="allow", strict=True)


class FigureRecord(_Record):
    """A figure of a run: its file (relative to the run folder), caption, formats, thumbnail."""

    file: StrictStr
    caption: StrictStr = ""
    formats: dict[str, StrictStr] = Field(default_factory=dict)
    thumbnail: StrictStr | None = None


class ViewRecord(_Record):
    """An interactive view of a run: its HTML file, title and size."""

    file: StrictStr
    title: StrictStr = ""
    bytes: StrictInt | None = None


class TableRecord(_Record):
    """A table of a run (``.npz``): its file, what a row is, its size."""

    file: StrictStr
    description: StrictStr = ""
    bytes: StrictInt | None = None


class ModelRecord(_Record):
    """The model a run used, the one it asked for, where it came from and its shape.

    Fields after ``fallback_reason`` are optional: manifests written before they were recorded
    still read.
    """

    requested: StrictStr | None = None
    used: StrictStr
    label: StrictStr
    is_fallback: StrictBool = False
    fallback_reason: StrictStr | None = None
    loaded_from: StrictStr | None = None
    revision: StrictStr | None = None
    from_weight_cache: StrictBool | None = None
    weights: StrictStr | None = None
    # What a bundled model's weights are (they are not its full-precision checkpoint's).
    weights_note: StrictStr | None = None
    load_seconds: StrictFloat | StrictInt | None = None
    architecture: StrictStr | None = None
    n_layers: StrictInt | None = None
    n_heads: StrictInt | None = None
    d_model: StrictInt | None = None
    d_vocab: StrictInt | None = None


class ResolvedConfig(_Record):
    """The config as it ran, defaults filled in."""

    experiment: StrictStr
    description: StrictStr | None = None
    model: StrictStr | None = None
    seed: StrictInt | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class RunManifest(_Record):
    """``manifest.json`` of a run: what makes a folder under ``--out`` one of the toolkit's runs.

    ``schema_version`` is written by every run since version 1; a manifest without it (written
    before) counts only when every typed field has its shape. ``model_identity`` says which
    model the run folder belongs to (``unraveled.runner.model_identity``), so two models never
    share one.
    """

    schema_version: StrictInt | None = None
    config: StrictStr
    config_file: StrictStr | None = None
    title: StrictStr
    # The config's description with its ``{params.NAME}`` quoting the values that ran.
    description: StrictStr = ""
    # What ``--set`` changed from the config file (``params.prompt``: its value).
    overrides: dict[str, Any] = Field(default_factory=dict)
    resolved_config: ResolvedConfig
    seed: StrictInt | None = None
    model: ModelRecord
    model_identity: StrictStr | None = None
    created: StrictStr | None = None
    timings_seconds: dict[str, StrictFloat | StrictInt] = Field(default_factory=dict)
    # Peak resident memory of the process while the config computed and rendered, the loaded
    # model included (sampled: see unraveled.memory).
    peak_rss_mb: StrictFloat | StrictInt | None = None
    figures: list[FigureRecord] = Field(default_factory=list)
    views: list[ViewRecord] = Field(default_factory=list)
    tables: list[TableRecord] = Field(default_factory=list)
    versions: dict[str, StrictStr | None] = Field(default_factory=dict)
    git_commit: StrictStr | None = None

    def as_written(self) -> dict[str, Any]:
        """The manifest as its file holds it: the fields it was given, in the order declared."""
        return self.model_dump(exclude_unset=True)


def read_manifest(
    run_dir: Path, config: str | None = None
) -> tuple[RunManifest | None, str | None]:
    """The manifest of ``run_dir`` when the folder is one of the toolkit's runs; else None and why.

    A run folder is a real folder (not a link) whose ``manifest.json`` is a :class:`RunManifest`
    for the config the folder is named after (or ``config``), of a schema version this toolkit
    reads. The reason names the file, for a warning.
    """
    path = run_dir / MANIFEST
    if run_dir.is_symlink() or not run_dir.is_dir():
        return None, f"{run_dir} is not a folder"
    if path.is_symlink() or not path.is_file():
        return None, f"{path}: no such file"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path}: not readable JSON ({error})"
    if not isinstance(raw, dict):
        return None, f"{path}: expected a JSON object, got {type(raw).__name__}"
    try:
        manifest = RunManifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        return (
            None,
            f"{path}: not a run's manifest ({where}: {first['msg']}; "
            f"{error.error_count()} problem(s))",
        )
    if manifest.schema_version is not None and manifest.schema_version > SCHEMA_VERSION:
        return (
            None,
            f"{path}: written by a newer unraveled (schema_version {manifest.schema_version}; "
            f"this one reads up to {SCHEMA_VERSION})",
        )
    if manifest.config != (config or run_dir.name):
        return (
            None,
            f"{path}: its config is {manifest.config!r}, "
            f"not the folder's name {config or run_dir.name!r}",
        )
    return manifest, None
