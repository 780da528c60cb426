"""What the corpus, corpus-atlas and Ray-engine tests share: a text, window settings, a loader."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

from transformer_lens import HookedTransformer

from unraveled.engines.state import AtlasSettings
from unraveled.models import load_model

TEXT = (
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
    "The evil that men do lives after them; the good is oft interred with their bones. "
    "So let it be with Caesar. The noble Brutus hath told you Caesar was ambitious. "
    "If it were so, it was a grievous fault, and grievously hath Caesar answer'd it. "
    "Here, under leave of Brutus and the rest, for Brutus is an honourable man, "
    "so are they all, all honourable men, come I to speak in Caesar's funeral. "
)
CONTEXT = 16
SETTINGS = AtlasSettings(
    top_k=5,
    context_before=3,
    context_after=2,
    residual_top_k=2,
    batch_windows=3,
    prepend_bos=False,
    neuron_contexts=None,
)


def load_tiny(folder: Path, cache: Path) -> HookedTransformer:
    """A model of the caller's own (one it may rewire), converted through ``cache``."""
    with mock.patch.dict(os.environ, {"UNRAVELED_CACHE": str(cache)}):
        return load_model(str(folder), "processed").model
