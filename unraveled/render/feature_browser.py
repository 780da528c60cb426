"""The offline SAE feature browser: one page of every feature, drawn by one shared script.

The page lists the features (sortable by index, density and max activation; searchable by index
or by a token a feature fires on or promotes) and shows, for the feature picked, its top
activating contexts (tokens shaded by its activation, in hundredths of its largest, the top
token outlined), its activation histogram, and the tokens its decoder direction promotes and
suppresses. The script
(``templates/feature_browser.js``) is written once into the output folder's assets and shared by
every browser page; each page holds only its data. ``views/<name>.html#feature-<i>`` opens on
feature ``i`` (``feature_href``), for links from other pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from unraveled.render.script_page import ScriptPage
from unraveled.sae.browser import FeatureBrowserData

SCRIPT_STEM = "feature-browser"


@cache
def browser_script() -> str:
    """The browser's script, from the package's templates."""
    return (
        resources.files("unraveled.templates")
        .joinpath("feature_browser.js")
        .read_text(encoding="utf-8")
    )


def feature_href(page_name: str, feature: int) -> str:
    """The link to one feature of the browser page ``page_name``, from another page in views/."""
    return f"{page_name}.html#feature-{feature}"


def _round(values: Any, digits: int = 4) -> list[float]:
    """Values as floats of ``digits`` significant digits, all the page shows (smaller JSON)."""
    return [float(f"{float(v):.{digits}g}") for v in np.asarray(values).ravel()]


def feature_browser_page(
    data: FeatureBrowserData,
    context_before: int,
    name: str = "feature_browser",
    title: str | None = None,
    contexts: int = 10,
    features: Sequence[int] | None = None,
    facts: dict[str, str] | None = None,
) -> ScriptPage:
    """The browser page of ``data``'s features (all, or ``features``).

    Args:
        data: The browser's data (``unraveled.sae.browser.feature_browser_data``).
        context_before: Tokens before the top token in each context
            (``BrowserSettings.context_before``): marks the top token.
        name: The page's file stem (``views/<name>.html``).
        title: The page's title (default names the hook).
        contexts: Top contexts shown per feature (at most those kept).
        features: Which features to list (default all).
        facts: Lines shown at the top of the page, after the model.

    Returns:
        The page, for the runner to save (``unraveled.render.script_page.save``).
    """
    chosen = range(data.d_sae) if features is None else features
    shown_contexts = min(contexts, data.top_values.shape[0])
    entries = []
    for index in chosen:
        kept = [row for row in range(shown_contexts) if np.isfinite(data.top_values[row, index])]
        context_rows = []
        for row in kept:
            ids = data.context_ids[row, index]
            inside = ids >= 0
            centre = int(inside[:context_before].sum())  # the top token, past the -1 padding
            # In hundredths of the feature's max activation: all the shading resolves, and
            # a third of the page's bytes.
            scale = float(data.max_activation[index]) or 1.0
            hundredths = np.round(100 * data.context_values[row, index][inside] / scale)
            context_rows.append([ids[inside].tolist(), hundredths.astype(int).tolist(), centre])
        entries.append(
            {
                "index": int(index),
                "density": float(data.density[index]),
                "max": float(data.max_activation[index]),
                "mean": float(data.mean_activation[index]),
                "top": int(data.context_ids[0, index, context_before]) if kept else -1,
                "contexts": context_rows,
                "hist": data.histogram[index].tolist(),
                "promoted": [
                    [int(i), v]
                    for i, v in zip(
                        data.promoted_ids[index],
                        _round(data.promoted_logits[index]),
                        strict=True,
                    )
                ],
                "suppressed": [
                    [int(i), v]
                    for i, v in zip(
                        data.suppressed_ids[index],
                        _round(data.suppressed_logits[index]),
                        strict=True,
                    )
                ],
            }
        )
    shown_ids = {i for entry in entries for context in entry["contexts"] for i in context[0]}
    shown_ids |= {pair[0] for entry in entries for pair in entry["promoted"] + entry["suppressed"]}
    page_data = {
        "hook": data.hook_name,
        "n_tokens": data.n_tokens,
        "bin_edges": _round(data.bin_edges),
        "vocab": {str(i): data.vocab[i] for i in sorted(shown_ids)},
        "features": entries,
    }
    page_facts = {
        "hook": data.hook_name,
        "tokens": f"{data.n_tokens:,} in {data.n_windows:,} windows",
        "density": (
            "fraction of the tokens on which the feature is active (activation != 0); the "
            "prepended BOS and special tokens are not counted, as in training and evaluation"
        ),
        "contexts": (
            "the active tokens with the largest |activation|, shown signed (an AbsTopK SAE's "
            "strongest firings may be negative)"
        ),
        "logits": (
            "the decoder direction through the final norm's linear part and W_U, per unit of "
            "activation (the norm's per-token scale left out: it changes no ranking)"
        ),
        **(facts or {}),
    }
    return ScriptPage(
        name=name,
        title=title or f"SAE feature browser: {data.hook_name}",
        script_stem=SCRIPT_STEM,
        script=browser_script(),
        data=page_data,
        facts=page_facts,
    )
