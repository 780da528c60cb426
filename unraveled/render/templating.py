"""Templates of the HTML outputs, and the filters they format values with.

Every page (the report's and the interactive views) comes from a template in
``unraveled/templates/``, shipped with the package, with escaping on: nothing a config, a
prompt or a metric holds can turn into markup.
"""

from __future__ import annotations

import json
import math
from functools import cache
from typing import Any

import jinja2
import numpy as np
from numpy.typing import NDArray

SHORT_LIST = 8  # lists up to this long are shown in full, longer ones summarised


def format_number(value: Any) -> str:
    """Numbers as a reader wants them: 4 significant digits, integers whole, null as a dash."""
    if value is None:
        return "–"  # noqa: RUF001 - an en dash, the tables' mark for no value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _array(value: list[Any]) -> NDArray[Any] | None:
    """A metric list as an array: numbers (null as NaN) where it is numeric, None if ragged."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nesting
        return None
    if array.dtype == object:
        try:
            array = array.astype(float)  # nulls (NaN in the run) among numbers
        except (TypeError, ValueError):
            pass
    return array


def _item(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else summarise(value)


def summarise(value: Any) -> str:
    """A metric value on one line: scalars formatted, short lists in full, long ones summarised."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_item(item)}" for key, item in value.items()) + "}"
    if not isinstance(value, list):
        text = format_number(value)
        return text if len(text) <= 200 else text[:197] + "…"
    array = _array(value)
    flat = array is not None and array.ndim == 1
    if flat and len(value) <= SHORT_LIST:
        return "[" + ", ".join(_item(item) for item in value) + "]"
    if array is not None:
        # A shape is written with the multiplication sign, as in print, not the letter x.
        size = "×".join(str(n) for n in array.shape)  # noqa: RUF001
    else:
        size = f"{len(value)} items"
    if array is not None and array.dtype.kind in "biuf" and array.size:
        finite = array[np.isfinite(array)].astype(float)
        if finite.size:
            return (
                f"{size} values: min {finite.min():.4g}, mean {finite.mean():.4g}, "
                f"max {finite.max():.4g}"
            )
    if flat:
        return f"{size}: [" + ", ".join(_item(item) for item in value[:SHORT_LIST]) + ", …]"
    return size


def format_bytes(size: Any) -> str:
    """``1234567`` -> ``1.2 MB``."""
    if not isinstance(size, (int, float)):
        return ""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@cache
def environment() -> jinja2.Environment:
    """The one Jinja2 environment of the HTML outputs.

    Templates come from the package, escaping is on, and a missing variable is an error rather
    than a blank.
    """
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("unraveled", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["number"] = format_number
    environment.filters["bytes"] = format_bytes
    environment.filters["summary"] = summarise
    return environment
