"""What an experiment is: typed params, a pure ``compute`` and a ``render`` that only draws.

An experiment is one module in ``experiments/`` that defines ``EXPERIMENT``; adding a module and
a YAML config in ``configs/`` is all it takes for the runner, the CLI and the index to pick it
up.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from matplotlib.figure import Figure as MplFigure
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict
from transformer_lens import HookedTransformer

import experiments
from unraveled.render.views import Element

WeightsKind = Literal["processed", "raw"]


class Params(BaseModel):
    """Base for experiment params: strict types, unknown keys refused, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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


@dataclass(frozen=True)
class Table:
    """Columns of equal length to be saved as ``<name>.npz`` next to ``metrics.json``.

    For per-item tables too large for metrics.json; ``pandas.DataFrame(dict(numpy.load(path)))``
    reads it back in one line.
    """

    name: str
    columns: dict[str, NDArray[Any]]
    description: str = ""

    def __post_init__(self) -> None:
        lengths = {name: len(column) for name, column in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"table {self.name!r}: columns differ in length: {lengths}")


Artifact = Figure | View | Table
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
    """

    title: str
    params: type[P]
    compute: Callable[[HookedTransformer, P, int], R]
    render: Callable[[R], Iterable[Artifact]]
    weights: WeightsKind = "processed"


def available_experiments() -> list[str]:
    """Names of the experiment modules in ``experiments/``."""
    return sorted(
        info.name for info in pkgutil.iter_modules(experiments.__path__) if not info.name.startswith("_")
    )


def load_experiment(name: str) -> Experiment[Any, Any]:
    """Import ``experiments.<name>`` and return its ``EXPERIMENT``."""
    module = importlib.import_module(f"experiments.{name}")
    experiment = getattr(module, "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        raise TypeError(f"experiments/{name}.py must define EXPERIMENT = Experiment(...)")
    return experiment
