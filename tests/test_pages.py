"""The report's pages from hand-built run folders: story order, run pages, view grids, compare
pairing, escaping, weight; and ``--format`` parsing. No model needed: pages read only files."""

from __future__ import annotations

import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from unraveled.cli import main
from unraveled.render.export import parse_formats
from unraveled.render.pages import STORY_ORDER, write_pages

REASON = "model 'gpt2' is not in the Hugging Face cache and the hub did not answer"


def write_run(
    out: Path,
    slug: str,
    config: str,
    *,
    experiment: str | None = None,
    figures: tuple[str, ...] = ("01_first",),
    metrics: dict[str, Any] | None = None,
    views: list[dict[str, Any]] | None = None,
    fallback: bool = False,
    description: str = "What this run shows.",
) -> Path:
    """A run folder as the runner leaves it: figures (PNG, PDF), thumbnails, metrics, manifest."""
    run_dir = out / slug / config
    (run_dir / "figures").mkdir(parents=True)
    (run_dir / "thumbs").mkdir()
    records = []
    for number, name in enumerate(figures):
        Image.new("RGB", (40, 30), (40 * number % 255, 90, 200)).save(
            run_dir / "figures" / f"{name}.png"
        )
        Image.new("RGB", (20, 15), (40 * number % 255, 90, 200)).save(
            run_dir / "thumbs" / f"{name}.jpg"
        )
        (run_dir / "figures" / f"{name}.pdf").write_bytes(b"%PDF-1.4\n")
        records.append(
            {
                "file": f"figures/{name}.png",
                "caption": f"Caption of {name} <b>bold?</b>",
                "formats": {"png": f"figures/{name}.png", "pdf": f"figures/{name}.pdf"},
                "thumbnail": f"thumbs/{name}.jpg",
            }
        )
    for view in views or []:
        (run_dir / view["file"]).parent.mkdir(exist_ok=True)
        (run_dir / view["file"]).write_text("<html></html>")
    (run_dir / "metrics.json").write_text(json.dumps(metrics or {"score": 0.5}))
    manifest = {
        "config": config,
        "config_file": f"configs/{config}.yaml",
        "title": f"Title of {config}",
        "description": description,
        "resolved_config": {
            "experiment": experiment or config,
            "description": description,
            "model": "gpt2",
            "seed": 7,
            "params": {"layer": 3},
        },
        "seed": 7,
        "model": {
            "requested": "gpt2" if fallback else slug,
            "used": slug,
            "label": f"{slug} (fallback: gpt2 unavailable)" if fallback else slug,
            "is_fallback": fallback,
            "fallback_reason": REASON if fallback else None,
            "loaded_from": f"somewhere/{slug}",
            "from_weight_cache": True,
            "weights": "processed",
            "load_seconds": 1.25,
            "architecture": "GPT2LMHeadModel",
            "n_layers": 30,
            "n_heads": 9,
            "d_model": 576,
            "d_vocab": 100,
        },
        "created": "2026-11-25T09:00:00+00:00",
        "timings_seconds": {"compute": 1.5, "render": 2.25, "total": 3.75},
        "figures": records,
        "views": views or [],
        "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"},
        "git_commit": "0123abcd" * 5,
        "peak_memory_mb": 812.5,
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.targets += [
            value
            for name, value in attrs
            if name in {"href", "src"} and value and not value.startswith("#")
        ]
        if tag == "section" and found.get("id"):
            self.sections.append(str(found["id"]))


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.count += tag == "script"


def parsed(page: Path) -> _Links:
    links = _Links()
    links.feed(page.read_text())
    return links


def assert_links_resolve(page: Path) -> None:
    for target in parsed(page).targets:
        assert (page.parent / target.split("#")[0]).is_file(), (
            f"{page.name} links to missing {target}"
        )


def test_index_sections_follow_the_story_then_new_experiments_alphabetically(
    tmp_path: Path,
) -> None:
    shuffled = [
        "zeta_probe",
        "mlp",
        "causal_tracing",
        "embeddings",
        "alpha_probe",
        "activation_patching",
        "corpus_atlas",
        "attention",
        "ioi_circuit",
    ]
    for experiment in shuffled:
        write_run(tmp_path, "gpt2", experiment)
    write_pages(tmp_path)
    expected = [
        "embeddings",
        "attention",
        "mlp",
        "activation_patching",
        "corpus_atlas",
        "ioi_circuit",
        "causal_tracing",
        "alpha_probe",
        "zeta_probe",
    ]
    assert parsed(tmp_path / "index.html").sections == expected
    assert STORY_ORDER.index("activation_patching") < STORY_ORDER.index("corpus_atlas")
    # The table of contents lists them in the same order.
    toc = (tmp_path / "index.html").read_text().split("</nav>")[0]
    assert re.findall(r'href="#([a-z_]+)"', toc) == expected
    assert_links_resolve(tmp_path / "index.html")


def test_story_order_goes_by_experiment_not_config_name(tmp_path: Path) -> None:
    write_run(tmp_path, "gpt2", "a_second_look", experiment="token_journey")
    write_run(tmp_path, "gpt2", "zz_layers", experiment="layernorm")
    write_pages(tmp_path)
    assert parsed(tmp_path / "index.html").sections == ["zz_layers", "a_second_look"]


def test_run_page_shows_figures_facts_metrics_and_files(tmp_path: Path) -> None:
    values = [float(v) for v in np.linspace(-3.0, 5.0, 97)]
    metrics = {
        "loss": 2.5,
        "per_layer": values,
        "tokens": ["a", " b"],
        "grid": [[1, 2, 3], [4, 5, 6]],
        "nested": {"inner": {"deep_value": 42, "deep_list": values}},
        "top_heads": [{"head": "3.1", "score": 0.9}, {"head": "0.2", "score": 0.5}],
        "not_applicable": {"position embeddings": "rotary"},
    }
    run_dir = write_run(
        tmp_path, "gpt2", "attention", figures=("01_a", "02_b", "03_c"), metrics=metrics
    )
    write_pages(tmp_path)
    page = run_dir / "index.html"
    html = page.read_text()
    assert re.findall(r'<img src="([^"]+)"', html) == [
        "figures/01_a.png",
        "figures/02_b.png",
        "figures/03_c.png",
    ]
    assert html.count("<figcaption>") == 3 and "Caption of 02_b &lt;b&gt;bold?&lt;/b&gt;" in html
    for name in ("01_a", "02_b", "03_c"):
        assert f'href="figures/{name}.pdf"' in html and f'id="fig-{name}"' in html
    assert 'href="metrics.json"' in html and 'href="manifest.json"' in html
    assert (
        "0123abcd" * 5 in html
        and "2.13.0+cpu" in html
        and "somewhere/gpt2" in html
        and "peak_memory_mb" in html
    )
    # The long array is summarised with its own statistics, not dumped.
    assert (
        f"97 values: min {min(values):.4g}, mean {np.mean(values):.4g}, max {max(values):.4g}"
        in html
    )
    assert f"{values[40]:.4g}," not in html
    assert "2×3 values: min 1, mean 3.5, max 6" in html  # noqa: RUF001 - a shape's times sign
    assert '["a", " b"]' in html.replace("&#34;", '"')
    # Nested metrics and lists of records fold away in <details>.
    nested = html.split("<code>nested</code>")[1].split("</details>")[0]
    assert "<code>inner</code>" in nested and "deep_value" in nested
    records = html.split("<code>top_heads</code>")[1].split("</details>")[0]
    assert re.findall(r"<td[^>]*><bdi>([^<]+)</bdi></td>", records) == ["3.1", "0.9", "0.2", "0.5"]
    assert "Not applicable: position embeddings: rotary" in html
    assert_links_resolve(page)


def test_layer_views_become_a_grid_of_layer_numbers(tmp_path: Path) -> None:
    views = [
        {
            "file": f"views/attention_layer_{layer:02d}.html",
            "title": f"Attention heads of layer {layer}",
            "bytes": 1_300_000,
        }
        for layer in range(30)
    ]
    views.insert(3, {"file": "views/token_loss.html", "title": "Per-token loss", "bytes": 2_000})
    views.append(
        {
            "file": "views/attention_all_layers.html",
            "title": "Attention heads of every layer",
            "bytes": 1_900_000,
        }
    )
    run_dir = write_run(tmp_path, "gpt2", "attention", views=views)
    write_pages(tmp_path)
    for page in (run_dir / "index.html", tmp_path / "index.html"):
        html = page.read_text()
        grid = re.search(r'<span class="layers">(.*?)</span>', html, re.S)
        assert grid is not None and re.findall(r">(\d+)</a>", grid.group(1)) == [
            str(layer) for layer in range(30)
        ]
        assert (
            html.count("Attention heads, per layer") == 1
            and ">Attention heads of layer 7<" not in html
        )
        assert ">Per-token loss<" in html and ">Attention heads of every layer<" in html
        assert_links_resolve(page)


def test_fallback_runs_are_marked_on_every_page(tmp_path: Path) -> None:
    write_run(tmp_path, "smollm2-135m", "attention", fallback=True)
    write_run(tmp_path, "tiny-gpt2", "attention")
    write_pages(tmp_path)
    for page in ("index.html", "smollm2-135m/attention/index.html", "compare/attention.html"):
        html = (tmp_path / page).read_text()
        assert (
            "Fallback model." in html
            and REASON.replace("'", "&#39;") in html
            and "fallback for <bdi>gpt2</bdi>" in html
        ), page
    assert "Fallback model." not in (tmp_path / "tiny-gpt2/attention/index.html").read_text()


def test_compare_pairs_figures_by_name_and_shows_gaps(tmp_path: Path) -> None:
    write_run(
        tmp_path,
        "model-a",
        "embeddings",
        figures=("01_tokens", "02_positions", "03_pca"),
        metrics={"rank": 3, "shape": [10, 4], "only_a": 1.0},
    )
    write_run(
        tmp_path,
        "model-b",
        "embeddings",
        figures=("01_tokens", "03_pca", "04_extra"),
        metrics={"rank": 5, "shape": [20, 4]},
    )
    write_run(tmp_path, "model-a", "mlp")
    write_pages(tmp_path)
    page = tmp_path / "compare" / "embeddings.html"
    html = page.read_text()
    rows = {
        name: body
        for name, body in re.findall(
            r'<section class="figure" id="fig-([^"]+)">(.*?)</section>', html, re.S
        )
    }
    assert list(rows) == ["01_tokens", "02_positions", "03_pca", "04_extra"]

    def cells(body: str) -> list[str]:
        return [
            src or "gap"
            for src, _ in re.findall(r'<img src="([^"]+)"|(not drawn for this model)', body)
        ]

    assert cells(rows["01_tokens"]) == [
        "../model-a/embeddings/figures/01_tokens.png",
        "../model-b/embeddings/figures/01_tokens.png",
    ]
    assert cells(rows["02_positions"]) == ["../model-a/embeddings/figures/02_positions.png", "gap"]
    assert cells(rows["03_pca"]) == [
        "../model-a/embeddings/figures/03_pca.png",
        "../model-b/embeddings/figures/03_pca.png",
    ]
    assert cells(rows["04_extra"]) == ["gap", "../model-b/embeddings/figures/04_extra.png"]
    table = {
        name: values for name, values in re.findall(r"<tr><td>([a-z_]+)</td>(.*?)</tr>", html, re.S)
    }
    assert re.findall(r"<td><bdi>([^<]*)</bdi></td>", table["rank"]) == ["3", "5"]
    assert re.findall(r"<td><bdi>([^<]*)</bdi></td>", table["shape"]) == ["[10, 4]", "[20, 4]"]
    assert re.findall(r"<td><bdi>([^<]*)</bdi></td>", table["only_a"]) == ["1", ""]
    # Only configs present on two models get a compare page, and the index links it.
    assert not (tmp_path / "compare" / "mlp.html").exists()
    assert 'href="compare/embeddings.html"' in (tmp_path / "index.html").read_text()
    assert_links_resolve(page)


def test_stale_compare_page_goes_when_the_second_model_does(tmp_path: Path) -> None:
    write_run(tmp_path, "model-a", "mlp")
    second = write_run(tmp_path, "model-b", "mlp")
    write_pages(tmp_path)
    assert (tmp_path / "compare" / "mlp.html").is_file()
    for file in sorted(second.rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    second.rmdir()
    write_pages(tmp_path)
    assert not (tmp_path / "compare" / "mlp.html").exists()
    assert "compare/mlp.html" not in (tmp_path / "index.html").read_text()
    assert (
        "compare"
        not in (tmp_path / "model-a" / "mlp" / "index.html").read_text().split("<main>")[1]
    )


def test_pages_escape_what_they_show(tmp_path: Path) -> None:
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    write_run(tmp_path, "model-a", "mlp", description=hostile, metrics={hostile: hostile})
    write_run(tmp_path, "model-b", "mlp", description=hostile)
    write_pages(tmp_path)
    for page in ("index.html", "model-a/mlp/index.html", "compare/mlp.html"):
        html = (tmp_path / page).read_text()
        assert "<script" not in html and "onerror=alert" not in html.replace(
            "&lt;img src=x onerror=alert(1)&gt;", ""
        )
        assert "&lt;script&gt;" in html, page


def test_index_stays_light_and_offline(tmp_path: Path) -> None:
    views = [
        {
            "file": f"views/attention_layer_{layer:02d}.html",
            "title": f"Attention heads of layer {layer}",
            "bytes": 1_300_000,
        }
        for layer in range(30)
    ]
    big_metrics = {"per_token": [[0.1] * 500] * 200}
    for experiment in STORY_ORDER:
        for slug in ("gpt2", "smollm2-135m"):
            write_run(
                tmp_path,
                slug,
                experiment,
                figures=tuple(f"{n:02d}_figure" for n in range(8)),
                views=views,
                metrics=big_metrics,
            )
    index = write_pages(tmp_path)
    html = index.read_text()
    assert len(html.encode()) < 250_000, len(html.encode())
    assert (
        "data:" not in html
        and "<script" not in html
        and not re.search(r"""(src|href)="https?:""", html)
    )
    # Thumbnails, not the figures themselves, and loaded lazily.
    images = re.findall(r"<img [^>]*>", html)
    assert len(images) == len(STORY_ORDER) * 2 * 8
    assert all("/thumbs/" in image and 'loading="lazy"' in image for image in images)


def test_unreadable_run_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_run(tmp_path, "gpt2", "mlp")
    broken = write_run(tmp_path, "gpt2", "attention")
    (broken / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="unraveled"):
        write_pages(tmp_path)
    assert parsed(tmp_path / "index.html").sections == ["mlp"]
    assert any("attention" in record.getMessage() for record in caplog.records)


def test_format_option_is_parsed_and_checked() -> None:
    assert parse_formats([]) == ("png",)
    assert parse_formats(["svg, PNG", "pdf", "svg"]) == ("svg", "png", "pdf")
    with pytest.raises(ValueError, match=r"unknown figure format 'jpg'.*png, svg, pdf"):
        parse_formats(["png,jpg"])


def test_bad_format_exits_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", "attention", "--format", "png,tiff", "--out", str(out)]) == 2
    assert "unknown figure format 'tiff'" in capsys.readouterr().err
    assert not out.exists()


def test_view_page_keeps_hostile_tokens_inside_their_script(tmp_path: Path) -> None:
    from unraveled.render.views import colored_tokens, page

    tokens = ["</script><script>alert(1)</script>", "<!--", "x"]
    html = page(
        "Loss <of> tokens",
        {"prompt": "</script>"},
        [colored_tokens(tokens, [0.1, 0.2, 0.3], "a <heading>")],
        "../index.html",
        "../run.html",
    )
    # An HTML parser sees two script elements, the bundle and the render call, whatever the tokens
    # say.
    scripts = _Scripts()
    scripts.feed(html)
    assert scripts.count == 2 and html.count("</script>") == 2
    assert "&lt;of&gt;" in html and "a &lt;heading&gt;" in html and 'href="../run.html"' in html
    props = html.split("CircuitsVis.ColoredTokens, ")[1].rsplit(");</script>", 1)[0]
    assert json.loads(props.replace("<\\/", "</").replace("<\\!--", "<!--"))["tokens"] == tokens


def test_save_figure_writes_each_format_and_a_thumbnail(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from unraveled.render.export import THUMBNAIL_WIDTH, save_figure

    figure = Figure(figsize=(6, 2))
    figure.add_subplot().plot([0, 1, 2], [2, 0, 1])
    record = save_figure(figure, tmp_path, "01_line", "A line", ("png", "pdf"), dpi=100)
    assert record == {
        "file": "figures/01_line.png",
        "caption": "A line",
        "formats": {"png": "figures/01_line.png", "pdf": "figures/01_line.pdf"},
        "thumbnail": "thumbs/01_line.jpg",
    }
    with (
        Image.open(tmp_path / "figures/01_line.png") as png,
        Image.open(tmp_path / "thumbs/01_line.jpg") as thumb,
    ):
        assert thumb.format == "JPEG" and thumb.width == THUMBNAIL_WIDTH
        assert abs(thumb.height - png.height * THUMBNAIL_WIDTH / png.width) <= 1
    assert (tmp_path / "figures/01_line.pdf").read_bytes()[:5] == b"%PDF-"
    # Without a PNG, the pages show the SVG; with neither, the first format, and the index still
    # has a thumbnail.
    assert (
        save_figure(figure, tmp_path, "02_svg", "", ("pdf", "svg"), dpi=100)["file"]
        == "figures/02_svg.svg"
    )
    only_pdf = save_figure(figure, tmp_path, "03_pdf", "", ("pdf",), dpi=100)
    assert (
        only_pdf["file"] == "figures/03_pdf.pdf" and not (tmp_path / "figures/03_pdf.png").exists()
    )
    with Image.open(tmp_path / only_pdf["thumbnail"]) as thumb:
        assert thumb.width == THUMBNAIL_WIDTH


def _edit_manifest(run_dir: Path, **changes: Any) -> None:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "model":
            manifest["model"].update(value)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


class _Isolation(HTMLParser):
    """Each text run holding a bidi control, with the tags open around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.found: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in {"meta", "img", "link", "br", "input"}:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(tag) :]

    def handle_data(self, data: str) -> None:
        if "\u202e" in data:
            self.found.append((data, list(self.stack)))


def test_user_text_with_a_right_to_left_override_is_isolated(tmp_path: Path) -> None:
    for slug in ("model-a", "model-b"):
        run_dir = write_run(tmp_path, slug, "attention")
        _edit_manifest(
            run_dir,
            model={
                "used": f"ck/\u202e{slug}",
                "requested": f"ck/\u202e{slug}",
                "loaded_from": f"local checkpoint (ck/\u202e{slug})",
            },
        )
    write_pages(tmp_path)
    pages = [
        tmp_path / "model-a" / "attention" / "index.html",
        tmp_path / "compare" / "attention.html",
    ]
    for page in pages:
        isolation = _Isolation()
        isolation.feed(page.read_text())
        assert isolation.found, page
        # The override reverses only the text inside its <bdi>, never what follows in the cell.
        assert all(stack[-1] == "bdi" for _, stack in isolation.found), (page, isolation.found)
    html = pages[0].read_text()
    assert (
        "<td><bdi>local checkpoint (ck/\u202emodel-a)</bdi> "
        '<span class="muted">(converted weights read from the cache)</span></td>' in html
    )


def test_overridden_runs_are_marked_and_described_as_they_ran(tmp_path: Path) -> None:
    write_run(tmp_path, "model-a", "logit_lens", description='The logit lens on "When Mary".')
    changed = write_run(tmp_path, "model-b", "logit_lens", description='The logit lens on "Paris".')
    _edit_manifest(changed, overrides={"params.layer": 3})
    write_pages(tmp_path)
    run_page = (tmp_path / "model-b" / "logit_lens" / "index.html").read_text()
    assert (
        "overridden: params.layer from --set" in run_page
        and "<strong>Overridden.</strong>" in run_page
    )
    assert re.search(
        r"<tr class=overridden><td>params.layer</td>"
        r'<td><bdi>3</bdi> <span class="badge overridden">--set</span></td></tr>',
        run_page,
    )
    assert "overridden:" not in (tmp_path / "model-a" / "logit_lens" / "index.html").read_text()
    # The runs differ: each row of the index and the compare page says what its own run shows.
    for page in (tmp_path / "index.html", tmp_path / "compare" / "logit_lens.html"):
        html = page.read_text()
        assert (
            html.count("The logit lens on &#34;When Mary&#34;.") == 1
            and html.count("The logit lens on &#34;Paris&#34;.") == 1
        ), page
        assert "overridden: params.layer from --set" in html, page


def test_shared_description_is_shown_once(tmp_path: Path) -> None:
    for slug in ("model-a", "model-b"):
        write_run(tmp_path, slug, "logit_lens", description="Same for both.")
    write_pages(tmp_path)
    assert (tmp_path / "index.html").read_text().count("Same for both.") == 1
    assert (tmp_path / "compare" / "logit_lens.html").read_text().count("Same for both.") == 1


def test_the_index_names_the_original_analysis_once(tmp_path: Path) -> None:
    write_run(tmp_path, "gpt2", "embeddings")
    html = write_pages(tmp_path).read_text()
    assert html.count("GPT-2 Unraveled") == 1 and html.count("Massimiliano Viola") == 1
    assert "github.com/massimilianoviola/gpt2-unraveled" in html


def test_fallback_banner_says_what_the_bundled_weights_are(tmp_path: Path) -> None:
    note = "the bundled weights are SmolLM2-135M-Instruct, quantized to 4 bits (GGUF Q4_1)"
    _edit_manifest(
        write_run(tmp_path, "smollm2-135m", "embeddings", fallback=True),
        model={"weights_note": note},
    )
    _edit_manifest(write_run(tmp_path, "smollm2-135m", "mlp"), model={"weights_note": note})
    write_pages(tmp_path)
    banner = re.search(
        r'<div class="banner"><strong>Fallback model.</strong>(.*?)</div>',
        (tmp_path / "smollm2-135m" / "embeddings" / "index.html").read_text(),
    )
    assert banner is not None and f", and {note}." in banner.group(1)
    assert f"Note that {note}." in (tmp_path / "index.html").read_text()
    # Not a fallback, the same weights: said as a note.
    assert f"Weights: {note}." in (tmp_path / "smollm2-135m" / "mlp" / "index.html").read_text()
