"""The ``path_patching`` row group: path patching's cost per sender against activation patching's.

Exact activation patching of each head, on the same weights and pairs, measured in one run.
"""

from __future__ import annotations

import time

from benchmarks.table import Row


def path_patching_rows(name: str) -> list[Row]:
    """Seconds per sender (to the logits, to three receivers' queries) and per patched head."""
    from unraveled.experiments import path_patching

    from unraveled.components import HeadComponent
    from unraveled.datasets.ioi import ioi_batch
    from unraveled.models import load_model
    from unraveled.patching import head_patches, patched_metric, run_cache
    from unraveled.patching.paths import (
        path_patch_to_logits,
        path_patch_to_receivers,
        path_patching_hooks,
    )

    model = load_model(name, "processed").model
    params = path_patching.PathPatchingParams()
    pairs = ioi_batch(model, params.ioi, 0).tokens
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    hooks = path_patching_hooks(model)
    _, clean = run_cache(model, pairs, "clean", hooks)
    _, corrupted = run_cache(model, pairs, "corrupted", hooks)
    senders = n_layers * n_heads

    started = time.perf_counter()
    path_patch_to_logits(model, pairs, clean, corrupted)
    to_logits = (time.perf_counter() - started) / senders
    # Receivers as the experiment chooses them off GPT-2: the last layer's first heads, so every
    # earlier head reaches one (a fixed choice: the cost doesn't depend on the weights).
    receivers = [HeadComponent(n_layers - 1, head, "q") for head in range(3)]
    started = time.perf_counter()
    path_patch_to_receivers(model, pairs, clean, corrupted, receivers, positions="last")
    to_receivers = (time.perf_counter() - started) / (senders - n_heads)
    started = time.perf_counter()
    patched_metric(model, pairs, head_patches(model), corrupted, "clean", clean)
    exact = (time.perf_counter() - started) / senders

    group = f"path patching, {name}, {pairs.size} IOI pairs, {senders} heads"
    return [
        Row(group, "exact activation patching, per head (from its layer)", exact),
        Row(
            group,
            "path patching senders -> logits, per sender",
            to_logits,
            ratio=to_logits / exact,
            ratio_meaning="per sender / per activation-patched head",
        ),
        Row(
            group,
            "path patching senders -> 3 last-layer queries, per sender",
            to_receivers,
            ratio=to_receivers / exact,
            ratio_meaning="per sender / per activation-patched head",
        ),
    ]
