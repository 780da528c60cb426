"""The SAE feature browser page: offline in headless Chromium, sorting and searching work, and
every browser page shares one script."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.browser import console_messages
from tests.helpers.sae_browse import tiny_sae
from unraveled.render import script_page
from unraveled.render.feature_browser import feature_browser_page, feature_href
from unraveled.sae.browser import BrowserSettings, FeatureBrowserData, feature_browser_data

HOOK = "blocks.1.hook_resid_pre"
SETTINGS = BrowserSettings(top_k=4, context_before=3, context_after=2)

# Run in the page after it drew: sort and search through its buttons and search box, and write
# what the list then shows into the DOM for --dump-dom to read.
PROBE = """<script>
const rows = () =>
  [...document.querySelectorAll("#fb-rows tr")].map((r) => Number(r.dataset.index));
const click = (key) => document.querySelector(`th button[data-sort="${key}"]`).click();
const box = document.getElementById("fb-search");
const type = (text) => { box.value = text; box.dispatchEvent(new Event("input")); };
const out = {};
click("density"); out.density_desc = rows();
click("density"); out.density_asc = rows();
click("max"); out.max_desc = rows();
click("index"); out.index = rows();
type("1"); out.search_1 = rows();
type(SEARCH_TOKEN); out.search_token = rows();
type(""); out.all = rows();
out.selected = window.featureBrowser.select(SELECTED) &&
  document.querySelector("#fb-detail h2").textContent;
out.contexts = document.querySelectorAll("#fb-contexts .fb-context").length;
out.bars = document.querySelectorAll("#fb-detail svg rect").length;
const topSpan = document.querySelector("#fb-contexts .fb-context .top");
out.top_title = topSpan.title; out.top_background = topSpan.style.background;
const pre = document.createElement("pre"); pre.id = "probe";
pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
</script>"""


@pytest.fixture(scope="module")
def browser_data(tiny_model, tiny_gpt2_dir: Path) -> FeatureBrowserData:  # type: ignore[no-untyped-def]
    model = tiny_model(tiny_gpt2_dir, "processed")
    sae = tiny_sae(model.cfg.d_model, d_sae=24, hook_name=HOOK, seed=0)
    windows = np.random.default_rng(0).integers(0, 1000, size=(6, 12))
    return feature_browser_data(model, sae, HOOK, windows, SETTINGS)


def _save(data: FeatureBrowserData, out: Path, name: str, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    page = feature_browser_page(data, SETTINGS.context_before, name=name, **kwargs)
    run = out / "tiny" / "sae_features"
    run.mkdir(parents=True, exist_ok=True)
    script_page.save(page, run, out / "assets", "../../../assets", "../../../index.html", "tiny")
    return run / "views" / f"{name}.html"


def test_browser_pages_share_one_script_and_hold_their_own_data(
    browser_data: FeatureBrowserData, tmp_path: Path
) -> None:
    first = _save(browser_data, tmp_path, "feature_browser")
    second = _save(browser_data, tmp_path, "feature_browser_few", features=[3, 1])
    assert [p.name for p in (tmp_path / "assets").iterdir()] == [
        re.search(r'src="\.\./\.\./\.\./assets/([^"]+)"', first.read_text()).group(1)  # type: ignore[union-attr]
    ]
    script = (tmp_path / "assets").iterdir().__next__().read_text()
    for page in (first, second):
        assert "drawPage" not in page.read_text().split("<script src")[0]  # no copy inline
    assert "function drawPage" in script
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', second.read_text()).group(1))  # type: ignore[union-attr]
    assert [f["index"] for f in data["features"]] == [3, 1]
    assert feature_href("feature_browser", 7) == "feature_browser.html#feature-7"


def test_browser_opens_offline_and_sorts_and_searches(
    browser_data: FeatureBrowserData, tmp_path: Path, browser
) -> None:  # type: ignore[no-untyped-def]
    data = browser_data
    page = _save(data, tmp_path, "feature_browser")
    plain = browser(page, tmp_path / "profile-plain", "--dump-dom")
    assert console_messages(plain) == []
    assert "Feature 0" in plain.stdout and "Top activating contexts" in plain.stdout
    # A token one feature's top context centres on, searched for.
    busiest = int(np.argmax(data.density))
    top_text = data.vocab[int(data.context_ids[0, busiest, SETTINGS.context_before])]
    probe = page.with_name("probe.html")
    probe.write_text(
        page.read_text().replace(
            "</body>",
            PROBE.replace("SEARCH_TOKEN", json.dumps(top_text.strip())).replace(
                "SELECTED", str(busiest)
            )
            + "</body>",
        )
    )
    run = browser(probe, tmp_path / "profile-probe", "--dump-dom")
    assert console_messages(run) == []
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', run.stdout).group(1))  # type: ignore[union-attr]
    d = data.d_sae
    index = np.arange(d)
    np.testing.assert_array_equal(found["density_desc"], np.lexsort((index, -data.density)))
    np.testing.assert_array_equal(found["density_asc"], np.lexsort((index, data.density)))
    np.testing.assert_array_equal(found["max_desc"], np.lexsort((index, -data.max_activation)))
    assert found["index"] == list(range(d)) == found["all"]
    assert found["search_1"] == [i for i in range(d) if str(i).startswith("1")]
    token_hits = found["search_token"]
    assert busiest in token_hits and len(token_hits) < d
    for hit in token_hits:  # each hit's top token or a promoted token holds the text
        texts = [data.vocab.get(int(data.context_ids[0, hit, SETTINGS.context_before]), "")]
        texts += [data.vocab[int(i)] for i in data.promoted_ids[hit]]
        assert any(top_text.strip().lower() in t.lower() for t in texts)
    assert found["selected"] == f"Feature {busiest}"
    assert found["contexts"] == int(np.isfinite(data.top_values[:, busiest]).sum()) > 0
    assert found["bars"] == data.histogram.shape[1]
    # The first context's top token: its activation in the tooltip, shaded by value / max.
    value = float(data.top_values[0, busiest])
    assert float(found["top_title"].rsplit(": ", 1)[1]) == pytest.approx(value, rel=0.01)
    # Chromium writes an opaque colour back as rgb(...), without the alpha.
    alpha_match = re.search(r"rgba\([^)]*, ([\d.]+)\)", found["top_background"])
    alpha = float(alpha_match.group(1)) if alpha_match else 1.0
    assert alpha == pytest.approx(value / data.max_activation[busiest], abs=0.011)
