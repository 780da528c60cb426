"""circuitsvis pages: one shared copy of the bundle beside the pages, loaded by a relative
``<script src>``, the data per page; no network; model and prompt named; and a single-file
export of a view or a run page."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from unraveled.cli import main
from unraveled.render.export import self_contained_page
from unraveled.render.views import circuitsvis_bundle, write_shared_bundle


@pytest.fixture(scope="module")
def attention_run(
    tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, shared_weight_cache_dir: Path
) -> Path:
    out = tmp_path_factory.mktemp("views") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(shared_weight_cache_dir))
        assert main(["run", "attention", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    return out


def test_attention_views_load_one_shared_bundle(attention_run: Path) -> None:
    views = attention_run / "tiny-gpt2" / "attention" / "views"
    names = sorted(p.name for p in views.glob("*.html"))
    assert names == [
        "attention_all_layers.html",
        "attention_layer_00.html",
        "attention_layer_01.html",
        "token_loss.html",
    ]
    bundle_code = circuitsvis_bundle()
    # One copy, under OUT/assets, named by its content.
    (shared,) = (attention_run / "assets").iterdir()
    assert shared.read_text() == bundle_code
    assert shared.name == f"circuitsvis-{hashlib.sha256(bundle_code.encode()).hexdigest()[:16]}.js"
    for path in views.glob("*.html"):
        html = path.read_text()
        assert bundle_code[:200] not in html, path.name  # not inlined
        assert re.findall(r'<script src="([^"]+)"', html) == [f"../../../assets/{shared.name}"]
        assert (path.parent / f"../../../assets/{shared.name}").resolve() == shared.resolve()
        assert not re.search(r"""(src|href)\s*=\s*["']https?:""", html) and "unpkg.com" not in html
        assert "tiny-gpt2" in html and "Alice gave Bob a goose" in html
        assert 'href="../../../index.html"' in html
        assert len(html.encode()) < 200_000, path.name  # data only
    all_layers = (views / "attention_all_layers.html").read_text()
    assert (
        all_layers.count("CircuitsVis.render(") == 2
        and all_layers.count("CircuitsVis.AttentionHeads") == 2
    )
    assert "attention_layer_00.html" in (attention_run / "index.html").read_text()


def test_shared_bundle_is_written_once_and_a_damaged_copy_replaced(tmp_path: Path) -> None:
    path = write_shared_bundle(tmp_path / "assets")
    stamp = path.stat().st_mtime_ns
    assert (
        write_shared_bundle(tmp_path / "assets") == path and path.stat().st_mtime_ns == stamp
    )  # left alone
    path.write_text(circuitsvis_bundle()[:1000])  # cut short, as by a full disk
    write_shared_bundle(tmp_path / "assets")
    assert path.read_text() == circuitsvis_bundle()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_export_inlines_the_bundle_and_drops_links_a_lone_file_cant_follow(
    attention_run: Path, tmp_path: Path
) -> None:
    view = attention_run / "tiny-gpt2" / "attention" / "views" / "attention_layer_01.html"
    to = tmp_path / "shared.html"
    assert main(["export", str(view), "--to", str(to)]) == 0
    html = to.read_text()
    assert html.count(circuitsvis_bundle()[:200]) == 1 and "<script src" not in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", html)  # nothing outside the file
    assert (
        "<h1>Attention" in html
        and "Alice gave Bob a goose" in html
        and html.count("CircuitsVis.render(") == 1
    )


def test_export_of_a_run_page_inlines_its_figures(attention_run: Path, tmp_path: Path) -> None:
    page = attention_run / "tiny-gpt2" / "attention" / "index.html"
    html = self_contained_page(page)
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", html)


def test_export_refuses_what_it_cant_do_and_writes_nothing(
    attention_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    view = attention_run / "tiny-gpt2" / "attention" / "views" / "token_loss.html"
    mine = tmp_path / "mine.html"
    mine.write_text("a user's own file")
    assert main(["export", str(view), "--to", str(mine)]) == 2
    assert mine.read_text() == "a user's own file" and "never overwrites" in capsys.readouterr().err
    lone = tmp_path / "lone.html"  # a view copied out of its output folder, without assets/
    lone.write_text(view.read_text())
    assert main(["export", str(lone), "--to", str(tmp_path / "out.html")]) == 2
    assert "circuitsvis-" in capsys.readouterr().err and not (tmp_path / "out.html").exists()
    assert main(["export", str(tmp_path / "missing.html"), "--to", str(tmp_path / "out.html")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.html", "mine.html"]
