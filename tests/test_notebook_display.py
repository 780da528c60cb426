"""Figures and views shown inline in Jupyter: offline, the circuitsvis bundle once per kernel."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest
from IPython.core.formatters import DisplayFormatter
from matplotlib.figure import Figure as MplFigure
from PIL import Image

from tests.helpers.browser import console_messages
from unraveled.experiment import Figure, View
from unraveled.render import notebook
from unraveled.render.views import attention_heads, circuitsvis_bundle, colored_tokens

Browser = Callable[..., CompletedProcess[str]]


@pytest.fixture(autouse=True)
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts as a kernel that has shown no view yet."""
    monkeypatch.setattr(notebook, "_state", {"bundle_shown": False, "every_view": False})
    yield


def _views() -> tuple[View, View]:
    patterns = np.random.default_rng(0).random((4, 3, 3)).astype(np.float32)
    attention = View(
        "attention",
        "Attention, layer 0",
        [attention_heads(patterns, ["Alice", " met", " Bob"], "Layer 0")],
        {"prompt": "Alice met Bob"},
    )
    tokens = View(
        "token_loss",
        "Loss per token",
        [colored_tokens(["Zebra", "quokka", "</script>"], [0.5, -1.0, 2.0], "Loss")],
    )
    return attention, tokens


def test_two_views_carry_the_bundle_once_and_nothing_from_the_network() -> None:
    first, second = (DisplayFormatter().format(view)[0]["text/html"] for view in _views())
    bundle = circuitsvis_bundle()
    assert (first + second).count(bundle) == 1 and bundle in first
    assert len(second) < 20_000  # data only
    for html in (first, second):
        assert not re.search(r"""(src|href)\s*=\s*["']https?:""", html) and "unpkg" not in html
    # A literal </script> in a token can't end the script early.
    assert "</script>" not in second.split('["Zebra"')[1].split("]")[0]
    # Re-emitting the bundle (its output cleared) and showing each view with its own copy.
    assert bundle in notebook.bundle_html()
    notebook.bundle_every_view()
    assert all(bundle in view._repr_html_() for view in _views())


def _drawn(dumped: CompletedProcess[str]) -> str:
    """The page's DOM as the browser left it, without the scripts' own text."""
    return re.sub(r"<script>.*?</script>", "", dumped.stdout, flags=re.DOTALL)


def _dump(browser: Browser, html: str, tmp_path: Path) -> CompletedProcess[str]:
    tmp_path.mkdir(exist_ok=True)
    page = tmp_path / "notebook.html"
    page.write_text(f"<!DOCTYPE html><html><body>{html}</body></html>", encoding="utf-8")
    return browser(page, tmp_path / "profile", "--dump-dom")


def test_two_views_outputs_render_offline_in_a_browser(browser: Browser, tmp_path: Path) -> None:
    attention, tokens = _views()
    dumped = _dump(browser, attention._repr_html_() + tokens._repr_html_(), tmp_path)
    dom = _drawn(dumped)
    assert console_messages(dumped) == []
    # circuitsvis drew a thumbnail canvas per head plus the zoomed head, and the coloured tokens.
    assert len(re.findall(r"<canvas", dom)) == 4 + 1
    assert "Zebra" in dom.split("Loss per token")[1] and "quokka" in dom
    assert "has not run here" not in dom  # the notes about a missing bundle were removed


def test_a_view_whose_bundle_output_was_cleared_says_so_and_draws_once_it_is_shown(
    browser: Browser, tmp_path: Path
) -> None:
    attention, tokens = _views()
    attention._repr_html_()  # shown, then its output cleared
    alone = tokens._repr_html_()
    assert circuitsvis_bundle() not in alone
    dumped = _dump(browser, alone, tmp_path / "cleared")
    assert "has not run here" in _drawn(dumped) and "quokka" not in _drawn(dumped)
    assert console_messages(dumped) == []
    # The bundle shown in a later cell draws the view waiting above it.
    dumped = _dump(browser, alone + notebook.bundle_html(), tmp_path / "reemitted")
    assert "quokka" in _drawn(dumped) and "has not run here" not in _drawn(dumped)
    assert console_messages(dumped) == []


def test_figure_shows_inline_as_png_with_its_caption() -> None:
    drawn = MplFigure(figsize=(2, 1))
    drawn.add_subplot().plot([0, 1], [1, 0])
    figure = Figure("01_line", drawn, caption="A line <falling>")
    data = DisplayFormatter().format(figure)[0]
    html = data["text/html"]
    assert "<figcaption>A line &lt;falling&gt;</figcaption>" in html
    embedded = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html)[1])
    assert Image.open(io.BytesIO(embedded)).size == Image.open(io.BytesIO(data["image/png"])).size
    width, height = Image.open(io.BytesIO(embedded)).size
    assert 150 <= width <= 260 and 80 <= height <= 160  # 2 x 1 inches at 100 dpi, labels added
