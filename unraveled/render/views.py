"""Self-contained circuitsvis pages: the JavaScript bundle inlined once per page, no network.

circuitsvis's usual ``str(html)`` imports its code from a CDN, which shows a blank page offline
(and did for everyone during the unpkg outage, circuitsvis issue #47). Here every page inlines
the bundle that ships inside the circuitsvis package, once, and renders each view from it.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from circuitsvis.utils.convert_props import convert_props


@dataclass(frozen=True)
class Element:
    """One circuitsvis component on a page, e.g. ``AttentionHeads`` with its props."""

    component: str
    props: dict[str, Any]
    heading: str = ""


def attention_heads(patterns: Any, tokens: list[str], heading: str, head_names: list[str] | None = None) -> Element:
    """circuitsvis ``AttentionHeads``: every head of one layer, ``[head, query_pos, key_pos]``."""
    return Element("AttentionHeads", {"attention": patterns, "tokens": tokens, "attentionHeadNames": head_names, "maskUpperTri": True}, heading)


def colored_tokens(tokens: list[str], values: list[float], heading: str) -> Element:
    """circuitsvis ``ColoredTokens``: each token shaded by a value."""
    return Element("ColoredTokens", {"tokens": tokens, "values": values}, heading)


@functools.cache
def circuitsvis_bundle() -> str:
    """The circuitsvis IIFE bundle from the installed package, safe to inline in a script tag."""
    spec = importlib.util.find_spec("circuitsvis")
    assert spec is not None and spec.submodule_search_locations
    bundle = Path(next(iter(spec.submodule_search_locations))) / "dist" / "cdn" / "iife.js"
    # A literal "</script>" inside the code would end the inline script early.
    return bundle.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1300px;padding:0 1rem;color:#1d2330}
.meta{color:#5b6478} h2{margin-top:2rem;border-bottom:1px solid #dde3ee} a{color:#2457c5}"""


def page(title: str, facts: dict[str, str], elements: list[Element], index_href: str, run_href: str | None = None) -> str:
    """A complete HTML page showing ``elements``, with ``facts`` (model, prompt, ...) at the top,
    linking back to the index and, given ``run_href``, to the page of the run it belongs to."""
    back = f'<a href="{escape(run_href)}">← this run</a> · ' if run_href else ""
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f'<p>{back}<a href="{escape(index_href)}">all runs</a></p><h1>{escape(title)}</h1>',
        "".join(f'<div class="meta"><b>{escape(k)}:</b> {escape(v)}</div>' for k, v in facts.items()),
        f"<script>{circuitsvis_bundle()}</script>",
    ]
    for number, element in enumerate(elements):
        if element.heading:
            parts.append(f"<h2>{escape(element.heading)}</h2>")
        parts.append(f'<div id="view-{number}" class="circuitsvis-view"></div>')
        parts.append(f'<script>CircuitsVis.render("view-{number}", CircuitsVis.{element.component}, {convert_props(element.props)});</script>')
    parts.append("</body></html>\n")
    return "\n".join(parts)
