"""The local engine: stream the windows through one model, batch by batch, into one state."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from jaxtyping import Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from unraveled.engines.state import AtlasSettings, AtlasState, update


def batches(first: int, stop: int, batch_windows: int) -> Iterator[range]:
    """Window numbers ``first..stop-1`` in batches that start at multiples of ``batch_windows``.

    Every engine cuts batches this way, so a window is always computed in the same batch, with
    the same neighbours, whichever shard it falls in.
    """
    start = first
    while start < stop:
        end = min(stop, (start // batch_windows + 1) * batch_windows)
        yield range(start, end)
        start = end


def run_windows(
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    numbers: range,
    settings: AtlasSettings,
    progress: bool = True,
    description: str = "corpus atlas",
) -> AtlasState:
    """The state of ``windows[numbers]``: the whole of a local run, or one shard of a Ray run.

    Args:
        model: The model.
        windows: Every window of the run (token ids, without BOS).
        numbers: The window numbers to process.
        settings: What to keep.
        progress: Show a progress bar with tokens per second.
        description: The progress bar's label.
    """
    state = AtlasState.for_model(model, settings)
    n_tokens = len(numbers) * windows.shape[1]
    with tqdm(
        total=n_tokens,
        unit="tok",
        unit_scale=True,
        desc=description,
        disable=not progress,
        mininterval=1.0,
    ) as bar:
        for batch in batches(numbers.start, numbers.stop, settings.batch_windows):
            chosen = np.arange(batch.start, batch.stop)
            state = update(state, model, windows[chosen], chosen, settings)
            bar.update(len(chosen) * windows.shape[1])
    return state


def run_local(
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    settings: AtlasSettings,
    progress: bool = True,
) -> AtlasState:
    """Every window through ``model`` in this process."""
    return run_windows(model, windows, range(len(windows)), settings, progress)
