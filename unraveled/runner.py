"""Run a plan: load each model once, check, compute, render, and own every file written.

The plan (``unraveled.models.plan.plan_runs``) says which model each config runs on, every model
resolved and its fallback decided before anything runs. Prompts and answers are checked first,
against each model's tokenizer and context read without its weights
(``check_text_params_before_loading``, ``unraveled.models.shape``): an overlong prompt costs no
conversion. Then every model is loaded once and every config's model-dependent params
are checked against it, so a bad config stops the whole invocation before any file is written.
Then, model by model (and within a model by kind of weights, each loaded once, each model freed
once its configs are done), the runner seeds everything, calls the experiment's ``compute`` and
``render``, writes figures, views, ``metrics.json`` and ``manifest.json`` into a staging folder,
swaps it in as ``OUT/<model>/<config>/``, and rebuilds the pages (``unraveled.render.pages``).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from transformer_lens import HookedTransformer

from unraveled import outputs
from unraveled.config import LoadedConfig
from unraveled.errors import ConfigError, ParamError, UnraveledError
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Figure,
    Saved,
    Table,
    View,
    WeightsKind,
    check_params,
    check_text_params,
)
from unraveled.manifest import SCHEMA_VERSION, RunManifest
from unraveled.memory import PeakMemory, return_freed_memory
from unraveled.models.loading import LoadedModel, load_planned
from unraveled.models.plan import PlannedModel, RunPlan
from unraveled.models.shape import ModelShape, model_shape
from unraveled.phases import handing_back
from unraveled.render import export, script_page, views
from unraveled.render.pages import write_pages

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FIGURE_DPI = 110
_VERSIONED_PACKAGES = (
    "torch",
    "transformer-lens",
    "transformers",
    "circuitsvis",
    "numpy",
    "scikit-learn",
    "umap-learn",
)


@dataclass
class ModelPool:
    """Holds one kind of weights per planned model, and frees a model once asked.

    A model is the bulk of a run's memory. Asking for a model in the other kind of weights frees
    the kind held first (runs are grouped so each kind loads once; a later load comes from the
    converted-weights cache), and the runner releases a model once its configs are done.
    """

    device: str = "cpu"
    _loaded: dict[PlannedModel, tuple[WeightsKind, LoadedModel]] = field(default_factory=dict)

    def get(self, planned: PlannedModel, weights: WeightsKind) -> LoadedModel:
        """The model ``planned`` in ``weights``, loaded unless it is held in that kind already."""
        if self.held_kind(planned) == weights:
            return self._loaded[planned][1]
        self.release(planned)
        with handing_back(return_freed_memory):  # between a conversion's steps
            loaded = load_planned(planned, weights, self.device)
        logger.info(
            "loaded %s (%s weights) from %s in %.1f s",
            loaded.label(),
            weights,
            loaded.loaded_from,
            loaded.load_seconds,
        )
        return_freed_memory()  # the conversion's temporary copies
        self._loaded[planned] = (weights, loaded)
        return loaded

    def held_kind(self, planned: PlannedModel) -> WeightsKind | None:
        """The kind of weights held for ``planned``, if any."""
        held = self._loaded.get(planned)
        return held[0] if held is not None else None

    def release(self, planned: PlannedModel | None = None) -> None:
        """Free model ``planned`` (every model when None) and hand the memory back to the system."""
        if planned is None:
            self._loaded.clear()
        elif self._loaded.pop(planned, None) is None:
            return
        return_freed_memory()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git_commit() -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
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
    """Put the model actually used into the figure's title: no figure can be mistaken for GPT-2."""
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
        # A bundled model's weights are not its full-precision checkpoint's: say what they are.
        "weights_note": loaded.planned.source.weights_note,
        "load_seconds": loaded.load_seconds,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
    }


def check_config(config: LoadedConfig, loaded: LoadedModel) -> None:
    """Check ``config``'s model-dependent params against the loaded model.

    Raises:
        ConfigError: Naming the config file, the param and what the model can take (exit 2).
    """
    try:
        check_params(config.experiment, config.params, loaded.model)
    except ParamError as error:
        raise ConfigError(
            str(config.path),
            config.field_label(f"params.{error.field}"),
            f"{error.problem} ({loaded.label()})",
        ) from None


def check_text_params_before_loading(plan: RunPlan) -> None:
    """Check the prompts and all else each config's experiment checks before its model loads.

    Prompts (and one-token answers) are checked against the tokenizer and context of the model
    each config will run on, read without the weights, so an overlong prompt costs no conversion
    and writes nothing; then the experiment's own ``check_before_loading`` (a corpus's files).

    ``run_configs`` checks prompts again on each loaded model (that check alone covers a model
    whose tokenizer can't be had without loading it: a hub model in no cache, the hub reachable).

    Raises:
        ConfigError: Naming the config file, the param (and whether ``--set`` gave it) and what
            the model takes: the token count and the limit, or the answer's tokens.
    """
    # What needs no tokenizer first (a corpus's files): reading a tokenizer can take half a minute.
    for config in plan.configs:
        _check_before_loading(config, None, None)
    shapes: dict[PlannedModel, ModelShape | None] = {}
    for config in plan.configs:
        for planned in plan.models_of(config):
            if planned not in shapes:
                shapes[planned] = model_shape(planned)
            shape = shapes[planned]
            if shape is not None:
                try:
                    check_text_params(
                        config.experiment, config.params, shape.tokenizer, shape.n_ctx
                    )
                except ParamError as error:
                    raise ConfigError(
                        str(config.path),
                        config.field_label(f"params.{error.field}"),
                        f"{error.problem} ({shape.label})",
                    ) from None
            if shape is not None:
                _check_before_loading(config, shape.tokenizer, shape.n_ctx)


def _check_before_loading(
    config: LoadedConfig, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """The experiment's own ``check_before_loading``, its ParamError named by the config file."""
    if config.experiment.check_before_loading is not None:
        try:
            config.experiment.check_before_loading(config.params, tokenizer, n_ctx)
        except ParamError as error:
            raise ConfigError(
                str(config.path), config.field_label(f"params.{error.field}"), error.problem
            ) from None


def check_device(device: str) -> None:
    """Refuse a device torch doesn't know or this machine doesn't have, before loading anything.

    Raises:
        ConfigError: Naming ``--device`` and the devices that would work (exit 2).
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            "--device", None, f"{device!r} is not a torch device; expected cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                "--device",
                None,
                f"{device!r}: no CUDA GPU is available on this machine; use --device cpu",
            )
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(
                "--device",
                None,
                f"{device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}",
            )
        return
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                "--device",
                None,
                f"{device!r}: MPS is not available on this machine; use --device cpu",
            )
        return
    raise ConfigError(
        "--device", None, f"{device!r}: unsupported device type; expected cpu, cuda, cuda:N or mps"
    )


@dataclass(frozen=True)
class RunModel:
    """The model a run is published under: its label, folder, identity and manifest record.

    Built from a ``LoadedModel`` (``RunModel.of``) for the CLI and ``unraveled.load_model``, or
    from a model the user loaded (``unraveled.api``).
    """

    label: str
    slug: str
    identity: str
    record: dict[str, Any]

    @classmethod
    def of(cls, loaded: LoadedModel) -> RunModel:
        """How a model loaded through the plan is published."""
        return cls(loaded.label(), loaded.slug, loaded.planned.identity, _model_record(loaded))


@dataclass(frozen=True)
class ComputedRun:
    """A config's result, computed and not yet written, with what the manifest records of it."""

    config: LoadedConfig
    result: Any
    compute_seconds: float
    peak_rss_mb: float


def compute_run(config: LoadedConfig, model: HookedTransformer | TransformerBridge) -> ComputedRun:
    """Seed everything and compute ``config``'s result on ``model``; nothing is written."""
    with PeakMemory() as peak:
        started = time.perf_counter()
        _seed_everything(config.run.seed)
        with handing_back(return_freed_memory):  # between the compute's phases
            result = config.experiment.compute(model, config.params, config.run.seed)
        computed = time.perf_counter()
    return_freed_memory()  # the activations compute dropped, before drawing adds its own
    return ComputedRun(config, result, computed - started, peak.mb)


def _write_artifacts(
    config: LoadedConfig,
    result: Any,
    model_label: str,
    staging: Path,
    href_to_index: str,
    formats: Sequence[str],
    out_dir: Path,
    href_to_out: str,
) -> dict[str, list[dict[str, Any]]]:
    """Save every artifact into ``staging``; returns the manifest's records of each kind.

    The views' shared script goes into ``out_dir``'s assets (``href_to_out`` leads there from the
    views).
    """
    figure_records, view_records, table_records, saved_records = [], [], [], []
    for artifact in config.experiment.render(result):
        if isinstance(artifact, Figure):
            _stamp_model(artifact, model_label)
            figure_records.append(
                export.save_figure(
                    artifact.figure, staging, artifact.name, artifact.caption, formats, FIGURE_DPI
                )
            )
            plt.close(artifact.figure)
        elif isinstance(artifact, View):
            path = staging / "views" / f"{artifact.name}.html"
            path.parent.mkdir(exist_ok=True)
            facts = {"model": model_label, **artifact.facts}
            bundle = views.write_shared_bundle(out_dir / outputs.ASSETS_DIR)
            bundle_href = f"{href_to_out}/{outputs.ASSETS_DIR}/{bundle.name}"
            path.write_text(
                views.page(
                    artifact.title,
                    facts,
                    artifact.elements,
                    href_to_index,
                    run_href="../index.html",
                    bundle_href=bundle_href,
                ),
                encoding="utf-8",
            )
            view_records.append(
                {
                    "file": f"views/{path.name}",
                    "title": artifact.title,
                    "bytes": path.stat().st_size,
                }
            )
        elif isinstance(artifact, script_page.ScriptPage):
            view_records.append(
                script_page.save(
                    artifact,
                    staging,
                    out_dir / outputs.ASSETS_DIR,
                    f"{href_to_out}/{outputs.ASSETS_DIR}",
                    href_to_index,
                    model_label,
                )
            )
        elif isinstance(artifact, Table):
            path = staging / f"{artifact.name}.npz"
            np.savez_compressed(path, **artifact.columns)
            table_records.append(
                {
                    "file": path.name,
                    "description": artifact.description,
                    "bytes": path.stat().st_size,
                }
            )
        elif isinstance(artifact, Saved):
            path = staging / artifact.name
            path.mkdir()
            artifact.save(path)
            saved_records.append(
                {
                    "folder": path.name,
                    "description": artifact.description,
                    "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                }
            )
    records = {"figures": figure_records, "views": view_records, "tables": table_records}
    # Only runs that save a folder record them: other manifests stay as they were.
    return records | ({"saved": saved_records} if saved_records else {})


def _unwritable(error: OSError, what: str) -> UnraveledError:
    return UnraveledError(
        f"{what}: {error.strerror or error} ({error.filename or 'the output folder'}). "
        "Free space or fix the folder's permissions, then run again"
    )


def run_one(
    config: LoadedConfig,
    loaded: LoadedModel,
    out_dir: Path,
    formats: Sequence[str] = export.DEFAULT_FORMATS,
    folder: str | None = None,
    identity: str | None = None,
) -> Path:
    """Compute one config on a loaded model, then ``publish_run`` it; returns the run's folder.

    The CLI's path (``run_configs``), which has the model loaded: ``compute_run`` runs it, and
    ``RunModel.of(loaded)`` names it in the outputs. The rest is ``publish_run``'s.

    Args:
        config: The config to run.
        loaded: The model to run it on, loaded.
        out_dir: ``--out``, as for ``publish_run``.
        formats: ``--format``, as for ``publish_run``.
        folder: The model's folder under ``out_dir``, as for ``publish_run``.
        identity: The model's ``model_identity`` (default ``loaded.planned.identity``).

    Raises:
        ConfigError: ``publish_run``'s, for a run folder in the way (exit 2).
        UnraveledError: ``publish_run``'s, for outputs that can't be written.
    """
    computed = compute_run(config, loaded.model)
    return publish_run(computed, RunModel.of(loaded), out_dir, formats, folder, identity)


def publish_run(
    computed: ComputedRun,
    model: RunModel,
    out_dir: Path,
    formats: Sequence[str] = export.DEFAULT_FORMATS,
    folder: str | None = None,
    identity: str | None = None,
) -> Path:
    """Render a computed run and publish its outputs as ``OUT/<model>/<config>``; returns it.

    Needs no model: the result was computed before (``run_one`` on the CLI's path, ``save_run``
    for a run computed from Python), and ``model`` only names it.

    Args:
        computed: The config's result (``compute_run``).
        model: The model it was computed on, as the outputs name it.
        out_dir: ``--out``: the outputs' folder.
        formats: ``--format``: save each figure in each of these (``png``, ``svg``, ``pdf``).
        folder: The model's folder under ``out_dir`` (``outputs.model_folder``; default its slug).
        identity: The model's ``model_identity`` (default ``model.identity``).

    Raises:
        ConfigError: The run's folder is something else than a run (exit 2); nothing is replaced.
        UnraveledError: The outputs can't be written (disk full, permissions): nothing of this
            run is published and earlier outputs are untouched.
    """
    config, result = computed.config, computed.result
    target = outputs.run_target(out_dir, folder or model.slug, config.name)
    # Relative to where the view pages will live once published, not to the staging folder.
    href_to_index = Path(os.path.relpath(out_dir / "index.html", target / "views")).as_posix()
    staging: Path | None = None
    try:
        with PeakMemory() as peak:
            started = time.perf_counter()
            staging = outputs.make_staging_dir(target)
            records = _write_artifacts(
                config,
                result,
                model.label,
                staging,
                href_to_index,
                formats,
                out_dir,
                Path(os.path.relpath(out_dir, target / "views")).as_posix(),
            )
            rendered = time.perf_counter()
        outputs.write_json(staging / "metrics.json", result.metrics())
        manifest = RunManifest.model_validate(
            {
                "schema_version": SCHEMA_VERSION,
                "config": config.name,
                "config_file": str(config.path),
                "title": config.experiment.title,
                "description": config.description,  # its {params.NAME} quoting what ran
                # What --set changed from the config file, and to what: the pages mark such runs.
                "overrides": config.overrides(),
                "resolved_config": config.resolved(),
                "seed": config.run.seed,
                "model": model.record,
                "model_identity": identity or model.identity,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "timings_seconds": {
                    "compute": computed.compute_seconds,
                    "render": rendered - started,
                    "total": computed.compute_seconds + rendered - started,
                },
                # Peak resident memory of the process while this config computed and rendered,
                # the loaded model included (sampled: see unraveled.memory).
                "peak_rss_mb": round(max(computed.peak_rss_mb, peak.mb), 1),
                **records,
                "versions": _package_versions(),
                "git_commit": _git_commit(),
            },
        )
        outputs.write_manifest(staging, manifest)
        outputs.publish(staging, target, out_dir)
    except OSError as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise _unwritable(
            error,
            f"can't write {config.name}'s outputs into {target.parent}; nothing of this run was "
            "published, earlier outputs are untouched",
        ) from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_run(
    computed: ComputedRun,
    model: RunModel,
    out_dir: Path,
    formats: Sequence[str] = export.DEFAULT_FORMATS,
) -> Path:
    """Publish one computed run into ``out_dir`` as ``run_configs`` does, then rebuild the pages.

    The output folder is checked and repaired first, and the model gets the folder
    ``run_configs`` would give it (``outputs.model_folder``). Returns the run's folder.

    Raises:
        ConfigError: Something else than a run or the report's pages is in the way (exit 2).
        UnraveledError: The outputs can't be written; nothing of this run is published.
    """
    _prepare_output_folder(out_dir, [outputs.run_target(out_dir, model.slug, computed.config.name)])
    folder = outputs.model_folder(out_dir, model.slug, model.identity, {})
    target = outputs.run_target(out_dir, folder, computed.config.name)
    outputs.check_output_folder(out_dir, [target])
    publish_run(computed, model, out_dir, formats, folder)
    try:
        write_pages(out_dir)
    except OSError as error:
        raise _unwritable(
            error, f"{target} is published, but the pages could not be rebuilt"
        ) from None
    return target


def _prepare_output_folder(out_dir: Path, targets: Sequence[Path]) -> None:
    """Check the output folder and repair what interrupted runs left in it.

    Checks ``out_dir``'s index, compare folder and the run folders ``targets``, undoes what
    interrupted runs left (swaps, temporary files), and rebuilds the pages where a run was left
    without its page.

    Raises:
        ConfigError: Something else than a run or the report's pages is in their place (exit 2).
    """
    outputs.check_output_folder(out_dir, targets)
    try:
        if outputs.recover_output_folder(out_dir):
            logger.info(
                "rebuilding the pages of %s, which an interrupted run left out of date", out_dir
            )
            write_pages(out_dir)
    except OSError as error:
        raise _unwritable(
            error, f"can't put {out_dir} back in order after an interrupted run"
        ) from None


def run_configs(
    plan: RunPlan,
    out_dir: Path,
    device: str = "cpu",
    formats: Sequence[str] = export.DEFAULT_FORMATS,
) -> list[Path]:
    """Check every config against its model, then run them, rebuilding the pages after each run.

    Args:
        plan: What runs on which model (``plan_runs``; its configs validated, so a bad one
            writes nothing), one model after the other.
        out_dir: Root of the outputs.
        device: Torch device.
        formats: ``--format``: save each figure in each of these (``png``, ``svg``, ``pdf``).

    Raises:
        ConfigError: A param a model can't take, before any file is written.
    """
    pool = ModelPool(device=device)
    # Where each run goes unless its model shares its name with another: checked before loading.
    _prepare_output_folder(
        out_dir,
        [
            outputs.run_target(out_dir, planned.source.slug, config.name)
            for config, planned in plan.runs
        ],
    )
    # Each model once, checking every config that uses it, before anything is written. The models
    # stay loaded until their configs have run (one model in the usual invocation).
    folders: dict[PlannedModel, tuple[str, str]] = {}  # its folder under out_dir, its identity
    taken: dict[str, str] = {}
    for planned in plan.models:
        users = plan.configs_on(planned)
        first = pool.get(planned, users[0].experiment.weights)
        for config in users:
            check_config(config, first)
        folders[planned] = (
            outputs.model_folder(out_dir, first.slug, planned.identity, taken),
            planned.identity,
        )
        del first  # the pool holds it; a name here would keep it alive when the pool frees it
    outputs.check_output_folder(
        out_dir,
        [
            outputs.run_target(out_dir, folders[planned][0], config.name)
            for config, planned in plan.runs
        ],
    )
    written: list[Path] = []
    number = 0
    for planned in plan.models:
        # The kind of weights already held first, then the other: each kind loads once.
        held = pool.held_kind(planned)
        configs = sorted(
            plan.configs_on(planned), key=lambda config: config.experiment.weights != held
        )
        for config in configs:
            number += 1
            loaded = pool.get(planned, config.experiment.weights)
            logger.info(
                "[%d/%d] %s: %s on %s",
                number,
                len(plan.runs),
                config.name,
                config.experiment.title,
                loaded.label(),
            )
            started = time.perf_counter()
            target = run_one(config, loaded, out_dir, formats, *folders[planned])
            return_freed_memory()  # the config's activations and figures
            written.append(target)
            try:
                write_pages(out_dir)
            except OSError as error:
                raise _unwritable(
                    error,
                    f"{target} is published, but the pages could not be rebuilt (the next run "
                    "rebuilds them)",
                ) from None
            logger.info(
                "[%d/%d] %s done in %.1f s -> %s",
                number,
                len(plan.runs),
                config.name,
                time.perf_counter() - started,
                target,
            )
            # The next config may want the other kind of weights: the pool frees this model then,
            # which it can only do if nothing else still refers to it.
            del loaded
        pool.release(planned)  # done with this model: free it before the next one runs
    pool.release()
    return written
