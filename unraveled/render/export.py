"""Saving a figure in every format asked for (``--format png,svg,pdf``), plus a small thumbnail.

The runner calls :func:`save_figure` for each figure; the record it returns goes into the
manifest, where the pages find the files: ``file`` is the one shown on the pages (PNG, else
SVG, else the first format asked for), ``formats`` maps each format to its file, ``thumbnail``
is a small JPEG for the index, so the index never loads full-size figures.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
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
                raise ValueError(f"unknown figure format {part.strip()!r}: expected a comma-separated list of {', '.join(FIGURE_FORMATS)}")
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
    flat.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS).save(path, format="JPEG", quality=82, optimize=True)


def save_figure(figure: MplFigure, run_dir: Path, name: str, caption: str, formats: Sequence[str], dpi: int) -> dict[str, Any]:
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
