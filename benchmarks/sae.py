"""The ``sae`` row group: activation generation's speed, and memory against training tokens.

- Throughput: tokens per second of ``sae_features``'s activation generation (``hook_activations``
  in the local engine's batches, BOS dropped, activations to float32 on the CPU) against a plain
  forward pass stopped at the same hook (``model(tokens, stop_at_layer=L)``) on the same windows
  of the bundled plays, on the bundled SmolLM2, in one process. The budget: at least 80%.
- Memory: peak RSS of the experiment's whole compute at its default params, and at twice the
  training tokens, each in a fresh process: activations go through a buffer of fixed size, so
  the peaks should agree within 5%.

Run alone with ``python -m benchmarks.bench --only sae``.
"""

from __future__ import annotations

import time

from benchmarks.processes import call_in_child
from benchmarks.table import Row

THROUGHPUT_WINDOWS = 32
GENERATION_BUDGET = 0.8
MEMORY_GROWTH_BUDGET = 1.05


def generation_seconds(name: str) -> dict[str, float]:
    """Seconds of the experiment's activation generation and of a plain stopped forward pass."""
    import numpy as np
    import torch
    from unraveled.experiments.sae_features import SaeFeaturesParams

    from unraveled.corpus import corpus_windows
    from unraveled.models import load_model
    from unraveled.sae.activations import activation_chunks, default_hook, hook_block

    model = load_model(name, "processed").model
    params = SaeFeaturesParams()
    windows = corpus_windows(
        model.tokenizer, [], params.context_tokens, THROUGHPUT_WINDOWS * params.context_tokens, 0
    ).tokens
    hook = default_hook(model)
    prepend_bos = bool(model.cfg.default_prepend_bos)
    block = hook_block(hook)
    started = time.perf_counter()
    for _ in activation_chunks(model, hook, windows, params.batch_windows, prepend_bos):
        pass
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(windows), params.batch_windows):
            tokens = torch.from_numpy(
                windows[start : start + params.batch_windows].astype(np.int64)
            )
            if prepend_bos:
                bos = torch.full((len(tokens), 1), model.tokenizer.bos_token_id)
                tokens = torch.cat([bos, tokens], dim=1)
            model(tokens, stop_at_layer=block)
    plain_s = time.perf_counter() - started
    return {"tokens": float(windows.size), "generation_s": generation_s, "plain_s": plain_s}


def sae_compute(name: str, training_tokens: int) -> None:
    """The experiment's whole compute at its default params but ``training_tokens``.

    Called in a process of its own (``call_in_child``), whose peak is the measurement. The
    compute hands freed memory back at its phase ends, as ``unraveled run`` computes a config.
    """
    from unraveled.experiments.sae_features import SaeFeaturesParams, compute

    from unraveled.memory import return_freed_memory
    from unraveled.models import load_model
    from unraveled.phases import handing_back

    model = load_model(name, "processed").model
    with handing_back(return_freed_memory):
        compute(model, SaeFeaturesParams(training_tokens=training_tokens), seed=0)


def sae_rows(name: str) -> list[Row]:
    """The measurements above as rows of ``make bench``'s table."""
    from unraveled.experiments.sae_features import SaeFeaturesParams

    group = f"sae features, {name}"
    speeds = call_in_child(generation_seconds, name).value
    tokens = int(speeds["tokens"])
    rows = [
        Row(group, f"plain forward pass stopped at the hook, {tokens} tokens", speeds["plain_s"]),
        Row(
            group,
            f"activation generation, {tokens} tokens (budget: >= {GENERATION_BUDGET:.0%})",
            speeds["generation_s"],
            ratio=speeds["plain_s"] / speeds["generation_s"],
            ratio_meaning="tokens/s of generation / of the plain stopped pass",
        ),
    ]
    default = SaeFeaturesParams().training_tokens
    runs = {size: call_in_child(sae_compute, name, size) for size in (default, 2 * default)}
    for size, run in runs.items():
        rows.append(
            Row(
                group,
                f"whole sae_features compute, {size} training tokens",
                run.seconds,
                run.peak_mb,
                ratio=run.peak_mb / runs[default].peak_mb if size != default else None,
                ratio_meaning=(
                    f"peak at {size} / at {default} tokens (budget: <= {MEMORY_GROWTH_BUDGET})"
                    if size != default
                    else ""
                ),
            )
        )
    return rows
