"""Self-contained circuitsvis pages: the bundle inlined once, no network, model and prompt named."""

from __future__ import annotations

import re
from pathlib import Path

from unraveled.cli import main
from unraveled.render.views import circuitsvis_bundle


def test_attention_views_are_self_contained(tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", "attention", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    views = out / "tiny-gpt2" / "attention" / "views"
    names = sorted(p.name for p in views.glob("*.html"))
    assert names == ["attention_all_layers.html", "attention_layer_00.html", "attention_layer_01.html", "token_loss.html"]
    bundle_marker = circuitsvis_bundle()[:200]
    for path in views.glob("*.html"):
        html = path.read_text()
        assert html.count(bundle_marker) == 1, path.name
        assert not re.search(r"""(src|href)\s*=\s*["']https?:""", html) and "unpkg.com" not in html and "import " not in html.split("<script>", 1)[0]
        assert "tiny-gpt2" in html and "Alice gave Bob a goose" in html
        assert 'href="../../../index.html"' in html
    all_layers = (views / "attention_all_layers.html").read_text()
    assert all_layers.count("CircuitsVis.render(") == 2 and all_layers.count("CircuitsVis.AttentionHeads") == 2
    assert "attention_layer_00.html" in (out / "index.html").read_text()
