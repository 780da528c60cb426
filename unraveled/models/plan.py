"""The run plan: every config of an invocation and the model each runs on, decided up front.

Each model name is resolved here, once (``plan_model``, the only caller of
``resolve_model_source``), and here alone it is decided whether the bundled model stands in for a
model that can't be had. The prompt checks, the runner and loading then work from the plan and
never look at a name again.

The fallback serves only where nobody chose the model: the built-in default (``gpt2``, what a
config runs on when it names no model or names the default, and no ``--model`` was given). A
model the user names (``--model``, a config's own ``model:`` other than the default, or
``load_model`` from Python) that can't be loaded is an error (exit 3) saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unraveled.config import DEFAULT_MODEL
from unraveled.errors import BadCheckpointError, ModelUnavailableError
from unraveled.models.sources import (
    BUNDLED_MODELS,
    FALLBACK_MODEL,
    ModelSource,
    resolve_model_source,
)

if TYPE_CHECKING:
    from unraveled.config import LoadedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedModel:
    """A model name resolved once, and what will load for it.

    Attributes:
        requested: The name as given (the first spelling, when several name one model).
        given_by: Where the name came from: ``--model``, a config file, or ``load_model``.
        named: What the name resolves to.
        source: What loads: ``named``, or the bundled model standing in for it.
        fallback_reason: Why ``named`` can't be had, when the bundled model stands in.
        refusal: Why nothing loads for the name, when nothing can (``require_loadable``).
        bad_input: Whether ``refusal`` is the name's own fault (a folder that is no checkpoint).
    """

    requested: str
    given_by: str
    named: ModelSource
    source: ModelSource
    fallback_reason: str | None = None
    refusal: str | None = None
    bad_input: bool = False

    @property
    def is_fallback(self) -> bool:
        """Whether the bundled model stands in for the one named."""
        return self.fallback_reason is not None

    def label(self) -> str:
        """How figures and pages name the model: the one used, and what it stands in for."""
        if self.is_fallback:
            return f"{self.source.name} (fallback: {self.requested} unavailable)"
        return self.source.name

    @property
    def identity(self) -> str:
        """Which model a run folder belongs to: the manifest's ``model_identity``.

        Two checkpoints named alike, or a fallback and the model it fell back to, are different
        models.
        """
        if self.is_fallback:
            return f"{self.source.identity} standing in for {self.named.identity}"
        return self.named.identity

    def require_loadable(self) -> None:
        """Raise what keeps the model from loading, if anything does.

        Raises:
            BadCheckpointError: A folder that is not a checkpoint (exit 2).
            ModelUnavailableError: A model that can't be had, with no fallback (exit 3).
        """
        if self.refusal is None:
            return
        if self.bad_input:
            raise BadCheckpointError(
                f"{self.given_by}: model: {self.requested!r} is not a usable checkpoint folder: "
                f"{self.refusal}"
            )
        raise ModelUnavailableError(self.refusal)


def plan_model(
    name: str,
    given_by: str,
    *,
    chosen: bool,
    allow_fallback: bool = True,
    earlier: Mapping[str, PlannedModel] | None = None,
) -> PlannedModel:
    """Resolve ``name`` and decide what loads for it: the one place either is done.

    Nothing is loaded; a hub model not in the Hugging Face cache costs one probe of the hub (a
    few seconds at most), made once per model.

    Args:
        name: A hub name (``gpt2``), a checkpoint folder, or ``smollm2-135m``.
        given_by: Where the name came from, for messages.
        chosen: Whether the user named the model; a model nobody chose (the built-in default)
            may fall back to the bundled model.
        allow_fallback: False for ``--no-fallback``.
        earlier: The models planned so far in this invocation, by ``named.identity``: another
            spelling of one of them is that model, not probed again.

    Returns:
        The plan; a model that can't load carries its ``refusal`` (``require_loadable``).

    Raises:
        ConfigError: ``name`` is not a model name (exit 2).
    """
    named = resolve_model_source(name, given_by)
    known = (earlier or {}).get(named.identity)
    if known is not None:
        named = known.named  # its availability is known already
    problem = named.input_problem()
    if problem is not None:
        return PlannedModel(name, given_by, named, named, refusal=problem, bad_input=True)
    reason = known.fallback_reason if known is not None else named.unavailable_reason()
    if reason is None:
        planned = PlannedModel(name, given_by, named, named)
    elif chosen:
        planned = PlannedModel(
            name,
            given_by,
            named,
            named,
            refusal=f"{reason}\n({given_by} names {name!r}, so no other model stands in for "
            f"it; the bundled model, {FALLBACK_MODEL}, needs no network)",
        )
    elif not allow_fallback:
        planned = PlannedModel(
            name,
            given_by,
            named,
            named,
            refusal=f"{reason}\n(falling back to {FALLBACK_MODEL} is off: --no-fallback or "
            "UNRAVELED_NO_FALLBACK=1)",
        )
    else:
        fallback = BUNDLED_MODELS[FALLBACK_MODEL]
        fallback_problem = fallback.unavailable_reason()
        if fallback_problem is not None:
            planned = PlannedModel(
                name,
                given_by,
                named,
                named,
                refusal=f"{reason}; and the fallback can't be had either: {fallback_problem}",
            )
        else:
            planned = PlannedModel(name, given_by, named, fallback, fallback_reason=reason)
            if known is None:
                logger.warning(
                    "%s. Falling back to the bundled %s: figures will show %s, not %s.",
                    reason,
                    FALLBACK_MODEL,
                    FALLBACK_MODEL,
                    name,
                )
    if known is not None and planned.source == known.source and planned.refusal is None:
        return known  # one model under its first spelling
    return planned


@dataclass(frozen=True)
class RunPlan:
    """What an invocation runs: each config on each of its models, each model resolved once.

    Attributes:
        runs: (config, model) pairs, each once, in the order they were asked for.
    """

    runs: tuple[tuple[LoadedConfig, PlannedModel], ...]

    @property
    def configs(self) -> list[LoadedConfig]:
        """The configs, each once, in order."""
        return list({id(config): config for config, _ in self.runs}.values())

    @property
    def models(self) -> list[PlannedModel]:
        """The models, each once, in the order they were first asked for."""
        return list(dict.fromkeys(planned for _, planned in self.runs))

    def models_of(self, config: LoadedConfig) -> list[PlannedModel]:
        """The models ``config`` runs on, in order."""
        return [planned for run_config, planned in self.runs if run_config is config]

    def configs_on(self, planned: PlannedModel) -> list[LoadedConfig]:
        """The configs that run on ``planned``, in order."""
        return [config for config, run_model in self.runs if run_model == planned]


def plan_runs(
    configs: Sequence[LoadedConfig], models: Sequence[str] = (), allow_fallback: bool = True
) -> RunPlan:
    """Plan every config on its models, each model resolved and its fallback decided once.

    Args:
        configs: Validated configs.
        models: ``--model``, repeatable: every config runs on each of these (named by the user:
            never replaced by the bundled model); empty: each config on the model it names.
        allow_fallback: False for ``--no-fallback``: the default model does not fall back either.

    Raises:
        ConfigError: An unknown model name (exit 2).
        BadCheckpointError: A folder that is not a checkpoint (exit 2).
        ModelUnavailableError: A model that can't be had and may not fall back (exit 3).
    """
    if models:
        wanted = [(config, name, "--model", True) for name in models for config in configs]
    else:
        wanted = [
            (config, config.model, str(config.path), config.model != DEFAULT_MODEL)
            for config in configs
        ]
    by_name: dict[str, PlannedModel] = {}
    by_identity: dict[str, PlannedModel] = {}
    runs: dict[tuple[int, PlannedModel], tuple[LoadedConfig, PlannedModel]] = {}
    for config, name, given_by, chosen in wanted:
        if name not in by_name:
            planned = plan_model(
                name, given_by, chosen=chosen, allow_fallback=allow_fallback, earlier=by_identity
            )
            planned.require_loadable()
            by_name[name] = by_identity.setdefault(planned.named.identity, planned)
        runs.setdefault((id(config), by_name[name]), (config, by_name[name]))
    return RunPlan(tuple(runs.values()))


def availability(name: str) -> tuple[str, str]:
    """What ``name`` resolves to, and whether and from where it can be loaded now.

    For ``unraveled models``: no weights are read, and a model that can't be had is no error.
    """
    planned = plan_model(name, "unraveled models", chosen=True)
    return planned.named.describe(), planned.named.availability()
