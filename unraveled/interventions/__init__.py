"""Interventions on a model's forward pass, generation under them, and steering vectors.

Everything is imported on first use (``unraveled.interventions.AddVector``...), so that config
validation, which imports the ``Sampling`` params, imports no torch.

- ``Intervention``: one object that knows where it hooks; ``AddVector``, ``Ablate``.
- ``intervening(model, *interventions)``: a context manager that applies them and removes them
  on the way out, also on an exception; ``steer(model, vector, layer, coefficient)`` for one
  steering vector.
- ``generate(model, prompt, max_new_tokens, interventions, seed=...)``: greedy or seeded
  sampling with the interventions active for every token, key-value cache included.
- ``contrastive_vector(model, positive, negative, layer)``: a steering vector (CAA's mean
  difference).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Intervention": "base",
    "Positions": "base",
    "intervening": "base",
    "AddVector": "edits",
    "Ablate": "edits",
    "Generation": "generation",
    "generate": "generation",
    "Sampling": "sampling",
    "contrastive_vector": "steering",
    "steer": "steering",
    "target_log_prob": "steering",
    "next_token_log_probs": "steering",
    "kl_per_position": "steering",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
