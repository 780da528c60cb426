"""Figure helpers: token tick labels stay short enough that the plots keep their room."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from transformers import GPT2TokenizerFast
from unraveled.experiments.attention import AttentionResult, render

from unraveled.render.figures import token_label


@pytest.mark.parametrize(
    ("token", "label"),
    [
        (" goose", " goose"),
        ("\n\n", "\\n\\n"),
        (" " + "-" * 40, " -----------…"),
        ("<|endoftext|>", "<|endoftext|>"),
        ("abcdefghijklmn", "abcdefghijkl…"),
    ],
)
def test_token_label_escapes_and_cuts_at_thirteen_characters(token: str, label: str) -> None:
    assert token_label(token) == label


def _heatmap_panel(tokens: list[str]) -> tuple[float, bool]:
    """The first heatmap's width (share of the figure) in the attention figure of ``tokens``, and
    whether every tick label lies inside the figure."""
    n, layers = len(tokens), 12
    causal = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    result = AttentionResult(
        tokens=tokens,
        head=0,
        patterns=np.broadcast_to(causal, (layers, 1, n, n)).copy(),
        to_first_token=np.zeros((layers, n)),
        from_last_token=np.zeros((layers, n)),
        entropy=np.zeros((layers, 1)),
        sink=np.zeros((layers, 1)),
        next_token_loss=np.zeros(n - 1),
        prompt="".join(tokens),
        prepend_bos=False,
    )
    figure = next(iter(render(result))).figure
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    inside = figure.bbox.padded(1)
    labels = [
        label
        for axes in figure.axes[:layers]
        for label in [*axes.get_xticklabels(), *axes.get_yticklabels()]
    ]
    fits = all(
        inside.contains(*extent.min) and inside.contains(*extent.max)
        for extent in (label.get_window_extent(renderer) for label in labels)
    )
    return figure.axes[0].get_position().width, fits


def test_gpt2_s_longest_token_leaves_the_attention_heatmaps_their_room(
    gpt2_tokenizer: GPT2TokenizerFast,
) -> None:
    longest = max(
        (gpt2_tokenizer.decode([index]) for index in range(gpt2_tokenizer.vocab_size)), key=len
    )
    assert len(longest) > 60
    short_width, short_fits = _heatmap_panel(["Alice", " gave", " Bob", " a", " goose"])
    width, fits = _heatmap_panel(["Alice", " gave", longest, " a", " goose"])
    assert short_fits and fits
    assert width >= 0.7 * short_width
