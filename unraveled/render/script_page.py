"""Interactive pages drawn by a script of their own, shared by every page that uses it.

Like the circuitsvis views (``unraveled.render.views``), a ``ScriptPage`` keeps its code out of
the page: the script is written once into the output folder, ``OUT/assets/<stem>-<hash>.js``
(named by its content), and each page loads it with a relative ``<script src>`` and carries only
its own data, as JSON. The pages need no network and no server (they open over ``file://``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unraveled.render import templating


@dataclass(frozen=True)
class ScriptPage:
    """A page saved as ``views/<name>.html``, drawn in the browser by a shared script.

    Attributes:
        name: File stem of the page.
        title: The page's title.
        script_stem: Name of the shared script's file, before its hash.
        script: The script's source; it reads the page's data from the JSON element with id
            ``page-data`` and draws into the element with id ``page-root``.
        data: What the script draws (JSON-serialisable).
        facts: What the page is about, shown at the top.
    """

    name: str
    title: str
    script_stem: str
    script: str
    data: dict[str, Any]
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def script_name(self) -> str:
        """``<script_stem>-<first 16 hex digits of the script's SHA-256>.js``."""
        digest = hashlib.sha256(self.script.encode()).hexdigest()[:16]
        return f"{self.script_stem}-{digest}.js"


def write_script(page: ScriptPage, assets_dir: Path) -> Path:
    """The page's script as ``assets_dir/<page.script_name>``, written unless it is there."""
    from unraveled.outputs import write_text_atomic

    path = assets_dir / page.script_name
    if not (path.is_file() and path.read_text(encoding="utf-8", errors="replace") == page.script):
        write_text_atomic(path, page.script)
    return path


def html(
    page: ScriptPage,
    facts: dict[str, str],
    index_href: str,
    run_href: str | None,
    script_href: str,
) -> str:
    """The page's HTML, loading its script from ``script_href`` (relative to the page)."""
    data = (
        json.dumps(page.data, separators=(",", ":"), allow_nan=False)
        .replace("</", "<\\/")
        .replace("<!--", "<\\!--")
    )
    return (
        templating.environment()
        .get_template("script_page.html.j2")
        .render(
            title=page.title,
            facts=facts,
            index_href=index_href,
            run_href=run_href,
            script_href=script_href,
            data=data,
        )
    )


def save(
    page: ScriptPage,
    staging: Path,
    assets_dir: Path,
    assets_href: str,
    index_href: str,
    model_label: str,
) -> dict[str, Any]:
    """Write the page into ``staging/views`` and its script into ``assets_dir``.

    Args:
        page: The page.
        staging: The run folder being written.
        assets_dir: The output folder's shared assets.
        assets_href: ``assets_dir`` relative to the run folder's ``views/``.
        index_href: The index, relative to the page.
        model_label: The model, shown first among the facts.

    Returns:
        The manifest's record of the page, as for a view.
    """
    script = write_script(page, assets_dir)
    path = staging / "views" / f"{page.name}.html"
    path.parent.mkdir(exist_ok=True)
    facts = {"model": model_label, **page.facts}
    path.write_text(
        html(page, facts, index_href, "../index.html", f"{assets_href}/{script.name}"),
        encoding="utf-8",
    )
    return {"file": f"views/{path.name}", "title": page.title, "bytes": path.stat().st_size}
