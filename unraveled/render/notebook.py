"""Figures and views shown inline in Jupyter, offline, with the circuitsvis bundle once per kernel.

A view's notebook output draws with the circuitsvis bundle that ships inside the installed
circuitsvis package, never a CDN. The bundle is large (about 1.3 MB), so only the first view
shown in a kernel carries it (:func:`bundle_html`), defining it under a global name keyed by the
bundle's content (:func:`global_name`); every later view draws with that global. Views whose
scripts run before the bundle's (an output rendered out of order) queue their drawing until it
runs. A notebook saved and reopened keeps the first view's output, bundle included, so its views
draw again without a kernel. Where that output was cleared, a view says so and how to bring the
bundle back: show ``HTML(bundle_html())`` in any cell, or execute the notebook from the top.

Front ends that isolate each output in its own frame (Google Colab) can't share a global between
outputs: there, call :func:`bundle_every_view` once, and each view carries its own copy.

Element rendering is the view pages' own (``unraveled/templates/elements.html.j2``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from typing import TYPE_CHECKING

from markupsafe import escape

from unraveled.render import templating, views

if TYPE_CHECKING:
    from unraveled.experiment import Figure, View

# Whether this kernel (process) has shown the bundle yet, and whether every view carries it.
_state = {"bundle_shown": False, "every_view": False}
NOTEBOOK_DPI = 100


def global_name() -> str:
    """The window global the bundle is kept under, named by the bundle's content.

    Two circuitsvis versions' views in one browser so never draw with each other's code.
    """
    digest = hashlib.sha256(views.circuitsvis_bundle().encode()).hexdigest()[:16]
    return f"unraveledCircuitsVis_{digest}"


def bundle_html() -> str:
    """HTML that runs the circuitsvis bundle and draws every view waiting for it.

    The bundle is kept under :func:`global_name`; views shown later in this kernel then leave
    it out. Show it with ``IPython.display.HTML(bundle_html())`` where the first view's output
    was cleared.
    """
    _state["bundle_shown"] = True
    name = global_name()
    return (
        f"<script>{views.circuitsvis_bundle()}</script>\n"
        f"<script>window.{name} = CircuitsVis;\n"
        f"(window.{name}_queue || []).splice(0).forEach(function (draw) {{ draw(CircuitsVis); }});"
        "</script>\n"
    )


def bundle_every_view(every: bool = True) -> None:
    """Make each view carry its own copy of the bundle (for front ends that isolate outputs)."""
    _state["every_view"] = every


def view_html(view: View) -> str:
    """``view`` as a notebook output: its title, facts and elements, drawn offline.

    The bundle is included when this is the kernel's first view (or :func:`bundle_every_view`).
    """
    carries_bundle = _state["every_view"] or not _state["bundle_shown"]
    name = global_name()
    return (
        templating.environment()
        .get_template("notebook.html.j2")
        .render(
            title=view.title,
            facts=view.facts,
            bundle=bundle_html() if carries_bundle else "",
            id_prefix=f"unraveled-{uuid.uuid4().hex[:12]}-",
            global_name=name,
            queue_name=f"{name}_queue",
            wait_name=f"{name}_draw",
            elements=views.element_scripts(view.elements),
        )
    )


def figure_png(figure: Figure) -> bytes:
    """``figure`` as PNG bytes, trimmed to its contents."""
    buffer = io.BytesIO()
    figure.figure.savefig(buffer, format="png", dpi=NOTEBOOK_DPI, bbox_inches="tight")
    return buffer.getvalue()


def figure_html(figure: Figure) -> str:
    """``figure`` as an embedded PNG with its caption below (no file, no network)."""
    data = base64.b64encode(figure_png(figure)).decode("ascii")
    caption = f"<figcaption>{escape(figure.caption)}</figcaption>" if figure.caption else ""
    return (
        f'<figure class="unraveled-figure"><img alt="{escape(figure.name)}" '
        f'src="data:image/png;base64,{data}">{caption}</figure>'
    )
