"""``outputs/index.html``: every run on one page, grouped by model, readable from ``file://``.

Built only from the manifests and metrics on disk, so it can be rebuilt at any time and always
describes exactly what is there. No scripts, no network: plain HTML and inline CSS.
"""

from __future__ import annotations

import json
import logging
from html import escape
from pathlib import Path
from typing import Any

from unraveled.outputs import write_text_atomic

logger = logging.getLogger(__name__)

KEY_METRICS_SHOWN = 14

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#1d2330;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #dde3ee;padding-bottom:.3rem;margin-top:2.5rem}
.sub{color:#5b6478} .run{border:1px solid #dde3ee;border-radius:8px;padding:1rem 1.2rem;margin:1.2rem 0}
.run h3{margin:.1rem 0 .3rem} .meta{color:#5b6478;font-size:.9rem}
.banner{background:#fff4d6;border:1px solid #e8c35a;border-radius:6px;padding:.7rem 1rem;margin:.8rem 0}
.thumbs{display:flex;flex-wrap:wrap;gap:.6rem;margin:.8rem 0}
.thumbs figure{margin:0;width:220px} .thumbs img{width:220px;height:150px;object-fit:contain;
border:1px solid #dde3ee;border-radius:4px;background:#fff}
.thumbs figcaption{font-size:.78rem;color:#5b6478}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} td,th{border:1px solid #dde3ee;padding:.25rem .5rem;
text-align:left;vertical-align:top} th{background:#f4f6fa}
.na{color:#8a5a00} .links a{margin-right:1rem}
"""


def _read_runs(out_dir: Path) -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    runs = []
    for manifest_path in sorted(out_dir.glob("*/*/manifest.json")):
        run_dir = manifest_path.parent
        if run_dir.name.startswith(".") or run_dir.parent.name.startswith("."):
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            metrics_path = run_dir / "metrics.json"
            metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("skipping %s on the index: %s", run_dir, error)
            continue
        runs.append((run_dir, manifest, metrics))
    return runs


def _flatten_scalars(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key == "not_applicable":
            continue
        if isinstance(value, dict):
            rows.extend(_flatten_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((name, value))
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _run_html(run_dir: Path, manifest: dict[str, Any], metrics: dict[str, Any], out_dir: Path) -> str:
    rel = run_dir.relative_to(out_dir).as_posix()
    model = manifest["model"]
    seconds = manifest.get("timings_seconds", {}).get("total", 0.0)
    parts = [
        f'<div class="run" id="{escape(rel)}"><h3>{escape(manifest["title"])} '
        f'<span class="sub">({escape(manifest["config"])})</span></h3>',
        f'<div>{escape(manifest["description"])}</div>',
        f'<div class="meta">model: {escape(model["label"])} · run {escape(manifest["created"])} · '
        f"{seconds:.1f} s · seed {manifest['seed']}</div>",
    ]
    for what, reason in metrics.get("not_applicable", {}).items():
        parts.append(f'<div class="na">Not applicable: {escape(what)}: {escape(reason)}</div>')
    if manifest["figures"]:
        parts.append('<div class="thumbs">')
        for figure in manifest["figures"]:
            href = escape(f"{rel}/{figure['file']}")
            caption = escape(figure["caption"] or Path(figure["file"]).stem)
            parts.append(
                f'<figure><a href="{href}"><img src="{href}" alt="{caption}" loading="lazy"></a>'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts.append("</div>")
    rows = _flatten_scalars(metrics)
    if rows:
        shown = rows[:KEY_METRICS_SHOWN]
        more = f" ({len(rows) - len(shown)} more in metrics.json)" if len(rows) > len(shown) else ""
        parts.append("<table><tr><th>metric</th><th>value</th></tr>")
        parts.extend(f"<tr><td>{escape(k)}</td><td>{escape(_format_value(v))}</td></tr>" for k, v in shown)
        parts.append(f"</table><div class='meta'>{escape(more)}</div>")
    links = [f'<a href="{escape(rel)}/{escape(view["file"])}">{escape(view["title"])}</a>' for view in manifest["views"]]
    links += [f'<a href="{escape(rel)}/metrics.json">metrics.json</a>', f'<a href="{escape(rel)}/manifest.json">manifest.json</a>']
    parts.append(f'<div class="links">{"".join(links)}</div></div>')
    return "\n".join(parts)


def render_index(out_dir: Path) -> str:
    """The index page's HTML for everything under ``out_dir``."""
    runs = _read_runs(out_dir)
    by_model: dict[str, list[tuple[Path, dict[str, Any], dict[str, Any]]]] = {}
    for run in runs:
        by_model.setdefault(run[0].parent.name, []).append(run)
    body = [
        "<h1>unraveled</h1>",
        f'<div class="sub">{len(runs)} runs under {escape(str(out_dir.resolve()))}</div>',
    ]
    if not runs:
        body.append("<p>No runs yet: <code>make all</code> or <code>unraveled run NAME</code>.</p>")
    for slug, model_runs in sorted(by_model.items()):
        body.append(f'<h2 id="model-{escape(slug)}">{escape(slug)}</h2>')
        fallbacks = {run[1]["model"]["requested"]: run[1]["model"]["fallback_reason"] for run in model_runs if run[1]["model"]["is_fallback"]}
        for requested, reason in sorted(fallbacks.items()):
            body.append(
                f'<div class="banner"><strong>Fallback model.</strong> These runs asked for '
                f"<code>{escape(requested)}</code>, which could not be loaded ({escape(reason)}); they show "
                f"<code>{escape(slug)}</code> instead.</div>"
            )
        body.extend(_run_html(*run, out_dir) for run in sorted(model_runs, key=lambda run: run[1]["config"]))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>unraveled outputs</title><style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_index(out_dir: Path) -> Path:
    """Rebuild ``out_dir/index.html`` from what is on disk; returns its path."""
    path = out_dir / "index.html"
    write_text_atomic(path, render_index(out_dir))
    return path
