"""Models: resolve a name, load it as a HookedTransformer, cache converted weights.

Resolving names (``unraveled.models.sources``) is cheap; loading imports torch and
TransformerLens, so the loading names are imported on first use, keeping config validation fast.
"""

from typing import Any

from unraveled.models.sources import BUNDLED_SMOLLM2, FALLBACK_MODEL, resolve_model

__all__ = [
    "BUNDLED_SMOLLM2",
    "FALLBACK_MODEL",
    "LoadedModel",
    "availability",
    "checkpoint_parameters",
    "load_model",
    "resolve_model",
]
_FROM_LOADING = {"LoadedModel", "availability", "checkpoint_parameters", "load_model"}


def __getattr__(name: str) -> Any:
    if name in _FROM_LOADING:
        from unraveled.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
