"""The ``causal`` row group: each causal experiment's compute at its default size, timed.

On the bundled SmolLM2; attribution patching's time is set against exact patching's in the same
run.
"""

from __future__ import annotations

import time

from benchmarks.table import Row


def causal_rows(name: str) -> list[Row]:
    """Seconds per compute with default params; attribution against exact patching in one run."""
    from unraveled.experiments import (
        activation_patching,
        attribution_patching,
        ioi_circuit,
        logit_attribution,
    )

    from unraveled.models import load_model

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
        rows.append(Row(group, f"{label} compute", time.perf_counter() - started))
        if label == "attribution_patching":
            exact = sum(result.exact_seconds.values())
            rows.append(
                Row(
                    group,
                    "attribution patching estimate (all components)",
                    result.attribution_seconds,
                )
            )
            rows.append(
                Row(
                    group,
                    "exact patching (components patched exactly)",
                    exact,
                    ratio=exact / result.attribution_seconds,
                    ratio_meaning="exact seconds / estimate seconds",
                )
            )
    return rows
