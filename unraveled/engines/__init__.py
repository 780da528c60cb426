"""Engines that stream corpus windows through a model into an ``AtlasState``.

``local`` runs in this process; ``ray`` shards the windows over Ray workers and merges their
states with the same merge, so both give the same result.

Importing this package imports neither torch nor TransformerLens nor Ray: the CLI checks the
Ray engine's cluster (``unraveled.engines.ray_cluster``) before those slow imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from unraveled.experiment import RESOLVE_ANNOTATIONS

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    import numpy as np
    from jaxtyping import Int
    from transformer_lens import HookedTransformer

    from unraveled.engines.state import AtlasSettings, AtlasState

EngineName = Literal["local", "ray"]


def run_engine(
    engine: EngineName,
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    settings: AtlasSettings,
    workers: int | None = None,
    progress: bool = True,
) -> AtlasState:
    """The merged state of every window, computed by ``engine``."""
    if engine == "ray":
        from unraveled.engines.ray import run_ray  # Ray is imported only when asked for

        return run_ray(model, windows, settings, workers=workers, progress=progress)
    from unraveled.engines.local import run_local

    return run_local(model, windows, settings, progress)
