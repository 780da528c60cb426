"""The attention experiment against transformers' own attention weights, its tokenisation, and
the figure whose colour bars must name the layers its lines are drawn in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from transformers import AutoModelForCausalLM
from unraveled.experiments import attention

from tests.helpers.models import SharedTinyModels
from unraveled.config import load_config

PROMPT = "Alice gave Bob a goose, and he gave her a duck."


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir: Path, tiny_model: SharedTinyModels):  # type: ignore[no-untyped-def]
    return tiny_model(tiny_gpt2_dir, attention.EXPERIMENT.weights)


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_raw_weights_give_what_folded_and_centred_weights_give(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    # The experiment reads raw weights (as the original does, and as the other seed-parity configs
    # do, so a run converts the model once); folding and centring must not change what it reports.
    assert attention.EXPERIMENT.weights == "raw"
    folder = request.getfixturevalue(checkpoint)
    params = attention.AttentionParams(prompt=PROMPT)
    raw, processed = (
        attention.compute(tiny_model(folder, kind), params, seed=0) for kind in ("raw", "processed")
    )
    assert raw.tokens == processed.tokens
    for field in (
        "patterns",
        "to_first_token",
        "from_last_token",
        "entropy",
        "sink",
        "next_token_loss",
    ):
        np.testing.assert_allclose(
            getattr(raw, field), getattr(processed, field), rtol=1e-4, atol=1e-5, err_msg=field
        )


def test_default_tokenisation_is_the_originals_without_bos(
    tiny_gpt2, tiny_gpt2_dir: Path, gpt2_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    assert load_config("attention").params.prepend_bos is False
    assert attention.AttentionParams().prepend_bos is False
    assert tiny_gpt2.cfg.default_prepend_bos  # the model alone would prepend BOS
    result = attention.compute(tiny_gpt2, attention.AttentionParams(prompt=PROMPT), seed=0)
    expected_tokens = [gpt2_tokenizer.decode([i]) for i in gpt2_tokenizer(PROMPT).input_ids]
    assert result.tokens == expected_tokens and result.tokens[0] == "Alice"
    metrics = result.metrics()
    assert metrics["prepend_bos"] is False and metrics["first_token"] == "Alice"
    with_bos = attention.compute(
        tiny_gpt2, attention.AttentionParams(prompt=PROMPT, prepend_bos=True), seed=0
    )
    assert with_bos.tokens == ["<|endoftext|>", *expected_tokens]
    # Against transformers' own attention weights on the same tokens.
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        weights = torch.stack(
            hf(torch.tensor([gpt2_tokenizer(PROMPT).input_ids]), output_attentions=True).attentions
        )[:, 0]
    np.testing.assert_allclose(result.to_first_token, weights[..., 0].mean(dim=1), atol=1e-5)
    np.testing.assert_allclose(result.sink, weights[:, :, 1:, 0].mean(dim=-1), atol=1e-5)
    np.testing.assert_allclose(result.from_last_token, weights[:, :, -1].mean(dim=1), atol=1e-5)


def test_layer_wise_colour_bars_show_the_line_colours(tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    result = attention.compute(tiny_gpt2, attention.AttentionParams(prompt=PROMPT), seed=0)
    figure = next(
        a for a in attention.render(result) if getattr(a, "name", "") == "05_layer_wise_attention"
    ).figure
    lines = figure.axes[0].get_lines()
    colour_bars = {axes.get_ylabel(): axes._colorbar for axes in figure.axes[1:]}
    n_layers = len(result.patterns)
    for label, style in (
        ("layer (attention to the first token)", "-"),
        ("layer (attention of the last token)", "--"),
    ):
        drawn = [line for line in lines if line.get_linestyle() == style]
        assert len(drawn) == n_layers
        bar = colour_bars[label]
        for layer, line in enumerate(drawn):
            # The colour the bar shows at this layer is the colour of that layer's line.
            np.testing.assert_allclose(
                bar.cmap(bar.norm(layer)), to_rgba(line.get_color()), atol=1e-12
            )
        assert list(bar.get_ticks())[:2] == [0, 1]
