"""The ``generation`` row group: generation under a steering hook against generation without one.

Same weights (the bundled SmolLM2), same prompt, greedy, key-value cache on, measured in one run:
the hooked tokens/s must be at least 90% of the unhooked (issue 23's budget). Each side is timed
as the best of a few repeats, interleaved in alternating order, so that a busy machine slows
both alike.
"""

from __future__ import annotations

import time

from benchmarks.table import Row

PROMPT = "I think that you are"
NEW_TOKENS = 32
REPEATS = 4
BUDGET = 0.9


def generation_rows(name: str) -> list[Row]:
    """Tokens/s with and without an ``AddVector`` at the middle layer's resid_pre."""
    import torch

    from unraveled.interventions import AddVector, generate
    from unraveled.models import load_model

    model = load_model(name, "processed").model
    layer = model.cfg.n_layers // 2
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    steering = [AddVector(vector, layer, 4.0)]
    generate(model, PROMPT, 2)  # warm-up: first-call allocations land in neither side
    best = {"unhooked": float("inf"), "hooked": float("inf")}
    sides = [("unhooked", []), ("hooked", steering)]
    for repeat in range(REPEATS):
        # Alternating which side goes first, so that a load that changes over time favours
        # neither.
        for side, interventions in sides if repeat % 2 == 0 else sides[::-1]:
            started = time.perf_counter()
            generate(model, PROMPT, NEW_TOKENS, interventions)
            best[side] = min(best[side], time.perf_counter() - started)
    ratio = best["unhooked"] / best["hooked"]
    group = f"generation under a hook, {name}, {NEW_TOKENS} tokens, greedy, KV cache"
    verdict = "pass" if ratio >= BUDGET else "FAIL"
    return [
        Row(group, f"unhooked ({NEW_TOKENS / best['unhooked']:.1f} tokens/s)", best["unhooked"]),
        Row(
            group,
            f"AddVector at blocks.{layer}.hook_resid_pre "
            f"({NEW_TOKENS / best['hooked']:.1f} tokens/s)",
            best["hooked"],
            ratio=ratio,
            ratio_meaning=f"hooked tokens/s / unhooked (budget >= {BUDGET}: {verdict})",
        ),
    ]
