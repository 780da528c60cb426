"""What an experiment is: typed params, a pure ``compute`` and a ``render`` that only draws.

An experiment is one module in ``experiments/`` (installed as ``unraveled.experiments``) that
defines ``EXPERIMENT``; adding a module and a YAML config in ``configs/`` is all it takes for the
runner, the CLI and the index to pick it up.

Import cost convention: config validation imports every experiment module to read its params, and
must stay fast, so an experiment module imports only the standard library, numpy, pydantic,
jaxtyping and this module at its top. torch, TransformerLens, matplotlib and the ``unraveled``
helpers built on them are imported inside the functions that use them, and names needed only in
annotations are imported under ``if TYPE_CHECKING or RESOLVE_ANNOTATIONS:`` so the test suite's
jaxtyping/beartype checks still see them (see ``RESOLVE_ANNOTATIONS``).

Params that depend on the model are marked in the schema (``Prompt``, ``Answer``, ``HeadIndex``,
``LayerIndex``). Prompts and answers are checked against the model's tokenizer and context
before any model is loaded (``check_text_params``); everything, those again, by the runner right
after the model loads and before anything is written. Anything else model-dependent goes in the
experiment's optional ``check``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from unraveled.errors import ParamError

__all__ = ["ParamError"]  # re-exported: experiments raise it from their check

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

    from unraveled.render.views import Element

EXPERIMENTS_PACKAGE = "unraveled.experiments"
WeightsKind = Literal["processed", "raw"]
# What an experiment uses of a model beyond run_with_cache/run_with_hooks and the weights all
# TransformerLens models have; see Experiment.needs.
ModelNeed = Literal["start_at_layer", "stop_at_layer", "hook_names", "W_pos", "block_internals"]
DEFAULT_MAX_PROMPT_TOKENS = 128


def _annotations_checked_at_runtime() -> bool:
    # jaxtyping's pytest import hook (--jaxtyping-packages) resolves every annotation when a module
    # is imported and silently checks nothing for a name it can't resolve; type-only imports must
    # then really happen. Outside the test suite nothing reads annotations at run time.
    return any(type(finder).__module__.startswith("jaxtyping") for finder in sys.meta_path)


RESOLVE_ANNOTATIONS = _annotations_checked_at_runtime()


class Params(BaseModel):
    """Base for experiment params: strict types, unknown keys refused, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True)
class ModelBound:
    """Field marker: the value is checked against the loaded model before anything is written.

    ``prompt``: its tokens fit the model's context and the experiment's ``max_prompt_tokens``;
    ``single_token``: it is exactly one token; ``head``/``layer``: an index the model has.
    """

    kind: Literal["prompt", "single_token", "head", "layer"]


Prompt = Annotated[str, Field(min_length=1), ModelBound("prompt")]
Answer = Annotated[str, Field(min_length=1), ModelBound("single_token")]
HeadIndex = Annotated[int, Field(ge=0), ModelBound("head")]
LayerIndex = Annotated[int, Field(ge=0), ModelBound("layer")]


class Result(Protocol):
    """What ``compute`` returns: arrays for the renderer plus the numbers for metrics.json."""

    def metrics(self) -> dict[str, Any]:
        """Every number the experiment reports, JSON-serialisable."""
        ...


@dataclass(frozen=True)
class Figure:
    """A matplotlib figure to be saved as ``figures/<name>.png``."""

    name: str
    figure: MplFigure
    caption: str = ""

    def _repr_png_(self) -> bytes:
        """The figure as PNG, for front ends that show images only."""
        from unraveled.render import notebook

        return notebook.figure_png(self)

    def _repr_html_(self) -> str:
        """The figure inline in Jupyter (an embedded PNG), its caption below."""
        from unraveled.render import notebook

        return notebook.figure_html(self)


@dataclass(frozen=True)
class View:
    """An interactive page to be saved as ``views/<name>.html``.

    The runner turns it into a self-contained page (``unraveled.render.views.page``) that also
    names the model and links back to the index.
    """

    name: str
    title: str
    elements: list[Element]
    facts: dict[str, str] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """The view drawn inline in Jupyter, offline (see ``unraveled.render.notebook``)."""
        from unraveled.render import notebook

        return notebook.view_html(self)


@dataclass(frozen=True)
class Table:
    """Columns of equal length to be saved as ``<name>.npz`` next to ``metrics.json``.

    For per-item tables too large for metrics.json; ``pandas.DataFrame(dict(numpy.load(path)))``
    reads it back in one line.
    """

    name: str
    columns: dict[str, Any]
    description: str = ""

    def __post_init__(self) -> None:
        lengths = {name: len(column) for name, column in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"table {self.name!r}: columns differ in length: {lengths}")


@dataclass(frozen=True)
class Saved:
    """A folder that ``save`` writes, kept as ``<name>/`` next to ``metrics.json``.

    For what a library saves in its own format (a trained SAE, in SAELens's): the runner makes
    the folder inside the run's staging folder and calls ``save(folder)``, so it is published
    with the run or not at all.
    """

    name: str
    save: Callable[[Path], object]
    description: str = ""


Artifact = Figure | View | Table | Saved
P = TypeVar("P", bound=Params)
R = TypeVar("R", bound=Result)


@dataclass(frozen=True)
class Experiment(Generic[P, R]):
    """One experiment: how to compute its result from a model, and how to draw it.

    Args:
        title: Human-readable title for the index page.
        params: The pydantic schema of the config's ``params`` block, with defaults.
        compute: ``(model, params, seed) -> result``. Reads weights and activations; no I/O.
        render: ``result -> figures and views``. Draws only; never sees the model.
        weights: ``"raw"`` for experiments that read weights as the checkpoint stores them
            (LayerNorm gammas, uncentred embeddings, Hugging Face-style hidden states);
            ``"processed"`` for TransformerLens's folded and centred weights.
        max_prompt_tokens: The most tokens a ``Prompt`` param may have (memory and figure size
            grow with it); the model's context length caps it too.
        check: ``(model, params) -> None``, raising ``ParamError`` for a param the model can't
            take that the field markers don't cover (e.g. a token index beyond the prompt).
        check_before_loading: ``(params, tokenizer, n_ctx) -> None``, raising ``ParamError`` for
            input that can be refused before the model loads (the files a param names); the
            runner calls it with the model's tokenizer and context read without its weights,
            each None when they can't be had without loading.
        needs: What it uses of the model that not every TransformerLens model has, so that one
            lacking it (a ``TransformerBridge``, ``unraveled.compat.bridge``) is refused before
            anything is computed: ``start_at_layer`` (a forward pass from a layer on),
            ``stop_at_layer`` (one stopped after the last block, returning the residual stream),
            ``hook_names`` (hooks that see the name they were added under), ``W_pos``,
            ``block_internals`` (a block's ``ln1``, ``ln2`` and ``apply_mlp``, to recompute its
            parts outside a forward pass).
    """

    title: str
    params: type[P]
    compute: Callable[[HookedTransformer, P, int], R]
    render: Callable[[R], Iterable[Artifact]]
    weights: WeightsKind = "processed"
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    check: Callable[[HookedTransformer, P], None] | None = None
    check_before_loading: Callable[[P, PreTrainedTokenizerBase | None, int | None], None] | None = (
        None
    )
    needs: frozenset[ModelNeed] = frozenset()


def _tokens_with_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return prompt_token_range(tokenizer, text)[1]


def prompt_token_range(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, int]:
    """The fewest and the most tokens ``text`` can take in a forward pass: without and with BOS.

    Before the model loads, whether it prepends a BOS token is not known (SmolLM2 does not,
    GPT-2 does), so a check made then refuses only what is wrong either way: a token budget
    against the fewest, a position that must lie inside the prompt against the most.
    """
    n_text = len(tokenizer.encode(text, add_special_tokens=False))
    return n_text, n_text + 1


def prompt_token_count(model: HookedTransformer, text: str) -> int:
    """Tokens ``text`` takes in a forward pass, counting a BOS token whether or not one is added."""
    return _tokens_with_bos(model.tokenizer, text)


def _markers(annotation: Any) -> list[ModelBound]:
    """The ModelBound markers anywhere in ``annotation`` (``Prompt``, ``list[Prompt]``, ...)."""
    found = [
        item for item in getattr(annotation, "__metadata__", ()) if isinstance(item, ModelBound)
    ]
    for arg in typing.get_args(annotation):
        if not isinstance(arg, (str, int, float)):
            found.extend(_markers(arg))
    return found


def _values(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [item for inner in value for item in _values(inner)]
    return [] if value is None else [value]


def _model_bound_values(params: Params) -> Iterator[tuple[str, set[str], Any]]:
    """Each value of a model-bound param: the param's name, its marker kinds and the value."""
    for name, info in type(params).model_fields.items():
        kinds = {
            marker.kind
            for marker in [
                *_markers(info.annotation),
                *[m for m in info.metadata if isinstance(m, ModelBound)],
            ]
        }
        if kinds:
            for value in _values(getattr(params, name)):
                yield name, kinds, value


def check_text_params(
    experiment: Experiment[Any, Any],
    params: Params,
    tokenizer: PreTrainedTokenizerBase,
    n_ctx: int | None,
) -> None:
    """Check the params the tokenizer decides: prompts fit, answers are one token.

    Prompts must fit the model's context and the experiment's ``max_prompt_tokens``. Needs only
    the tokenizer and the context length, so the runner calls it before loading any weights
    (``unraveled.models.shape``); ``check_params`` calls it again on the loaded model.

    Args:
        experiment: The experiment the params are for (its ``max_prompt_tokens``).
        params: The validated params.
        tokenizer: The model's tokenizer.
        n_ctx: The model's context length; None when not known yet (only the experiment's cap
            is checked then).

    Raises:
        ParamError: Naming the param and what the model can take.
    """
    by_context = n_ctx is not None and n_ctx <= experiment.max_prompt_tokens
    cap, limit = (
        (n_ctx, "the model's context")
        if by_context
        else (experiment.max_prompt_tokens, "this experiment's max_prompt_tokens")
    )
    for name, kinds, value in _model_bound_values(params):
        if "prompt" in kinds:
            count = _tokens_with_bos(tokenizer, value)
            if count > cap:
                raise ParamError(
                    name,
                    f"{count} tokens (BOS included), more than the {cap} allowed by {limit}; "
                    "shorten the prompt",
                )
        if "single_token" in kinds:
            ids = tokenizer.encode(value, add_special_tokens=False)
            if len(ids) != 1:
                pieces = [tokenizer.decode([i]) for i in ids]
                raise ParamError(
                    name,
                    f"{value!r} is {len(ids)} tokens for this model ({pieces}); expected one token",
                )


def check_params(
    experiment: Experiment[Any, Any], params: Params, model: HookedTransformer
) -> None:
    """Check every model-bound param against ``model``; the experiment's own ``check`` last.

    Raises:
        ParamError: Naming the param and what the model can take.
    """
    cfg = model.cfg
    check_text_params(experiment, params, model.tokenizer, cfg.n_ctx)
    for name, kinds, value in _model_bound_values(params):
        if "head" in kinds and value >= cfg.n_heads:
            raise ParamError(
                name,
                f"{value} is out of range: "
                f"the model has {cfg.n_heads} heads (use 0..{cfg.n_heads - 1})",
            )
        if "layer" in kinds and value >= cfg.n_layers:
            raise ParamError(
                name,
                f"{value} is out of range: "
                f"the model has {cfg.n_layers} layers (use 0..{cfg.n_layers - 1})",
            )
    if experiment.check is not None:
        experiment.check(model, params)


def available_experiments() -> list[str]:
    """Names of the experiment modules in ``experiments/``."""
    package = importlib.import_module(EXPERIMENTS_PACKAGE)
    return sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    )


def load_experiment(name: str) -> Experiment[Any, Any]:
    """Import ``unraveled.experiments.<name>`` and return its ``EXPERIMENT``."""
    module = importlib.import_module(f"{EXPERIMENTS_PACKAGE}.{name}")
    experiment = getattr(module, "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        raise TypeError(f"experiments/{name}.py must define EXPERIMENT = Experiment(...)")
    return experiment
