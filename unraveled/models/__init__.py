"""Models: plan which model each run loads, load it as a HookedTransformer, cache converted weights.

Planning (``unraveled.models.plan``: resolving names, deciding fallbacks) is cheap; loading
imports torch and TransformerLens, so the loading names are imported on first use, keeping
config validation fast.
"""

from typing import Any

from unraveled.models.plan import PlannedModel, RunPlan, availability, plan_runs
from unraveled.models.sources import BUNDLED_SMOLLM2, FALLBACK_MODEL

__all__ = [
    "BUNDLED_SMOLLM2",
    "FALLBACK_MODEL",
    "LoadedModel",
    "PlannedModel",
    "RunPlan",
    "availability",
    "checkpoint_parameters",
    "load_model",
    "plan_runs",
]
_FROM_LOADING = {"LoadedModel", "checkpoint_parameters", "load_model"}


def __getattr__(name: str) -> Any:
    """The loading names, imported on first use (torch and TransformerLens take seconds)."""
    if name in _FROM_LOADING:
        from unraveled.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
