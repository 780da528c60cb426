"""``make bench``, causal experiments: wall time of each compute at its default size on the bundled
SmolLM2, and how attribution patching's time compares with exact patching's on the same run."""

from __future__ import annotations

import time
from typing import Any

from unraveled.models import BUNDLED_SMOLLM2, load_model


def bench_causal(name: str = BUNDLED_SMOLLM2) -> dict[str, Any]:
    """Seconds per compute with default params; attribution against exact patching in one run."""
    from experiments import activation_patching, attribution_patching, ioi_circuit, logit_attribution

    model = load_model(name, "processed", fallback=None).model
    report: dict[str, Any] = {}
    runs = {
        "attribution_patching": (attribution_patching, attribution_patching.AttributionPatchingParams()),
        "ioi_circuit": (ioi_circuit, ioi_circuit.IOICircuitParams()),
        "activation_patching_ioi": (activation_patching, activation_patching.ActivationPatchingParams(prompts="ioi")),
        "logit_attribution_ioi": (logit_attribution, logit_attribution.LogitAttributionParams(prompts="ioi")),
    }
    for label, (module, params) in runs.items():
        started = time.perf_counter()
        result = module.compute(model, params, seed=0)
        report[f"{label}_s"] = time.perf_counter() - started
        if label == "attribution_patching":
            exact_heads_and_mlps = result.exact_seconds["heads"] + result.exact_seconds["mlps"]
            report["attribution_patching_estimate_s"] = result.attribution_seconds
            report["exact_patching_heads_and_mlps_s"] = exact_heads_and_mlps
            report["exact_over_estimate"] = exact_heads_and_mlps / result.attribution_seconds
            report["heads_correlation"] = result.correlations()["heads"]
        if label == "ioi_circuit":
            report["ioi_circuit_phases_s"] = result.seconds
    return {name: report}
