"""The LayerNorm experiment's numbers against transformers: the scale each norm applies to the
prompts, and how its gammas correlate with the embeddings' spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from transformers import AutoModelForCausalLM
from unraveled.experiments import layernorm

from tests.helpers.models import SharedTinyModels

PROMPTS = ["Alice gave Bob a goose, and he gave her a duck.", "The capital of France is Paris."]


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_applied_scale_and_gamma_correlation_match_transformers(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    folder = request.getfixturevalue(checkpoint)
    model = tiny_model(folder, "raw")
    summary = layernorm.compute(model, layernorm.LayerNormParams(prompts=PROMPTS), seed=0).metrics()
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    gpt2 = hasattr(hf, "transformer")
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    norms = {
        "ln1": [b.ln_1 if gpt2 else b.input_layernorm for b in blocks],
        "ln2": [b.ln_2 if gpt2 else b.post_attention_layernorm for b in blocks],
    }
    inputs: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = [
        norm.register_forward_hook(
            lambda _m, args, _o, key=(which, layer): inputs.setdefault(key, []).append(args[0][0])
        )
        for which, modules in norms.items()
        for layer, norm in enumerate(modules)
    ]
    with torch.no_grad():
        for prompt in PROMPTS:
            hf(model.to_tokens(prompt))
    for handle in handles:
        handle.remove()
    for which, modules in norms.items():
        for layer, norm in enumerate(modules):
            # The divisor the norm applies at each position: LayerNorm's std, RMSNorm's root mean
            # square.
            eps = norm.eps if gpt2 else norm.variance_epsilon
            scales = [
                ((x.var(-1, unbiased=False) if gpt2 else x.pow(2).mean(-1)) + eps).sqrt()
                for x in inputs[(which, layer)]
            ]
            longest = max(len(s) for s in scales)
            per_position = [
                np.mean([float(s[p]) for s in scales if p < len(s)]) for p in range(longest)
            ]
            assert summary["applied_scale_mean_per_layer"][which][layer] == pytest.approx(
                np.mean(per_position), rel=1e-4
            )
            reference = (
                (hf.transformer.wpe.weight if gpt2 else hf.model.embed_tokens.weight)
                .detach()
                .numpy()
            )
            expected = pearsonr(
                np.log10(reference.std(axis=0)), np.log10(np.abs(norm.weight.detach().numpy()))
            ).statistic
            assert summary["correlation_log_gamma_vs_log_reference_std"][which][
                layer
            ] == pytest.approx(expected, abs=1e-5)
