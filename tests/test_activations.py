"""Activations: only the requested hooks are cached, and padding never leaks into results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.models import SharedTinyModels
from unraveled.activations import collect_activations

PROMPTS = ["A short one.", "A rather longer prompt, with several more tokens in it than the first."]


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_padded_batch_equals_single_prompt_runs(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    model = tiny_model(request.getfixturevalue(checkpoint), "processed")
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    batch = collect_activations(model, PROMPTS, hooks)
    assert set(batch.cache.keys()) == set(hooks)
    assert batch.lengths == [len(model.to_tokens(p)[0]) for p in PROMPTS]
    assert batch.lengths[0] < batch.lengths[1] and not batch.mask[0, batch.lengths[0] :].any()
    for index, prompt in enumerate(PROMPTS):
        single = collect_activations(model, [prompt], hooks)
        n = batch.lengths[index]
        torch.testing.assert_close(
            batch.cache[hooks[0]][index, :n], single.cache[hooks[0]][0], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            batch.cache[hooks[1]][index, :, :n, :n], single.cache[hooks[1]][0], atol=1e-6, rtol=1e-5
        )
        assert batch.str_tokens[index] == single.str_tokens[0]


def test_no_gradients_and_unknown_hooks_refused(
    tiny_gpt2_dir: Path, tiny_model: SharedTinyModels
) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    acts = collect_activations(model, ["hello"], ["blocks.0.hook_resid_pre"])
    assert not acts.cache["blocks.0.hook_resid_pre"].requires_grad and not acts.logits.requires_grad
    with pytest.raises(KeyError, match="unknown hook names"):
        collect_activations(model, ["hello"], ["blocks.9.hook_resid_pre"])


def test_activations_without_logits_are_the_same_activations(
    tiny_gpt2_dir: Path, tiny_model: SharedTinyModels
) -> None:
    """Leaving the logits out (they skip the unembedding) changes no cached activation; the
    logits asked for are the model's own."""
    model = tiny_model(tiny_gpt2_dir, "processed")
    hooks = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
    with_logits = collect_activations(model, PROMPTS, hooks)
    without = collect_activations(model, PROMPTS, hooks, logits=False)
    assert without.logits is None
    for name in hooks:
        assert torch.equal(without.cache[name], with_logits.cache[name]), name
    assert torch.equal(with_logits.logits, model(with_logits.tokens))
