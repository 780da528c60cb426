"""The Python API: every experiment, one call, on a model you already hold.

    import unraveled as ur

    model = ur.load_model("gpt2")  # or any HookedTransformer of your own
    result = ur.run("logit_lens", model, prompt="The capital of France is")
    result.metrics()  # what metrics.json holds
    result.save("outputs")  # OUT/<model>/logit_lens/, exactly as `unraveled run` writes it
    ur.report("outputs")  # the index and compare pages over every run there

``run`` is the command line's route without the process: the built-in config named ``name``
gives the params, the keyword arguments override them (as ``--set`` does), the experiment's own
schema validates them, and every check the CLI makes runs before anything is computed. A bad
value raises ``unraveled.errors.ParamError`` (a ``ValueError``) naming the param. The model is
held by the caller for any number of calls: nothing is reloaded between them, except the other
kind of weights when an experiment needs it (``_model_for``). See docs/python-api.md.
"""

from __future__ import annotations

import difflib
import math
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from unraveled.config import SEED_LIMIT, LoadedConfig, load_config, shorten
from unraveled.errors import ConfigError, ParamError
from unraveled.experiment import RESOLVE_ANNOTATIONS, Experiment, WeightsKind, check_params

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    from unraveled.experiment import Figure, Table, View
    from unraveled.models.loading import LoadedModel
    from unraveled.models.plan import PlannedModel
    from unraveled.runner import ComputedRun, RunModel

__all__ = ["RunResult", "load_model", "provenance", "report", "run"]

# A row of processed ("centred") W_E has mean zero up to float rounding; a checkpoint's own rows
# have means of the order of their spread over sqrt(d_model). Relative to the largest entry.
_CENTRED_TOLERANCE = 1e-5
_FOLDED_NORMS = ("LNPre", "RMSPre")  # TransformerLens's names for a norm whose weights it folded
_PLAIN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
# Experiments on processed weights whose numbers a model with the checkpoint's own weights gives
# too, up to float rounding (tests/test_api.py checks each): what they read (logits, attention
# patterns, patched logit differences) is unchanged by folding LayerNorm and centring weights.
# They run on a raw model as it is; any other processed-weights experiment gets processed weights
# or refuses (logit_attribution's numbers change: folding moves the value biases into the output
# bias, centring moves the unembedding's; ioi_circuit and corpus_atlas are not checked).
SAME_ON_RAW_WEIGHTS = frozenset(
    {"logit_lens", "head_taxonomy", "activation_patching", "attribution_patching"}
)


@dataclass(frozen=True)
class _Provenance:
    """Where a model ``load_model`` returned came from: ``LoadedModel`` without the model.

    Kept apart from the model so the registry's weak keys are its only references to it.
    """

    planned: PlannedModel
    loaded_from: str
    weights: WeightsKind
    load_seconds: float
    from_weight_cache: bool
    revision: str | None
    device: str

    def loaded(self, model: HookedTransformer) -> LoadedModel:
        """The ``LoadedModel`` ``model`` was, for the runner's records."""
        from unraveled.models.loading import LoadedModel

        return LoadedModel(
            model=model,
            planned=self.planned,
            loaded_from=self.loaded_from,
            weights=self.weights,
            load_seconds=self.load_seconds,
            from_weight_cache=self.from_weight_cache,
            revision=self.revision,
        )


# Models load_model returned, and where each came from; a model the user drops is forgotten.
_REGISTRY: weakref.WeakKeyDictionary[HookedTransformer, _Provenance] = weakref.WeakKeyDictionary()


def _runner() -> Any:
    """``unraveled.runner``, imported without taking pyplot's backend away from a notebook.

    The runner and the figure helpers select matplotlib's Agg backend on import (the CLI draws
    off screen); in Jupyter that would stop the user's own ``plt`` figures from showing inline.
    """
    import matplotlib

    before = dict.__getitem__(matplotlib.rcParams, "backend")  # as set, not resolved
    import unraveled.render.figures
    import unraveled.runner

    if dict.__getitem__(matplotlib.rcParams, "backend") != before:
        if isinstance(before, str):
            matplotlib.use(before)
        else:  # not chosen yet: pyplot chooses on import, as it would have (inline in Jupyter)
            dict.__setitem__(matplotlib.rcParams, "backend", before)
    return unraveled.runner


def load_model(
    name: str, weights: WeightsKind = "processed", device: str = "cpu"
) -> HookedTransformer:
    """Load a model as the command line does and remember where it came from.

    The name is resolved, loaded and converted as ``unraveled run --model NAME`` does, through
    the converted-weights cache (docs/models.md). A model named here never falls back to the
    bundled one: if it can't be had, the error says why.

    Args:
        name: A hub name (``gpt2``, ``gpt2-medium``), a checkpoint folder, or ``smollm2-135m``.
        weights: ``processed`` (``HookedTransformer.from_pretrained``'s defaults) or ``raw``
            (the checkpoint's own values, ``from_pretrained_no_processing``).
        device: A torch device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns:
        The ``HookedTransformer``, in eval mode, without weight gradients; ``provenance(model)``
        says where it came from.

    Raises:
        ParamError: ``weights`` is neither ``processed`` nor ``raw``.
        ConfigError: ``name`` is not a model name, or ``device`` is not one this machine has.
        BadCheckpointError: The folder named is not a checkpoint.
        ModelUnavailableError: The model can't be had (not cached and the hub unreachable).
    """
    if weights not in ("processed", "raw"):
        raise ParamError("weights", f"expected 'processed' or 'raw', got {weights!r}", prefix="")
    from unraveled.models import loading
    from unraveled.models.plan import plan_model

    runner = _runner()
    runner.check_device(device)
    loaded = loading.load_planned(plan_model(name, "load_model", chosen=True), weights, device)
    _remember(loaded, device)
    return loaded.model


def _remember(loaded: LoadedModel, device: str) -> None:
    _REGISTRY[loaded.model] = _Provenance(
        loaded.planned,
        loaded.loaded_from,
        loaded.weights,
        loaded.load_seconds,
        loaded.from_weight_cache,
        loaded.revision,
        device,
    )


def provenance(model: HookedTransformer | TransformerBridge) -> dict[str, Any]:
    """What a run's manifest says about ``model``: its name, source, weights and shape.

    For a model from ``load_model``: the name asked for, where its weights were read, which
    revision, raw or processed, the load time. For any other ``HookedTransformer``: its
    ``cfg.model_name`` and shape, ``loaded_from`` saying the user loaded it, and the kind of
    weights read off the model itself (LayerNorm folded or ``W_E`` centred: processed).
    """
    return _run_model(model).record


def _described_weights(model: HookedTransformer | TransformerBridge) -> WeightsKind:
    """Whether a model the user loaded holds processed weights, read off the weights themselves.

    Processed: its norms were folded into the next weights (``LNPre``/``RMSPre``), or its
    embedding rows are centred (``center_writing_weights``). Either changes what the raw-weights
    experiments report.
    """
    from unraveled.compat.bridge import is_bridge

    if is_bridge(model):  # set by enable_compatibility_mode's processing (compat.bridge)
        return "processed" if getattr(model, "_weights_processed", False) else "raw"
    if model.cfg.normalization_type in _FOLDED_NORMS:
        return "processed"
    embedding = model.W_E.detach()
    scale = float(embedding.abs().max())
    row_means = embedding.float().mean(dim=-1).abs().max()
    if scale > 0 and float(row_means) <= _CENTRED_TOLERANCE * scale:
        return "processed"
    return "raw"


def _run_model(model: HookedTransformer | TransformerBridge, note: str | None = None) -> RunModel:
    """How ``model``'s runs are published: from its provenance, or described from its config."""
    runner = _runner()
    known = _REGISTRY.get(model)
    if known is not None:
        described = runner.RunModel.of(known.loaded(model))
    else:
        cfg = model.cfg
        name = cfg.model_name or "model"
        weights = _described_weights(model)
        shape = f"{cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}"
        described = runner.RunModel(
            label=name,
            slug=_PLAIN_NAME.sub("-", name).lstrip(".-") or "model",
            identity=f"{name} loaded by the user ({weights} weights; {shape})",
            record={
                "requested": None,
                "used": name,
                "label": name,
                "is_fallback": False,
                "fallback_reason": None,
                "loaded_from": f"loaded by the user (a {type(model).__name__} passed to "
                "unraveled.run)",
                "revision": None,
                "from_weight_cache": None,
                "weights": weights,
                "weights_note": None,
                "load_seconds": None,
                "architecture": cfg.original_architecture,
                "n_layers": cfg.n_layers,
                "n_heads": cfg.n_heads,
                "d_model": cfg.d_model,
                "d_vocab": cfg.d_vocab,
            },
        )
    if note is not None:
        described = runner.RunModel(
            described.label,
            described.slug,
            described.identity,
            {**described.record, "weights_note": note},
        )
    return described


def _coerce(value: Any) -> Any:
    """Numpy and torch scalars as the Python numbers the strict schema takes.

    An integer-valued numpy scalar or 0-dim integer tensor (``scores.argmax()``) becomes an
    ``int``, a float one a ``float``, inside lists and mappings too. A float never becomes an
    int: ``head=3.5`` (or ``numpy.float64(3.0)``) is still refused where an int is expected.
    """
    if isinstance(value, Mapping):
        return {key: _coerce(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_coerce(item) for item in value]
    if isinstance(value, tuple):
        items = [_coerce(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # namedtuple
    module = type(value).__module__
    if module == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy's bool, int and float scalars as Python's
    if module.startswith("torch") and getattr(value, "ndim", None) == 0:
        if value.dtype.is_complex:
            return value
        return value.item()  # int for integer dtypes, float for float ones, bool for bool
    return value


def _merged(config_params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The config's params with ``overrides`` on top; a mapping merges into a mapping (``ioi``)."""
    merged = dict(config_params)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flat_keys(values: Mapping[str, Any], prefix: str) -> list[str]:
    """``params.ioi.n_pairs`` for each leaf of ``values``, as ``--set`` would name it."""
    keys = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            keys.extend(_flat_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _param_error(error: ValidationError, schema: type[Any]) -> ParamError:
    """The schema's first complaint as a ParamError naming the field; the others listed below."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            valid = list(schema.model_fields)
            close = difflib.get_close_matches(str(item["loc"][-1]), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problem = f"unknown param{hint} (params: {', '.join(valid)})"
        elif item["type"] == "missing":
            problem = "required, but missing"
        else:
            problem = f"{item['msg']}, got {shorten(item['input'])}"
        problems.append((field, problem))
    (field, problem), rest = problems[0], problems[1:]
    return ParamError(field, problem + "".join(f"\n  params.{f}: {p}" for f, p in rest))


def _config(name: str, seed: Any, params: Mapping[str, Any]) -> LoadedConfig:
    """The built-in config ``name`` with ``params`` and ``seed`` given, validated.

    Raises:
        ValueError: ``name`` is not an experiment.
        ParamError: A param or the seed the schema refuses, naming it.
    """
    from unraveled.config import ConfigSources

    sources = ConfigSources.locate()
    if name not in sources.files():
        raise ValueError(sources.unknown_name_problem(name))
    config = load_config(name)
    seed = _coerce(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ParamError("seed", f"expected an int, 0 <= seed < 2**32, got {seed!r}", prefix="")
    given = _coerce(dict(params))
    raw = _merged(config.run.params, given)
    try:
        validated = config.experiment.params.model_validate(raw)
    except ValidationError as error:
        raise _param_error(error, config.experiment.params) from None
    set_keys = set(_flat_keys(given, "params."))
    if seed != config.run.seed:
        set_keys.add("seed")
    return LoadedConfig(
        name=config.name,
        path=config.path,
        run=config.run.model_copy(update={"params": raw, "seed": seed}),
        params=validated,
        experiment=config.experiment,
        source="unraveled.run",
        set_keys=frozenset(set_keys),
    )


def _model_for(
    name: str, experiment: Experiment[Any, Any], model: HookedTransformer
) -> tuple[HookedTransformer, str | None]:
    """The model to compute on, in the kind of weights ``experiment`` reads, and a note if re-read.

    A model in either kind serves the experiments of ``SAME_ON_RAW_WEIGHTS``.

    A model from ``load_model`` in the other kind is read again from its source (the
    converted-weights cache makes that a few seconds) and held for this call only: keeping both
    kinds would double the memory a notebook holds (0.5 GB more for GPT-2 small), and
    ``load_model(name, weights=...)`` keeps the other kind for whoever wants it. A model the user
    loaded in the other kind is refused: its source is unknown, and computing on it would give
    numbers that depend on how it was loaded.

    Raises:
        ParamError: (``model``) the user's own model holds the wrong kind of weights.
    """
    wanted = experiment.weights
    if wanted == "processed" and name in SAME_ON_RAW_WEIGHTS:
        return model, None
    known = _REGISTRY.get(model)
    if known is not None:
        if known.weights == wanted:
            return model, None
        from unraveled.models import loading

        reread = loading.load_planned(known.planned, wanted, known.device)
        note = (
            f"{wanted} weights re-read from {reread.loaded_from} for this run (the model passed "
            f"holds {known.weights} weights)"
        )
        _remember(reread, known.device)
        return reread.model, note
    held = _described_weights(model)
    if held == wanted:
        return model, None
    name = model.cfg.model_name or "NAME"
    if wanted == "raw":
        how = (
            f"HookedTransformer.from_pretrained_no_processing({name!r}) or "
            f"unraveled.load_model({name!r}, weights='raw')"
        )
        why = (
            "its norms are folded into the next weights or its embeddings centred, as "
            "HookedTransformer.from_pretrained does by default"
        )
    else:
        how = (
            f"HookedTransformer.from_pretrained({name!r}) or "
            f"unraveled.load_model({name!r}) (processed weights)"
        )
        why = "its norms are not folded and its embeddings not centred"
    raise ParamError(
        "model",
        f"this experiment reads the checkpoint's {wanted} weights, and the model passed holds "
        f"{held} ones ({why}): its numbers would depend on how the model was loaded. "
        f"Load it with {how}",
        prefix="",
    )


def run(
    name: str, model: HookedTransformer | TransformerBridge, *, seed: int = 0, **params: Any
) -> RunResult:
    """Run one experiment on ``model`` with the command line's checks; nothing is written.

    Args:
        name: The experiment (``unraveled list`` names them: ``logit_lens``, ``attention``, ...).
            Its built-in config gives every param not given here.
        model: A ``HookedTransformer``: from ``load_model``, or one you loaded yourself; or a
            ``TransformerBridge`` in compatibility mode, for the experiments whose hooks it
            provides (``unraveled.compat.bridge``).
        seed: Seeds Python, numpy and torch before computing (``0 <= seed < 2**32``).
        **params: The config's ``params`` (``unraveled params NAME`` lists them), validated by
            the same schema as YAML; numpy and torch scalars are taken as Python numbers. A
            mapping (``ioi={"n_pairs": 4}``) overrides those keys only, as ``--set`` does.

    Returns:
        The result: ``.result`` (the experiment's arrays), ``.metrics()``, ``.figures``,
        ``.views``, ``.tables``, ``.save(folder)``.

    Raises:
        ValueError: ``name`` is no experiment.
        TypeError: ``model`` is not a ``HookedTransformer``.
        ParamError: (a ``ValueError``) a param the schema or the model can't take, naming it:
            a prompt too long, a head or layer out of range, a multi-token answer, or a model
            whose kind of weights the experiment can't use (see ``_model_for``).
    """
    from unraveled.compat.bridge import check_bridge, is_bridge

    config = _config(name, seed, params)
    _check_model_type(model)
    experiment, validated = config.experiment, config.params
    try:
        check_bridge(model, config.name, experiment)  # what a bridge lacks, before anything runs
    except ParamError as error:
        raise ParamError(error.field, error.problem, prefix="") from None
    if experiment.check_before_loading is not None:
        experiment.check_before_loading(validated, model.tokenizer, model.cfg.n_ctx)
    check_params(experiment, validated, model)
    # A bridge's kind of weights was checked with the rest of it.
    compute_on, note = (
        (model, None) if is_bridge(model) else _model_for(config.name, experiment, model)
    )
    runner = _runner()
    computed = runner.compute_run(config, compute_on)
    return RunResult(computed, _run_model(compute_on, note))


def _check_model_type(model: Any) -> None:
    from transformer_lens import HookedTransformer

    from unraveled.compat.bridge import is_bridge

    if not isinstance(model, HookedTransformer) and not is_bridge(model):
        hint = (
            f"; load it first: model = unraveled.load_model({model!r})"
            if isinstance(model, (str, Path))
            else ""
        )
        raise TypeError(
            f"model: expected a HookedTransformer (or a TransformerBridge), "
            f"got {type(model).__name__}{hint}"
        )


def report(out_dir: str | Path) -> Path:
    """Rebuild the report's pages (index, run and compare pages) over the runs in ``out_dir``.

    ``RunResult.save`` rebuilds them already; this is for a folder whose pages are out of date
    or were deleted (``unraveled report OUT`` from the shell). Returns the index's path.

    Raises:
        ConfigError: ``out_dir`` is not a folder of runs, or something else is where a page goes.
    """
    from unraveled import outputs
    from unraveled.render.pages import write_pages

    folder = Path(out_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(str(folder), None, "no such folder; expected an output folder of runs")
    outputs.check_output_folder(folder)
    outputs.recover_output_folder(folder)
    if next(outputs.run_dirs(folder), None) is None:
        raise ConfigError(
            str(folder), None, "holds no runs (OUT/<model>/<config>/manifest.json); nothing to show"
        )
    return write_pages(folder)


class RunResult:
    """One experiment's result on one model: its numbers, its figures and views, ``save``.

    Attributes:
        name: The experiment (and the run folder's name).
        params: The validated params it ran with.
        seed: The seed.
        model: The model, as the manifest describes it (``provenance``).
        result: The experiment's own result dataclass (its arrays).
    """

    def __init__(self, computed: ComputedRun, model: RunModel) -> None:
        """Wrap a computed run; figures, views and tables are drawn on first access."""
        self._computed = computed
        self._model = model
        self._artifacts: list[Figure | View | Table] | None = None

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self._computed.config.name

    @property
    def params(self) -> Any:
        """The validated params (the experiment's pydantic ``Params``)."""
        return self._computed.config.params

    @property
    def seed(self) -> int:
        """The seed everything was seeded with."""
        return self._computed.config.run.seed

    @property
    def model(self) -> dict[str, Any]:
        """The model it ran on, as ``manifest.json`` records it."""
        return dict(self._model.record)

    @property
    def result(self) -> Any:
        """The experiment's result dataclass: every array and number it computed."""
        return self._computed.result

    def metrics(self) -> dict[str, Any]:
        """Every number the experiment reports: what ``metrics.json`` holds."""
        return self._computed.result.metrics()

    def _rendered(self) -> list[Figure | View | Table]:
        if self._artifacts is None:
            import matplotlib.pyplot as plt

            runner = _runner()
            from unraveled.experiment import Figure

            artifacts = list(self._computed.config.experiment.render(self._computed.result))
            for artifact in artifacts:
                if isinstance(artifact, Figure):
                    runner._stamp_model(artifact, self._model.label)
                    # Out of pyplot's list: the notebook shows it where asked, not at cell end.
                    plt.close(artifact.figure)
            self._artifacts = artifacts
        return self._artifacts

    @property
    def figures(self) -> list[Figure]:
        """The figures (``Figure``: name, matplotlib figure, caption), drawn once on first use."""
        from unraveled.experiment import Figure

        return [item for item in self._rendered() if isinstance(item, Figure)]

    @property
    def views(self) -> list[View]:
        """The interactive views (``View``: circuitsvis elements), built once on first use."""
        from unraveled.experiment import View

        return [item for item in self._rendered() if isinstance(item, View)]

    @property
    def tables(self) -> list[Table]:
        """The per-item tables (``Table``: equal-length columns), built once on first use."""
        from unraveled.experiment import Table

        return [item for item in self._rendered() if isinstance(item, Table)]

    def save(self, folder: str | Path = "outputs", formats: tuple[str, ...] = ("png",)) -> Path:
        """Write the run folder ``unraveled run`` writes, then rebuild the report's pages.

        ``folder/<model>/<name>/``: figures (the model in their titles), views (their script
        once in ``folder/assets``), tables, ``metrics.json`` and ``manifest.json`` (the params
        given here recorded as its overrides, the model as ``provenance`` describes it). An
        earlier run of the same experiment on the same model there is replaced.

        Args:
            folder: The output folder (``--out``).
            formats: Figure formats: ``png``, ``svg``, ``pdf``.

        Returns:
            The run's folder.

        Raises:
            ConfigError: Something that is not one of the toolkit's runs is in the way.
            UnraveledError: The folder can't be written; nothing of this run is published.
        """
        from unraveled.render.export import parse_formats

        try:
            chosen = parse_formats(formats)
        except ValueError as error:
            raise ParamError("formats", str(error), prefix="") from None
        runner = _runner()
        return runner.save_run(self._computed, self._model, Path(folder).expanduser(), chosen)

    def __repr__(self) -> str:
        """One line: the experiment, the model, the seed and the scalar metrics' names."""
        scalars = [
            key
            for key, value in self.metrics().items()
            if isinstance(value, (int, float, str)) and not isinstance(value, bool)
        ]
        shown = ", ".join(scalars[:5]) + (", ..." if len(scalars) > 5 else "")
        return (
            f"<RunResult {self.name} on {self._model.label}, seed {self.seed}: "
            f"{len(self.metrics())} metrics ({shown}); .figures .views .tables .save()>"
        )

    def _repr_html_(self) -> str:
        """The scalar metrics as a table, then each figure and view inline."""
        import html

        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(key)}</th>"
            f"<td style='text-align:left'>{html.escape(_short_number(value))}</td></tr>"
            for key, value in self.metrics().items()
            if isinstance(value, (int, float, str))
        )
        parts = [
            f"<h3>{html.escape(self._computed.config.experiment.title)} "
            f"<small>{html.escape(self._model.label)}, seed {self.seed}</small></h3>",
            f"<table>{rows}</table>" if rows else "",
        ]
        for item in [*self.figures, *self.views]:
            shown = getattr(item, "_repr_html_", None)
            if shown is not None:
                parts.append(shown())
        return "\n".join(parts)


def _short_number(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return str(value)
