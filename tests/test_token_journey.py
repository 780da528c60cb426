"""Token journey: the original's inputs, the state labels shared with the logit lens, and the
predicted token, each checked against transformers or the original analysis's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from unraveled.experiments import logit_lens, token_journey

from tests.helpers.models import SharedTinyModels
from unraveled.analysis import state_labels
from unraveled.config import load_config

# The five sentences of the original analysis's spread figure (ORIGINAL-DEFAULTS.md).
ORIGINAL_SENTENCES = [
    "He killed two birds with one stone by taking a quick action",
    "She won the race and broke the record in her age group by ten seconds",
    "A rolling stone gathers no moss, it moves through hill and dale without a single pause",
    "Despite the stormy weather and the warning from the news, we ventured out into the dense "
    "forest, hoping to catch a glimpse of the rare wildlife species",
    "In the quiet moments of the evening, as the sun began to set over the distant hills, casting "
    "a golden glow on the shimmering lake, I found myself lost in thought, reflecting on the "
    "decisions of the past and how they had led me to this particular point in my life",
]


def test_spread_defaults_are_the_originals_five_sentences() -> None:
    assert token_journey.TokenJourneyParams().spread_sentences == ORIGINAL_SENTENCES
    params = load_config("token_journey").params
    assert params.spread_sentences == ORIGINAL_SENTENCES
    assert params.sentence == ORIGINAL_SENTENCES[0] and params.token_index == 5


def test_state_labels_follow_one_convention() -> None:
    assert state_labels(3) == ["embeddings", "after block 0", "after block 1", "after block 2"]
    assert state_labels(2, final_norm=True) == [
        "embeddings",
        "after block 0",
        "after block 1 + final norm",
    ]


@pytest.mark.umap
def test_state_i_is_what_block_i_minus_1_outputs_in_both_experiments(
    tiny_gpt2_dir: Path, gpt2_tokenizer, tiny_model: SharedTinyModels
) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(tiny_gpt2_dir, "raw")
    sentence = "He killed two birds with one stone"
    params = token_journey.TokenJourneyParams(
        sentence=sentence,
        token_index=2,
        umap_fit_tokens=60,
        spread_sentences=["A short one", "And another"],
    )
    journey = token_journey.compute(model, params, seed=0)
    lens = logit_lens.compute(
        model, logit_lens.LogitLensParams(prompt=sentence, prepend_bos=False), seed=0
    )
    n_layers = model.cfg.n_layers
    assert journey.metrics()["states"][:-1] == lens.point_labels[:-1] == state_labels(n_layers)[:-1]
    assert journey.metrics()["states"][-1] == f"after block {n_layers - 1} + final norm"
    # What transformers' blocks actually output, block by block.
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_hook(
            lambda _m, _i, out, b=b: outputs.__setitem__(
                b, out[0] if isinstance(out, tuple) else out
            )
        )
        for b, block in enumerate(hf.transformer.h)
    ]
    ids = torch.tensor([gpt2_tokenizer(sentence).input_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0]
        final_normed = hf.transformer.ln_f(outputs[n_layers - 1][0])
        decoded = {
            block: hf.lm_head(hf.transformer.ln_f(output[0])).softmax(-1)
            for block, output in outputs.items()
        }
    for hook in hooks:
        hook.remove()
    for state, label in enumerate(lens.point_labels):
        if label == "embeddings":
            continue
        block = int(label.removeprefix("after block "))
        assert block == state - 1
        # The lens at this state decodes exactly what that block wrote out.
        assert lens.final_prediction_prob[state] == pytest.approx(
            float(decoded[block][-1, int(logits[-1].argmax())]), abs=1e-5
        )
    # The journey's last state has the final norm applied, as transformers' last hidden state.
    cos = torch.nn.functional.cosine_similarity(
        final_normed, hf.transformer.wte.weight[ids[0]].detach(), dim=-1
    )
    torch.testing.assert_close(torch.tensor(journey.cos_own[-1]), cos.float(), atol=1e-5, rtol=1e-5)
    # The predicted token is transformers' argmax at the last position.
    assert journey.predicted_token == gpt2_tokenizer.decode([int(logits[-1].argmax())])
    assert lens.final_prediction == journey.predicted_token
