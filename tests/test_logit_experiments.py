"""Logit lens, direct logit attribution and activation patching, checked against the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unraveled.errors import ParamError
from unraveled.experiments import activation_patching, logit_attribution, logit_lens
from unraveled.activations import collect_activations
from unraveled.logits import answer_token_id, logit_lens as decode, residual_hook_names
from unraveled.models import load_model

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(params=["tiny_gpt2_dir", "tiny_llama_dir"])
def model(request: pytest.FixtureRequest, weight_cache: Path):  # type: ignore[no-untyped-def]
    return load_model(str(request.getfixturevalue(request.param)), "processed", fallback=None).model


def test_logit_lens_last_point_is_the_model_output(model) -> None:  # type: ignore[no-untyped-def]
    hooks = residual_hook_names(model.cfg.n_layers)
    acts = collect_activations(model, [PROMPT], hooks)
    lens = decode(model, torch.stack([acts.cache[h][0] for h in hooks]))
    torch.testing.assert_close(lens[-1], acts.logits[0], atol=1e-5, rtol=1e-5)
    result = logit_lens.compute(model, logit_lens.LogitLensParams(prompt=PROMPT), seed=0)
    assert result.kl_from_final[-1] == pytest.approx(0.0, abs=1e-5) and result.final_prediction_rank[-1] == 0
    assert result.final_prediction == model.tokenizer.decode([int(acts.logits[0, -1].argmax())])
    assert len(result.top5_last) == model.cfg.n_layers + 1 and len(result.top5_last[0]) == 5


def test_logit_lens_recomputes_the_norm_scale_per_layer(tiny_gpt2_dir: Path, weight_cache: Path) -> None:
    model = load_model(str(tiny_gpt2_dir), "processed", fallback=None).model
    with torch.no_grad():  # make the last block write a huge vector, so residual norms differ a lot between layers
        model.blocks[1].mlp.b_out += 50.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    acts = collect_activations(model, [PROMPT], [*residual_hook_names(2), "ln_final.hook_scale"])
    embeddings = acts.cache["blocks.0.hook_resid_pre"][0]
    ours = decode(model, embeddings[None])[0]
    centred = embeddings - embeddings.mean(dim=-1, keepdim=True)
    expected = model.unembed((centred / centred.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt())[None])[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    stack = torch.stack([acts.cache[h] for h in residual_hook_names(2)])  # [point, batch, pos, d_model]
    # TransformerLens 3.9's accumulated_resid recomputes the statistics at the final layer, as we do.
    corrected = acts.cache.accumulated_resid(layer=None, apply_ln=True)
    torch.testing.assert_close(decode(model, stack[:, 0]), model.unembed(corrected[:, 0]), atol=1e-4, rtol=1e-4)
    # Reusing the final layer's cached scale for every layer (TransformerLens issue #1076) is far off.
    reused = acts.cache.apply_ln_to_stack(stack, layer=None, recompute_ln=False)
    reused_log_probs = model.unembed(reused[0])[0].log_softmax(-1)
    assert (reused_log_probs - ours.log_softmax(-1)).abs().max() > 1.0


def test_attribution_components_sum_to_the_logit_difference(model) -> None:  # type: ignore[no-untyped-def]
    params = logit_attribution.LogitAttributionParams(prompt=PROMPT)
    result = logit_attribution.compute(model, params, seed=0)
    assert result.heads.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert result.total() == pytest.approx(result.logit_difference, abs=1e-4)
    expected = set(["embed", "pos_embed"] if model.cfg.positional_embedding_type == "standard" else ["embed"])
    assert set(result.embeddings) == expected


def test_multi_token_answer_is_refused(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="params.correct=' Maryanne-Louise' is .* tokens"):
        answer_token_id(model, " Maryanne-Louise", "params.correct")


def test_patching_recovers_one_at_the_end_and_zero_before_the_difference(model) -> None:  # type: ignore[no-untyped-def]
    params = activation_patching.ActivationPatchingParams(clean=PROMPT, corrupted=CORRUPTED)
    result = activation_patching.compute(model, params, seed=0)
    n_pos = len(result.tokens)
    assert result.residual.shape == (model.cfg.n_layers + 1, n_pos)
    assert result.residual[-1, -1] == pytest.approx(1.0, abs=1e-4)
    clean_ids = model.to_tokens(PROMPT)[0]
    first_difference = int((clean_ids != model.to_tokens(CORRUPTED)[0]).nonzero()[0])
    assert first_difference > 0
    assert abs(result.residual[:, :first_difference]).max() < 1e-4
    assert result.heads.shape == (model.cfg.n_layers, model.cfg.n_heads)


def test_patching_refuses_prompts_of_different_lengths(model) -> None:  # type: ignore[no-untyped-def]
    params = activation_patching.ActivationPatchingParams(clean=PROMPT, corrupted="When Mary went to the store, Mary gave a drink to")
    with pytest.raises(ParamError, match="same token length"):
        activation_patching.check(model, params)
