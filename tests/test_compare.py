"""Several models in one invocation, end to end on the two tiny checkpoints: each model loaded
once, every figure in every format asked for, and compare pages that put each model's own
figure and numbers in its own column."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from tests.helpers.cli import TwoModelReport

MODELS = ["tiny-gpt2", "tiny-llama"]
CONFIGS = ["attention", "logit_lens"]


class _Cells(HTMLParser):
    """The compare page's figure rows: for each ``fig-NAME`` section, per model, the image shown."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str | None]] = {}
        self._row: str | None = None
        self._model: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "section" and (found.get("id") or "").startswith("fig-"):
            self._row = (found["id"] or "")[4:]
            self.rows[self._row] = {}
        elif tag == "figure" and self._row is not None and "data-model" in found:
            self._model = found["data-model"]
            self.rows[self._row][self._model or ""] = None
        elif tag == "img" and self._row is not None and self._model is not None:
            self.rows[self._row][self._model] = found.get("src")


def test_each_model_is_loaded_once_per_kind_of_weights_for_all_its_configs(
    two_model_report: TwoModelReport,
) -> None:
    # attention reads raw weights, logit_lens processed ones: the up-front check loads each model
    # in its first config's kind, and each model's run then loads the other kind once.
    assert two_model_report.loads == [
        ("tiny-gpt2", "raw"),
        ("tiny-llama", "raw"),
        ("tiny-gpt2", "processed"),
        ("tiny-llama", "processed"),
    ]
    assert all(
        (two_model_report.out / model / config / "manifest.json").is_file()
        for model in MODELS
        for config in CONFIGS
    )


def test_every_figure_is_saved_in_every_format_asked_for(two_model_report: TwoModelReport) -> None:
    run_dir = two_model_report.out / "tiny-llama" / "logit_lens"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    on_disk = sorted(p.stem for p in (run_dir / "figures").glob("*.png"))
    assert [Path(f["file"]).stem for f in manifest["figures"]] == on_disk and on_disk
    page = (run_dir / "index.html").read_text()
    for figure in manifest["figures"]:
        stem = Path(figure["file"]).stem
        assert figure["formats"] == {fmt: f"figures/{stem}.{fmt}" for fmt in ("png", "svg", "pdf")}
        assert (run_dir / f"figures/{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run_dir / f"figures/{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert "<svg" in (run_dir / f"figures/{stem}.svg").read_text()[:2000]
        assert all(f'href="figures/{stem}.{fmt}"' in page for fmt in ("png", "svg", "pdf"))


def test_compare_page_puts_each_models_own_figure_in_its_column(
    two_model_report: TwoModelReport,
) -> None:
    out = two_model_report.out
    for config in CONFIGS:
        cells = _Cells()
        cells.feed((out / "compare" / f"{config}.html").read_text())
        figures = {
            model: sorted(p.stem for p in (out / model / config / "figures").glob("*.png"))
            for model in MODELS
        }
        assert sorted(cells.rows) == figures["tiny-gpt2"] == figures["tiny-llama"]
        for name, row in cells.rows.items():
            assert row == {model: f"../{model}/{config}/figures/{name}.png" for model in MODELS}
        # The columns really differ: each figure carries the name of the model that drew it.
        name = next(iter(cells.rows))
        pictures = [
            (out / model / config / "figures" / f"{name}.png").read_bytes() for model in MODELS
        ]
        assert pictures[0] != pictures[1]


def test_compare_metrics_table_has_a_column_per_model(two_model_report: TwoModelReport) -> None:
    out = two_model_report.out
    html = (out / "compare" / "attention.html").read_text()
    header = re.search(r"<tr><th>metric</th>(.*?)</tr>", html, re.S)
    assert header is not None and re.findall(r"<th>([^<]+)", header.group(1)) == MODELS
    row = re.search(r"<tr><td>mean_next_token_loss</td>(.*?)</tr>", html, re.S)
    assert row is not None
    losses = [
        json.loads((out / model / "attention" / "metrics.json").read_text())["mean_next_token_loss"]
        for model in MODELS
    ]
    assert re.findall(r"<td><bdi>([^<]*)</bdi></td>", row.group(1)) == [
        f"{loss:.4g}" for loss in losses
    ]
    assert losses[0] != losses[1]


def test_index_links_the_compare_pages_and_every_run_page(two_model_report: TwoModelReport) -> None:
    index = (two_model_report.out / "index.html").read_text()
    assert all(f'href="compare/{config}.html"' in index for config in CONFIGS)
    assert all(
        f'href="{model}/{config}/index.html"' in index for model in MODELS for config in CONFIGS
    )
