"""Run configs: load each model once, compute, render, and own every file written.

For each config the runner seeds everything, calls the experiment's ``compute`` and ``render``,
writes figures, views, ``metrics.json`` and ``manifest.json`` into a staging folder, swaps it
in as ``OUT/<model>/<config>/``, and rebuilds the pages (``unraveled.render.pages``).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import os
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from unraveled import outputs  # noqa: E402
from unraveled.config import LoadedConfig  # noqa: E402
from unraveled.errors import ModelUnavailableError  # noqa: E402
from unraveled.experiment import Figure, View, WeightsKind  # noqa: E402
from unraveled.models import FALLBACK_MODEL, LoadedModel, load_model  # noqa: E402
from unraveled.render import export, views  # noqa: E402
from unraveled.render.pages import write_pages  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt2"
FIGURE_DPI = 110
_VERSIONED_PACKAGES = ("torch", "transformer-lens", "transformers", "circuitsvis", "numpy", "scikit-learn", "umap-learn")


@dataclass
class ModelPool:
    """Loads each (model, weights) pair once per invocation, and remembers fallbacks.

    Once a model has fallen back, later configs asking for it fall back straight away instead
    of probing the hub again.
    """

    device: str = "cpu"
    allow_fallback: bool = True
    _loaded: dict[tuple[str, WeightsKind], LoadedModel] = field(default_factory=dict)
    _unavailable: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, weights: WeightsKind, source_label: str) -> LoadedModel:
        key = (name, weights)
        if key not in self._loaded:
            self._loaded[key] = self._load(name, weights, source_label)
        return self._loaded[key]

    def release(self, name: str) -> None:
        """Forget every loaded copy of ``name``, so its memory can go before the next model loads."""
        self._loaded = {key: loaded for key, loaded in self._loaded.items() if key[0] != name}

    def _load(self, name: str, weights: WeightsKind, source_label: str) -> LoadedModel:
        fallback = FALLBACK_MODEL if self.allow_fallback else None
        if name in self._unavailable and fallback is not None:
            loaded = load_model(fallback, weights, self.device, fallback=None)
            return replace(loaded, requested=name, fallback_reason=self._unavailable[name])
        try:
            loaded = load_model(name, weights, self.device, fallback=fallback, source_label=source_label)
        except ModelUnavailableError as error:
            if fallback is not None:
                raise
            raise ModelUnavailableError(
                f"{error}\n(falling back to {FALLBACK_MODEL} is off: --no-fallback or UNRAVELED_NO_FALLBACK=1)"
            ) from None
        if loaded.fallback_reason is not None:
            self._unavailable[name] = loaded.fallback_reason
        logger.info("loaded %s (%s weights) from %s in %.1f s", loaded.label(), weights, loaded.loaded_from, loaded.load_seconds)
        return loaded


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git_commit() -> str | None:
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _stamp_model(figure: Figure, model_label: str) -> None:
    """Put the model actually used into the figure's title, so no figure can be mistaken for GPT-2."""
    title = figure.figure.get_suptitle()
    figure.figure.suptitle(f"{title}\nmodel: {model_label}" if title else f"model: {model_label}")


def _model_record(loaded: LoadedModel) -> dict[str, Any]:
    cfg = loaded.model.cfg
    return {
        "requested": loaded.requested,
        "used": loaded.name,
        "label": loaded.label(),
        "is_fallback": loaded.is_fallback,
        "fallback_reason": loaded.fallback_reason,
        "loaded_from": loaded.loaded_from,
        "revision": loaded.revision,
        "from_weight_cache": loaded.from_weight_cache,
        "weights": loaded.weights,
        "load_seconds": loaded.load_seconds,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
    }


def run_one(config: LoadedConfig, loaded: LoadedModel, out_dir: Path, formats: Sequence[str] = export.DEFAULT_FORMATS) -> Path:
    """Run one config on one loaded model and publish its outputs; returns the run's folder."""
    target = out_dir / loaded.slug / config.name
    started = time.perf_counter()
    _seed_everything(config.run.seed)
    result = config.experiment.compute(loaded.model, config.params, config.run.seed)
    computed = time.perf_counter()
    staging = outputs.make_staging_dir(target)
    try:
        figure_records, view_records = [], []
        for artifact in config.experiment.render(result):
            if isinstance(artifact, Figure):
                _stamp_model(artifact, loaded.label())
                figure_records.append(export.save_figure(artifact.figure, staging, artifact.name, artifact.caption, formats, FIGURE_DPI))
                plt.close(artifact.figure)
            elif isinstance(artifact, View):
                path = staging / "views" / f"{artifact.name}.html"
                path.parent.mkdir(exist_ok=True)
                facts = {"model": loaded.label(), **artifact.facts}
                # Relative to where the page will live once published, not to the staging folder.
                index_href = Path(os.path.relpath(out_dir / "index.html", target / "views")).as_posix()
                path.write_text(views.page(artifact.title, facts, artifact.elements, index_href, run_href="../index.html"), encoding="utf-8")
                view_records.append({"file": f"views/{path.name}", "title": artifact.title, "bytes": path.stat().st_size})
        rendered = time.perf_counter()
        outputs.write_json(staging / "metrics.json", result.metrics())
        outputs.write_json(
            staging / "manifest.json",
            {
                "config": config.name,
                "config_file": str(config.path),
                "title": config.experiment.title,
                "description": config.run.description,
                "resolved_config": config.resolved(),
                "seed": config.run.seed,
                "model": _model_record(loaded),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "timings_seconds": {
                    "compute": computed - started,
                    "render": rendered - computed,
                    "total": rendered - started,
                },
                "figures": figure_records,
                "views": view_records,
                "versions": _package_versions(),
                "git_commit": _git_commit(),
            },
        )
        outputs.publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def run_configs(
    configs: Sequence[LoadedConfig],
    out_dir: Path,
    models: Sequence[str] = (),
    device: str = "cpu",
    allow_fallback: bool = True,
    formats: Sequence[str] = export.DEFAULT_FORMATS,
) -> list[Path]:
    """Run every config on every model, loading each model once, rebuilding the pages after each run.

    Args:
        configs: Validated configs (validate them all first, so a bad one writes nothing).
        out_dir: Root of the outputs.
        models: ``--model``, repeatable: run every config on each of these models, one model
            after the other; empty: each config on the model it names.
        device: Torch device.
        allow_fallback: Fall back to the bundled model when the requested one can't be had.
        formats: ``--format``: save each figure in each of these (``png``, ``svg``, ``pdf``).
    """
    pool = ModelPool(device=device, allow_fallback=allow_fallback)
    written = []
    # Model by model: each config on the first model, then on the next.
    plan = [(model, config) for model in models for config in configs] if models else [(None, config) for config in configs]
    for number, (model_override, config) in enumerate(plan, start=1):
        if number > 1 and plan[number - 2][0] not in (None, model_override):
            pool.release(plan[number - 2][0])  # done with the previous model: free it first
        model_name = model_override or config.run.model or DEFAULT_MODEL
        source_label = "--model" if model_override else str(config.path)
        logger.info("[%d/%d] %s: %s on %s", number, len(plan), config.name, config.experiment.title, model_name)
        loaded = pool.get(model_name, config.experiment.weights, source_label)
        started = time.perf_counter()
        target = run_one(config, loaded, out_dir, formats)
        if target in written:  # e.g. two models that both fell back to the bundled one
            logger.warning("%s replaced an earlier run of this invocation: %s ran on %s again", target, config.name, loaded.label())
        written.append(target)
        write_pages(out_dir)
        logger.info("[%d/%d] %s done in %.1f s -> %s", number, len(plan), config.name, time.perf_counter() - started, written[-1])
    return written
