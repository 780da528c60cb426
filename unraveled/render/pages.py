"""The report's pages: the index, one page per run and one compare page per shared config.

Built only from what is on disk (each run's ``manifest.json``, ``metrics.json`` and the figure
files they name), so they can be rebuilt at any time and always describe exactly what is there:

- ``OUT/index.html``: every config as a section, in the order of the story (:data:`STORY_ORDER`),
  each model's run as a row of thumbnails opening its run page; a table of contents that stays
  in view.
- ``OUT/<model>/<config>/index.html``: every figure full width with its caption, the manifest's
  facts, the metrics as a table, the views.
- ``OUT/compare/<config>.html``, for a config run on two or more models: each figure of every
  model side by side, and the scalar metrics with a column per model.

Static HTML from Jinja2 templates (escaping on), no scripts, no network: they open from ``file://``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from unraveled.outputs import COMPARE_DIR, pages_locked, read_manifest, run_dirs, write_text_atomic
from unraveled.render import templating
from unraveled.render.templating import format_number, summarise

logger = logging.getLogger(__name__)

# The order of the story the report tells: what a token meets first, then what the model does
# with it, then the causal experiments. Experiments not listed come after, alphabetically, so a
# new experiment shows up without a change here.
STORY_ORDER = (
    "embeddings",
    "layernorm",
    "attention",
    "mlp",
    "token_journey",
    "logit_lens",
    "head_taxonomy",
    "logit_attribution",
    "activation_patching",
    "corpus_atlas",
    "attribution_patching",
    "ioi_circuit",
    "causal_tracing",
)
SHORT_SCALAR_LIST = 4  # shapes and pairs: compared like scalars on the compare pages
MAX_RECORD_ROWS = 50  # rows of a list of records (top heads, ...) shown on a run page
# Manifest entries the run page shows in their own places; any other is listed with the facts,
# so what a newer runner records shows up without a change here.
_SHOWN_MANIFEST_KEYS = {
    "config",
    "config_file",
    "title",
    "description",
    "overrides",
    "resolved_config",
    "seed",
    "model",
    "created",
    "timings_seconds",
    "figures",
    "views",
    "versions",
    "git_commit",
    "schema_version",
    "model_identity",
}
# The analysis the first configs redo, named once on the index (and in the README); its address
# is shown as text, not a link: the pages make no network requests, not even on a click.
ORIGINAL_ANALYSIS = {
    "title": "GPT-2 Unraveled",
    "author": "Massimiliano Viola",
    "repository": "github.com/massimilianoviola/gpt2-unraveled",
    "configs": ("embeddings", "layernorm", "attention", "mlp", "token_journey"),
}
_LAYER_VIEW = re.compile(r"^(?P<group>.+?)_?layer_?(?P<layer>\d+)$")
_LAYER_IN_TITLE = re.compile(r"[\s,:]*(\bof\b\s+)?(\bthe\b\s+)?\blayer\s+\d+\b", re.IGNORECASE)


def story_rank(experiment: str) -> tuple[int, str]:
    """Sort key placing ``experiment`` in the story: listed ones in order, then the rest by name."""
    if experiment in STORY_ORDER:
        return (STORY_ORDER.index(experiment), "")
    return (len(STORY_ORDER), experiment)


@dataclass(frozen=True)
class Run:
    """One published run folder, ``OUT/<slug>/<config>/``, as its manifest and metrics say."""

    slug: str
    config: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def path(self) -> str:
        """The folder relative to the outputs root, ``<slug>/<config>``."""
        return f"{self.slug}/{self.config}"

    @property
    def page(self) -> str:
        """The run page relative to the outputs root."""
        return f"{self.path}/index.html"

    @property
    def experiment(self) -> str:
        """The experiment module's name (configs may share one)."""
        return str(self.manifest.get("resolved_config", {}).get("experiment") or self.config)

    @property
    def model(self) -> dict[str, Any]:
        """The manifest's model record: requested, used, fallback reason, where it came from."""
        return dict(self.manifest.get("model", {}))

    @property
    def is_fallback(self) -> bool:
        """Whether the model used is not the one asked for."""
        return bool(self.model.get("is_fallback"))

    @property
    def description(self) -> str:
        """What the run shows, as the runner rendered it from the params that ran."""
        return str(self.manifest.get("description") or "")

    @property
    def overrides(self) -> dict[str, Any]:
        """What ``--set`` changed from the config file (``params.prompt``: value); {} for none."""
        overrides = self.manifest.get("overrides")
        return dict(overrides) if isinstance(overrides, dict) else {}

    @property
    def params(self) -> dict[str, Any]:
        """The params as they ran, defaults filled in."""
        params = self.manifest.get("resolved_config", {}).get("params")
        return dict(params) if isinstance(params, dict) else {}

    def is_overridden(self, key: str) -> bool:
        """Whether ``--set`` gave ``key`` (``params.ioi``), part of it or the value it is in."""
        return any(
            key == set_key or set_key.startswith(f"{key}.") or key.startswith(f"{set_key}.")
            for set_key in self.overrides
        )

    @property
    def figures(self) -> list[dict[str, Any]]:
        """The figure records, each with at least ``file`` and ``caption``."""
        return list(self.manifest.get("figures", []))

    def figure_name(self, figure: dict[str, Any]) -> str:
        """A figure's identity across models: its file stem."""
        return posixpath.splitext(posixpath.basename(figure["file"]))[0]


def read_runs(out_dir: Path) -> list[Run]:
    """Every published run under ``out_dir``, in the order of the story, then config, then model.

    Only the toolkit's own runs count (``outputs.read_manifest``): hidden folders (staging,
    previous), links and folders whose ``manifest.json`` is not a run's are skipped, the last
    with a warning naming the file, rather than taking the whole report down.
    """
    runs = []
    for run_dir in run_dirs(out_dir):
        manifest, problem = read_manifest(run_dir)
        metrics: Any = {}
        if manifest is not None:
            metrics_path = run_dir / "metrics.json"
            try:
                metrics = (
                    json.loads(metrics_path.read_text(encoding="utf-8"))
                    if metrics_path.exists()
                    else {}
                )
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                problem = f"{metrics_path}: {error}"
            else:
                if not isinstance(metrics, dict):
                    problem = f"{metrics_path}: not a JSON object"
        if problem is not None or manifest is None:
            logger.warning("skipping %s in the report: %s", run_dir, problem)
            continue
        runs.append(Run(run_dir.parent.name, run_dir.name, manifest, metrics))
    return sorted(runs, key=lambda run: (story_rank(run.experiment), run.config, run.slug))


def href(from_page: str, target: str) -> str:
    """A relative link from one file to another, both given relative to the outputs root."""
    return quote(posixpath.relpath(target, posixpath.dirname(from_page) or "."))


@dataclass(frozen=True)
class MetricNode:
    """A row of the metrics table: a value, a collapsible group of rows, or a collapsible table.

    A table stands for a list of records, such as the top heads with their scores.
    """

    name: str
    value: str = ""
    children: list[MetricNode] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def _records(value: Any) -> list[str] | None:
    """The keys shared by a list of flat records, else None."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, dict) for item in value)
    ):
        return None
    keys = list(value[0])
    if any(
        list(item) != keys or any(isinstance(v, (dict, list)) for v in item.values())
        for item in value
    ):
        return None
    return keys


def metric_tree(metrics: dict[str, Any]) -> list[MetricNode]:
    """The metrics as table rows: nested dicts as groups, lists of records as small tables.

    Arrays are summarised; ``not_applicable`` is shown apart.
    """
    nodes = []
    for key, value in metrics.items():
        if key == "not_applicable":
            continue
        keys = _records(value)
        if isinstance(value, dict):
            nodes.append(MetricNode(str(key), f"{len(value)} entries", metric_tree(value)))
        elif keys is not None:
            rows = [[format_number(item[k]) for k in keys] for item in value[:MAX_RECORD_ROWS]]
            more = f", first {MAX_RECORD_ROWS} shown" if len(value) > MAX_RECORD_ROWS else ""
            nodes.append(MetricNode(str(key), f"{len(value)} rows{more}", columns=keys, rows=rows))
        else:
            nodes.append(MetricNode(str(key), summarise(value)))
    return nodes


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every scalar metric by dotted name, nested dicts flattened.

    Short lists of scalars (shapes, pairs) are kept; longer arrays are left out.
    """
    rows: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "not_applicable" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.update(scalar_metrics(value, f"{name}."))
        elif not isinstance(value, list):
            rows[name] = value
        elif len(value) <= SHORT_SCALAR_LIST and not any(
            isinstance(item, (list, dict)) for item in value
        ):
            rows[name] = summarise(value)
    return rows


# --- views ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewGroup:
    """Views that differ only by layer, shown as a grid of layer numbers, or a single view."""

    title: str
    views: list[dict[str, Any]]  # each with file, title, bytes, and layer for a layer group

    @property
    def per_layer(self) -> bool:
        """Whether this is a group of per-layer views."""
        return "layer" in self.views[0]


def view_groups(views: Sequence[dict[str, Any]]) -> list[ViewGroup]:
    """Per-layer views (``..._layer_NN.html``) gathered into one group each; others one by one.

    Groups keep the position of their first view, so an experiment's order is kept.
    """
    groups: list[ViewGroup] = []
    by_name: dict[str, ViewGroup] = {}
    for view in views:
        stem = posixpath.splitext(posixpath.basename(view["file"]))[0]
        match = _LAYER_VIEW.match(stem)
        if match is None:
            groups.append(ViewGroup(view.get("title") or stem, [dict(view)]))
            continue
        name = match["group"]
        if name not in by_name:
            title = _LAYER_IN_TITLE.sub("", view.get("title") or name).strip() or name
            by_name[name] = ViewGroup(f"{title}, per layer", [])
            groups.append(by_name[name])
        by_name[name].views.append({**view, "layer": int(match["layer"])})
    for group in by_name.values():
        group.views.sort(key=lambda view: view["layer"])
    return groups


# --- compare ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureRow:
    """One figure of a config and that figure from each model, None where a model has none."""

    name: str
    caption: str
    cells: list[dict[str, Any] | None]


def paired_figures(runs: Sequence[Run]) -> list[FigureRow]:
    """Figures of the same name across ``runs``, in the order they first appear."""
    order: list[str] = []
    captions: dict[str, str] = {}
    by_run: list[dict[str, dict[str, Any]]] = []
    for run in runs:
        named = {}
        for figure in run.figures:
            name = run.figure_name(figure)
            named[name] = figure
            if name not in captions:
                order.append(name)
                captions[name] = figure.get("caption") or name
        by_run.append(named)
    return [
        FigureRow(name, captions[name], [named.get(name) for named in by_run]) for name in order
    ]


def compared_metrics(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """Scalar metrics as rows of one formatted value per run (blank where a run lacks it)."""
    per_run = [scalar_metrics(run.metrics) for run in runs]
    names: list[str] = []
    for rows in per_run:
        names.extend(name for name in rows if name not in names)
    return [
        (name, [format_number(rows[name]) if name in rows else "" for rows in per_run])
        for name in names
    ]


# --- pages ------------------------------------------------------------------------------------


def _render(template: str, page: str, **context: Any) -> str:
    def link(target: str) -> str:
        return href(page, target)

    return templating.environment().get_template(template).render(link=link, page=page, **context)


def shared_description(runs: Sequence[Run]) -> str | None:
    """The description every run of a config shares, or None when they differ.

    They differ when, say, a ``--set`` prompt was given for one model; each run's own description
    is shown then.
    """
    descriptions = {run.description for run in runs}
    return descriptions.pop() if len(descriptions) == 1 else None


def _sections(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    sections: dict[str, list[Run]] = {}
    for run in runs:  # already in story order
        sections.setdefault(run.config, []).append(run)
    return list(sections.items())


def _models(runs: Sequence[Run]) -> list[dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda run: run.slug):
        entry = models.setdefault(
            run.slug,
            {
                "slug": run.slug,
                "runs": 0,
                "fallbacks": {},
                "label": run.model.get("label", run.slug),
                "weights_note": run.model.get("weights_note"),
            },
        )
        entry["runs"] += 1
        if run.is_fallback:
            entry["fallbacks"][run.model.get("requested")] = run.model.get("fallback_reason")
    return list(models.values())


def render_index(out_dir: Path, runs: Sequence[Run], compared: Sequence[str]) -> str:
    """``OUT/index.html``: the story's sections, each model's run as a strip of thumbnails."""
    return _render(
        "index.html.j2",
        "index.html",
        out_dir=str(out_dir.resolve()),
        runs=runs,
        sections=_sections(runs),
        models=_models(runs),
        compared=set(compared),
        original=ORIGINAL_ANALYSIS,
        shared_description=shared_description,
        compare_page=compare_page,
        view_groups=lambda run: view_groups(run.manifest.get("views", [])),
    )


def render_run(run: Run, previous: Run | None, following: Run | None, compared: bool) -> str:
    """``OUT/<model>/<config>/index.html``: figures full width, facts, metrics, views, files."""
    return _render(
        "run.html.j2",
        run.page,
        run=run,
        previous=previous,
        following=following,
        compare=compare_page(run.config) if compared else None,
        metrics=metric_tree(run.metrics),
        groups=view_groups(run.manifest.get("views", [])),
        extra_facts=[
            (key, value) for key, value in run.manifest.items() if key not in _SHOWN_MANIFEST_KEYS
        ],
    )


def render_compare(config: str, runs: Sequence[Run]) -> str:
    """``OUT/compare/<config>.html``: each figure of every model side by side, metrics by model."""
    return _render(
        "compare.html.j2",
        compare_page(config),
        config=config,
        runs=runs,
        title=runs[0].manifest.get("title", config),
        rows=paired_figures(runs),
        description=shared_description(runs),
        metrics=compared_metrics(runs),
        groups=[view_groups(run.manifest.get("views", [])) for run in runs],
    )


def compare_page(config: str) -> str:
    """Where the compare page of ``config`` lives, relative to the outputs root."""
    return f"{COMPARE_DIR}/{config}.html"


def write_pages(out_dir: Path) -> Path:
    """Rebuild every page under ``out_dir`` from what is on disk; returns the index's path.

    Compare pages of configs no longer run on two models are removed with the rest of the
    stale ones: they are derived files, rebuilt from the runs each time. The rebuild holds the
    lock on ``out_dir``, so two runs into one folder never write an index missing the other's run.
    """
    with pages_locked(out_dir):
        return _rebuild_pages(out_dir)


def _rebuild_pages(out_dir: Path) -> Path:
    runs = read_runs(out_dir)
    sections = _sections(runs)
    compared = [config for config, config_runs in sections if len(config_runs) > 1]
    for config, config_runs in sections:
        if config in compared:
            write_text_atomic(out_dir / compare_page(config), render_compare(config, config_runs))
    for slug in sorted({run.slug for run in runs}):
        story = [run for run in runs if run.slug == slug]  # one model's runs, in story order
        for number, run in enumerate(story):
            previous = story[number - 1] if number > 0 else None
            following = story[number + 1] if number + 1 < len(story) else None
            write_text_atomic(
                out_dir / run.page, render_run(run, previous, following, run.config in compared)
            )
    keep = {out_dir / compare_page(config) for config in compared}
    for stale in (out_dir / COMPARE_DIR).glob("*.html"):
        if stale not in keep:
            stale.unlink()
    index = out_dir / "index.html"
    write_text_atomic(index, render_index(out_dir, runs, compared))
    return index
