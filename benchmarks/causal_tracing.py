"""The ``causal_tracing`` row group, on the bundled SmolLM2.

- its compute with the default params (every step: finding the known facts, the noise scale and
  the traces);
- for one fact and one noise sample, ``trace_fact``'s batched restorations against the plain way
  (one hooked forward pass of the whole model per restored state or window, as ROME's
  ``trace_with_patch`` does), timed in the same run on the same weights.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from benchmarks.table import Row

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


def _plain_trace_seconds(
    model: HookedTransformer,
    tokens: torch.Tensor,
    subject: tuple[int, int],
    noise: torch.Tensor,
    window: int,
) -> float:
    """Every restoration of ``trace_fact`` as its own full forward pass with hooks."""
    import torch
    from transformer_lens.hook_points import HookPoint

    from unraveled.tracing import window_layers

    n_layers = model.cfg.n_layers
    restorations = [[f"blocks.{layer}.hook_resid_post"] for layer in range(n_layers)]
    for hook in ("hook_mlp_out", "hook_attn_out"):
        restorations += [
            [f"blocks.{layer}.{hook}" for layer in window_layers(center, window, n_layers)]
            for center in range(n_layers)
        ]
    started = time.perf_counter()
    with torch.inference_mode():
        _, clean = model.run_with_cache(tokens[None])

        def corrupt(embeddings: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            embeddings[:, subject[0] : subject[1]] += noise[0]
            return embeddings

        for position in range(subject[0], len(tokens)):

            def restore(
                activation: torch.Tensor, hook: HookPoint, position: int = position
            ) -> torch.Tensor:
                activation[:, position] = clean[hook.name][0, position]
                return activation

            for names in restorations:
                model.run_with_hooks(
                    tokens[None],
                    fwd_hooks=[("hook_embed", corrupt), *[(name, restore) for name in names]],
                )
    return time.perf_counter() - started


def causal_tracing_rows(name: str) -> list[Row]:
    """causal_tracing's default compute, and one fact's batched restorations against plain ones."""
    import torch
    from unraveled.experiments import causal_tracing

    from unraveled.datasets.facts import FACTS, tokenize_fact
    from unraveled.models import load_model
    from unraveled.tracing import scaled_window, trace_fact

    model = load_model(name, "raw").model
    started = time.perf_counter()
    result = causal_tracing.compute(model, causal_tracing.CausalTracingParams(), seed=0)
    default_s = time.perf_counter() - started
    fact = tokenize_fact(model, FACTS[0], "facts[0]")
    tokens, subject = torch.tensor(fact.tokens), (fact.subject_start, fact.subject_end)
    noise = result.noise_scale * torch.randn(
        (1, subject[1] - subject[0], model.cfg.d_model), generator=torch.Generator().manual_seed(0)
    )
    window = scaled_window(model.cfg.n_layers)
    started = time.perf_counter()
    trace_fact(model, tokens, subject, fact.answer, noise, window)
    batched_s = time.perf_counter() - started
    plain_s = _plain_trace_seconds(model, tokens, subject, noise, window)
    group = f"causal_tracing, {name}"
    return [
        Row(
            group,
            "compute with the default params (finding known facts, noise scale, traces)",
            default_s,
            ratio=result.seconds / default_s,
            ratio_meaning="share spent tracing",
        ),
        Row(group, "one fact, one noise sample: one forward pass per restoration", plain_s),
        Row(
            group,
            "one fact, one noise sample: trace_fact's batched restorations",
            batched_s,
            ratio=plain_s / batched_s,
            ratio_meaning="speed-up over one forward pass per restoration",
        ),
    ]
