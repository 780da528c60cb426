"""``make bench``, causal experiments: wall time of each compute at its default size on the bundled
SmolLM2, and how attribution patching's time compares with exact patching's on the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from unraveled.models import BUNDLED_SMOLLM2, load_model

T = TypeVar("T")


def bench_rows(row: Callable[..., T], name: str = BUNDLED_SMOLLM2) -> list[T]:
    """Seconds per compute with default params, as rows of ``make bench``'s table (``row`` is
    ``unraveled.bench.Row``); attribution against exact patching measured in one run.
    """
    from unraveled.experiments import (
        activation_patching,
        attribution_patching,
        ioi_circuit,
        logit_attribution,
    )

    model = load_model(name, "processed").model
    group = f"causal experiments, {name}"
    runs = {
        "attribution_patching": (
            attribution_patching,
            attribution_patching.AttributionPatchingParams(),
        ),
        "ioi_circuit": (ioi_circuit, ioi_circuit.IOICircuitParams()),
        "activation_patching, prompts: ioi": (
            activation_patching,
            activation_patching.ActivationPatchingParams(prompts="ioi"),
        ),
        "logit_attribution, prompts: ioi": (
            logit_attribution,
            logit_attribution.LogitAttributionParams(prompts="ioi"),
        ),
    }
    rows = []
    for label, (module, params) in runs.items():
        started = time.perf_counter()
        result = module.compute(model, params, seed=0)
        rows.append(row(group, f"{label} compute", time.perf_counter() - started))
        if label == "attribution_patching":
            exact = sum(result.exact_seconds.values())
            rows.append(
                row(
                    group,
                    "attribution patching estimate (all components)",
                    result.attribution_seconds,
                )
            )
            rows.append(
                row(
                    group,
                    "exact patching (components patched exactly)",
                    exact,
                    ratio=exact / result.attribution_seconds,
                    ratio_meaning="exact seconds / estimate seconds",
                )
            )
    return rows
