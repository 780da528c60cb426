"""Figures saved in every format asked for, and a page exported as one self-contained file.

A figure is saved in every format asked for (``--format png,svg,pdf``), plus a small thumbnail;
``unraveled export`` writes one page of the outputs as a single self-contained file to share.

The runner calls :func:`save_figure` for each figure; the record it returns goes into the
manifest, where the pages find the files: ``file`` is the one shown on the pages (PNG, else
SVG, else the first format asked for), ``formats`` maps each format to its file, ``thumbnail``
is a small JPEG for the index, so the index never loads full-size figures.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import re
from collections.abc import Iterable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI parses --format without importing matplotlib or PIL
    from matplotlib.figure import Figure as MplFigure
    from PIL.Image import Image as PilImage

FIGURE_FORMATS = ("png", "svg", "pdf")
DEFAULT_FORMATS = ("png",)
# Formats a browser shows in an <img>, in order of preference for the pages.
SHOWN_FORMATS = ("png", "svg")
THUMBNAIL_WIDTH = 360


def parse_formats(values: Iterable[str]) -> tuple[str, ...]:
    """``["png,svg", "pdf"]`` -> ``("png", "svg", "pdf")``: each format once, in the order given.

    Raises:
        ValueError: For an unknown or empty format, naming it and the valid ones.
    """
    formats: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower().lstrip(".")
            if name not in FIGURE_FORMATS:
                raise ValueError(
                    f"unknown figure format {part.strip()!r}: "
                    f"expected a comma-separated list of {', '.join(FIGURE_FORMATS)}"
                )
            if name not in formats:
                formats.append(name)
    return tuple(formats) or DEFAULT_FORMATS


def _thumbnail(png: PilImage, path: Path) -> None:
    from PIL import Image

    png = png.convert("RGBA")
    # Flatten onto white: matplotlib's transparent corners would show the page colour otherwise.
    flat = Image.new("RGB", png.size, "white")
    flat.paste(png, mask=png.getchannel("A"))
    height = max(1, round(flat.height * THUMBNAIL_WIDTH / flat.width))
    flat.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS).save(
        path, format="JPEG", quality=82, optimize=True
    )


def save_figure(
    figure: MplFigure, run_dir: Path, name: str, caption: str, formats: Sequence[str], dpi: int
) -> dict[str, Any]:
    """Save ``figure`` as ``figures/<name>.<format>`` for each format, and ``thumbs/<name>.jpg``.

    Args:
        figure: The figure, already titled; it is not closed here.
        run_dir: The run's (staging) folder; file names in the record are relative to it.
        name: File stem, the figure's identity across models on the compare pages.
        caption: What the figure shows.
        formats: From :func:`parse_formats`.
        dpi: Resolution of the PNG (and of rasterised parts of SVG and PDF).

    Returns:
        The manifest record: ``file``, ``caption``, ``formats`` and ``thumbnail``.
    """
    from PIL import Image

    (run_dir / "figures").mkdir(exist_ok=True)
    (run_dir / "thumbs").mkdir(exist_ok=True)
    files = {}
    for fmt in formats:
        files[fmt] = f"figures/{name}.{fmt}"
        figure.savefig(run_dir / files[fmt], format=fmt, dpi=dpi, bbox_inches="tight")
    if "png" in files:
        with Image.open(run_dir / files["png"]) as png:
            _thumbnail(png, run_dir / "thumbs" / f"{name}.jpg")
    else:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi // 2, bbox_inches="tight")
        buffer.seek(0)
        with Image.open(buffer) as png:
            _thumbnail(png, run_dir / "thumbs" / f"{name}.jpg")
    shown = next((files[fmt] for fmt in SHOWN_FORMATS if fmt in files), files[formats[0]])
    return {"file": shown, "caption": caption, "formats": files, "thumbnail": f"thumbs/{name}.jpg"}


class _LocalReferences(HTMLParser):
    """Where a page's start tags are (as character offsets) and which local files they name."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self._line_starts = [0] + [match.end() for match in re.finditer("\n", text)]
        # (offset, length of the start tag, tag, attributes)
        self.tags: list[tuple[int, int, str, dict[str, str | None]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "img", "a", "link"}:
            line, column = self.getpos()
            raw = self.get_starttag_text() or ""
            self.tags.append((self._line_starts[line - 1] + column, len(raw), tag, dict(attrs)))


def _is_local(url: str | None) -> bool:
    return bool(url) and not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|//|#", url or "")


def _attributes(attrs: dict[str, str | None]) -> str:
    from html import escape

    return "".join(
        f" {name}" if value is None else f' {name}="{escape(value)}"'
        for name, value in attrs.items()
    )


def self_contained_page(page: Path) -> str:
    """``page`` (a view or a report page of the outputs) as one HTML file that needs nothing else.

    Scripts and stylesheets the page loads from local files are inlined, local images become
    ``data:`` URLs, and links to other local files (other pages, ``metrics.json``) are dropped,
    as a lone file can't follow them (links within the page stay).

    Raises:
        FileNotFoundError: A script, stylesheet or image the page loads is missing; the message
            names it and the page.
    """
    from urllib.parse import unquote

    text = page.read_text(encoding="utf-8")

    def local_file(url: str) -> Path:
        path = (page.parent / unquote(url.split("#", 1)[0].split("?", 1)[0])).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{page} loads {url}, which is not there ({path})")
        return path

    pieces, done = [], 0
    for offset, length, tag, attrs in _LocalReferences(text).tags:
        if tag == "script" and _is_local(attrs.get("src")):
            code = local_file(str(attrs.pop("src"))).read_text(encoding="utf-8")
            # The closing tag already follows the element's (empty) body.
            replacement = f"<script{_attributes(attrs)}>" + re.sub(
                r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE
            )
        elif (
            tag == "link"
            and "stylesheet" in (attrs.get("rel") or "")
            and _is_local(attrs.get("href"))
        ):
            css = local_file(str(attrs["href"])).read_text(encoding="utf-8")
            replacement = (
                "<style>" + re.sub(r"</(style)", r"<\\/\1", css, flags=re.IGNORECASE) + "</style>"
            )
        elif tag == "img" and _is_local(attrs.get("src")):
            image = local_file(str(attrs["src"]))
            mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
            attrs["src"] = f"data:{mime};base64," + base64.b64encode(image.read_bytes()).decode(
                "ascii"
            )
            attrs.pop("loading", None)
            replacement = f"<img{_attributes(attrs)}>"
        elif tag == "a" and _is_local(attrs.get("href")):
            attrs.pop("href")
            replacement = f"<a{_attributes(attrs)}>"
        else:
            continue
        pieces += [text[done:offset], replacement]
        done = offset + length
    return "".join(pieces) + text[done:]
