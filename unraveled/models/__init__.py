"""Models: resolve a name, load it as a HookedTransformer, cache converted weights."""

from unraveled.models.loading import LoadedModel, availability, checkpoint_parameters, load_model
from unraveled.models.sources import BUNDLED_SMOLLM2, FALLBACK_MODEL, resolve_model

__all__ = ["BUNDLED_SMOLLM2", "FALLBACK_MODEL", "LoadedModel", "availability", "checkpoint_parameters", "load_model", "resolve_model"]
