"""The HTML outputs in a real headless Chromium, with no network: views render, links resolve.

Skipped, saying why, where Chromium isn't installed (the ``browser`` fixture); ``.ci/run`` installs
it so CI runs these.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from subprocess import CompletedProcess
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from tests.helpers.browser import console_messages
from tests.helpers.cli import TwoModelReport

Browser = Callable[..., CompletedProcess[str]]


def test_console_check_catches_a_broken_page(browser: Browser, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><body><script>console.error("boom"); notDefined();</script></body></html>'
    )
    messages = console_messages(browser(page, tmp_path / "profile", "--dump-dom"))
    assert any("boom" in m for m in messages) and any(
        "Uncaught ReferenceError" in m for m in messages
    )


def test_attention_view_renders_offline(
    two_model_report: TwoModelReport, browser: Browser, tmp_path: Path
) -> None:
    page = two_model_report.out / "tiny-gpt2" / "attention" / "views" / "attention_layer_01.html"
    dumped = browser(page, tmp_path / "dom", "--dump-dom")
    dom = dumped.stdout
    assert console_messages(dumped) == []
    # circuitsvis drew one thumbnail canvas per head plus the zoomed head: the bundle ran offline.
    assert len(re.findall(r"<canvas", dom)) == 4 + 1
    assert all(f"L1H{head}" in dom for head in range(4))
    assert_not_blank(browser, page, tmp_path)


def test_exported_view_renders_alone_offline(
    two_model_report: TwoModelReport, browser: Browser, tmp_path: Path
) -> None:
    from unraveled.cli import main

    view = two_model_report.out / "tiny-gpt2" / "attention" / "views" / "attention_layer_01.html"
    alone = tmp_path / "elsewhere" / "shared.html"  # far from the output folder and its assets/
    alone.parent.mkdir()
    assert main(["export", str(view), "--to", str(alone)]) == 0
    dumped = browser(alone, tmp_path / "dom", "--dump-dom")
    assert console_messages(dumped) == []
    assert len(re.findall(r"<canvas", dumped.stdout)) == 4 + 1
    assert_not_blank(browser, alone, tmp_path)


def test_view_copied_without_its_assets_says_where_its_script_is(
    two_model_report: TwoModelReport, browser: Browser, tmp_path: Path
) -> None:
    view = two_model_report.out / "tiny-gpt2" / "attention" / "views" / "attention_layer_01.html"
    copied = tmp_path / "copied.html"
    copied.write_text(view.read_text())
    dom = browser(copied, tmp_path / "dom", "--dump-dom").stdout
    assert re.search(r'<p id="missing-script" class="missing">', dom)  # shown: no longer hidden
    assert "<canvas" not in dom and "unraveled export" in dom
    # In place, the notice stays hidden.
    shown = browser(view, tmp_path / "dom2", "--dump-dom").stdout
    assert re.search(r'<p id="missing-script" class="missing" hidden', shown)


class _Page(HTMLParser):
    """Links and element ids of a page as the browser built it."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.targets += [value for name, value in attrs if name in {"href", "src"} and value]
        self.ids.update(value for name, value in attrs if name == "id" and value)


def parsed(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def assert_not_blank(browser: Browser, page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    done = browser(page, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.is_file(), done.stderr
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"


@pytest.mark.parametrize(
    "page", ["index.html", "tiny-llama/attention/index.html", "compare/logit_lens.html"]
)
def test_report_page_renders_offline_and_every_link_resolves(
    two_model_report: TwoModelReport, browser: Browser, page: str, tmp_path: Path
) -> None:
    path = two_model_report.out / page
    dumped = browser(path, tmp_path / "dom", "--dump-dom")
    assert console_messages(dumped) == []
    dom = parsed(dumped.stdout)
    assert len(dom.targets) > 10
    for target in dom.targets:
        assert not re.match(r"[a-z]+:", target), f"{page} reaches outside the outputs: {target}"
        file, _, fragment = unquote(target).partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.is_file(), f"{page} links to missing {target}"
        if fragment:  # a link into a page lands on an element that exists there
            assert fragment in parsed(resolved.read_text()).ids, (
                f"{page} links to missing anchor {target}"
            )
    assert_not_blank(browser, path, tmp_path)


def test_index_contents_stay_in_view_while_scrolling(
    two_model_report: TwoModelReport, browser: Browser, tmp_path: Path
) -> None:
    # A copy of the index that scrolls to the bottom once loaded and reports where the contents are.
    probe = two_model_report.out / "sticky-probe.html"
    script = (
        '<script>addEventListener("load", () => { scrollTo(0, document.body.scrollHeight);'
        ' const nav = document.querySelector("nav.toc").getBoundingClientRect();'
        " document.title = `scrolled ${scrollY} nav ${nav.top} ${nav.bottom}`; });</script>"
    )
    probe.write_text(
        (two_model_report.out / "index.html").read_text().replace("</body>", script + "</body>")
    )
    try:
        dumped = browser(probe, tmp_path / "dom", "--dump-dom", "--window-size=1400,500")
    finally:
        probe.unlink()
    found = re.search(r"<title>scrolled (\d+) nav (-?[\d.]+) (-?[\d.]+)</title>", dumped.stdout)
    assert found is not None, dumped.stdout[:500]
    scrolled, top, bottom = (float(value) for value in found.groups())
    # Without position:sticky, top would be -scrolled.
    assert scrolled > 500 and abs(top) < 1 and bottom > 0
