"""circuitsvis pages that open offline: one shared copy of the JavaScript bundle, data per page.

circuitsvis's usual ``str(html)`` imports its code from a CDN, which shows a blank page offline
(and did for everyone during the unpkg outage, circuitsvis issue #47). Here the bundle that
ships inside the circuitsvis package is written once into the output folder,
``OUT/assets/circuitsvis-<hash>.js`` (named by its content, so runs with another circuitsvis,
or two runs at once, never overwrite each other's), and every view loads it with a relative
``<script src>``: the pages still need no network and no server. A view copied out of its output
folder without ``assets/`` says where its script went; ``unraveled export`` makes a single
self-contained file of any view or run page for sharing, the bundle inlined.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from circuitsvis.utils.convert_props import convert_prop_type

from unraveled.render import templating


@dataclass(frozen=True)
class Element:
    """One circuitsvis component on a page, e.g. ``AttentionHeads`` with its props.

    Two ways to keep a page's data small, undone by the page before drawing:

    - ``tables``: a prop's leaves are indices into the first table, whose entries' leaves are
      indices into the next, and so on (a neuron browser's contexts: each distinct context once,
      as indices into each distinct token once; it repeats a few thousand tokens in tens of
      thousands of contexts).
    - ``scales``: a prop's leaves under ``prop[0][i]`` are integers in units of ``scales[prop][i]``
      (a neuron's values in hundredths of its largest); shown to 3 decimals.
    """

    component: str
    props: dict[str, Any]
    heading: str = ""
    tables: dict[str, list[list[Any]]] = field(default_factory=dict)
    scales: dict[str, list[float]] = field(default_factory=dict)


def attention_heads(
    patterns: Any, tokens: list[str], heading: str, head_names: list[str] | None = None
) -> Element:
    """Circuitsvis ``AttentionHeads``: every head of one layer, ``[head, query_pos, key_pos]``."""
    return Element(
        "AttentionHeads",
        {
            "attention": patterns,
            "tokens": tokens,
            "attentionHeadNames": head_names,
            "maskUpperTri": True,
        },
        heading,
    )


def colored_tokens(tokens: list[str], values: list[float], heading: str) -> Element:
    """Circuitsvis ``ColoredTokens``: each token shaded by a value."""
    return Element("ColoredTokens", {"tokens": tokens, "values": values}, heading)


@functools.cache
def circuitsvis_bundle() -> str:
    """The circuitsvis IIFE bundle from the installed package, safe to inline in a script tag."""
    spec = importlib.util.find_spec("circuitsvis")
    assert spec is not None and spec.submodule_search_locations
    bundle = Path(next(iter(spec.submodule_search_locations))) / "dist" / "cdn" / "iife.js"
    # A literal "</script>" inside the code would end the inline script early.
    return bundle.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


def shared_bundle_name() -> str:
    """``circuitsvis-<first 16 hex digits of the bundle's SHA-256>.js``."""
    return f"circuitsvis-{hashlib.sha256(circuitsvis_bundle().encode()).hexdigest()[:16]}.js"


def write_shared_bundle(assets_dir: Path) -> Path:
    """The bundle as ``assets_dir/<shared_bundle_name()>``, written (atomically) unless it is there.

    A file of that name with other contents (a truncated copy, say) is replaced.
    """
    from unraveled.outputs import write_text_atomic

    path = assets_dir / shared_bundle_name()
    text = circuitsvis_bundle()
    if not (path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text):
        write_text_atomic(path, text)
    return path


def _shortest_floats(value: Any) -> Any:
    """A float32 (or float16) array or tensor as float64 holding each value's shortest decimal.

    In JSON a float32 0.123 becomes 0.12300000339746475 (its exact float64 value); the shortest
    decimal that reads back as the same float32 is 0.123: same values, a third of the bytes.
    """
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype.itemsize < 8:
        return value.astype(str).astype(np.float64)
    return value


def _script_json(props: dict[str, Any]) -> str:
    """Props as compact JSON that can sit inside a script tag.

    Arrays are converted as circuitsvis does, without spaces; a token like ``</script>`` can't end
    the tag.
    """
    converted = {
        key: convert_prop_type(_shortest_floats(value))
        for key, value in props.items()
        if value is not None
    }
    return (
        json.dumps(converted, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
    )


def page(
    title: str,
    facts: dict[str, str],
    elements: list[Element],
    index_href: str,
    run_href: str | None = None,
    bundle_href: str | None = None,
) -> str:
    """A complete HTML page showing ``elements``, with ``facts`` (model, prompt, ...) at the top.

    Args:
        title: The page's title.
        facts: What the page is about (model, prompt, ...), shown at the top, in order.
        elements: The views shown on the page.
        index_href: Relative URL of the index, which the page links back to.
        run_href: Relative URL of the page of the run it belongs to, linked when given.
        bundle_href: Relative URL of the shared bundle (see :func:`write_shared_bundle`); None
            inlines the bundle, for a page that stands alone.

    Returns:
        The page's HTML.
    """
    return (
        templating.environment()
        .get_template("view.html.j2")
        .render(
            title=title,
            facts=facts,
            index_href=index_href,
            run_href=run_href,
            bundle_href=bundle_href,
            bundle=None if bundle_href else circuitsvis_bundle(),
            elements=element_scripts(elements),
        )
    )


def element_scripts(elements: list[Element]) -> list[tuple[Element, str, str, str]]:
    """Each element with its props, tables and scales as script-safe JSON.

    What the templates' ``elements.html.j2`` macros draw from, for a view page and for a view
    shown in a notebook alike.
    """
    return [
        (
            element,
            _script_json(element.props),
            _script_json(element.tables),
            _script_json(element.scales),
        )
        for element in elements
    ]
