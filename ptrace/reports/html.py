"""The HTML diff report: one self-contained file (inline CSS and SVG, no script, no network).

It renders a :class:`~ptrace.compare.Comparison` and never recomputes a metric: this
module only turns numbers into geometry (plot coordinates, colours) and hands everything to a
jinja2 template with autoescaping on, so any string that came from a bundle (a prompt holding
``<script>``, a path, an environment value) is shown as text, never run.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import jinja2

from ptrace.bundle_spec.names import layer_index
from ptrace.compare import Comparison

PLOT_W, PLOT_H, MARGIN, LEGEND = 760, 220, 48, 120
HEATMAP_COLUMNS = 200


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("ptrace.reports", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _number
    env.filters["shell"] = shlex.join  # a command line as a shell would need it typed
    return env


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def _log10_error(value: float) -> float:
    return math.log10(max(value, 1e-12))


def _layer_plot(comparison: Comparison) -> dict[str, Any]:
    """Per-layer error series (log10 of mean abs error) for each per-layer tensor kind."""
    series: dict[str, list[tuple[int, float]]] = {}
    for t in comparison.tensors:
        layer = layer_index(t.name)
        if layer is None or t.stats_only or math.isnan(t.mean_abs_err):
            continue
        series.setdefault(t.name.rsplit(".", 1)[1], []).append((layer, _log10_error(t.mean_abs_err)))
    if not series:
        return {"series": [], "ticks": []}
    layers = max(x for points in series.values() for x, _ in points) + 1
    values = [y for points in series.values() for _, y in points]
    lo, hi = math.floor(min(values)), math.ceil(max(values))
    hi = hi if hi > lo else lo + 1

    def xy(layer: int, value: float) -> tuple[float, float]:
        x = MARGIN + (layer + 0.5) * (PLOT_W - MARGIN - LEGEND) / layers
        y = PLOT_H - MARGIN - (value - lo) * (PLOT_H - 2 * MARGIN) / (hi - lo)
        return round(x, 1), round(y, 1)

    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    out = []
    for i, (kind, points) in enumerate(sorted(series.items(), key=lambda kv: kv[0] != "out")):
        coordinates = [xy(layer, value) for layer, value in sorted(points)]
        out.append({"name": kind, "color": palette[i % len(palette)],
                    "points": " ".join(f"{x},{y}" for x, y in coordinates), "dots": coordinates})
    return {
        "series": out, "width": PLOT_W, "height": PLOT_H, "margin": MARGIN, "legend_x": PLOT_W - LEGEND + 10,
        "ticks": [{"y": xy(0, v)[1], "label": f"1e{v}"} for v in range(lo, hi + 1)],
        "layers": [{"x": xy(layer, lo)[0], "label": str(layer)} for layer in range(layers)],
    }


def _color(value: float, lo: float, hi: float) -> str:
    """White (small error) to dark red (large), on a log scale."""
    t = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    return f"rgb({int(255 - 120 * t)},{int(255 - 235 * t)},{int(255 - 235 * t)})"


def _heatmap(comparison: Comparison) -> dict[str, Any]:
    """Layer x position map of the layer output's mean abs error, positions binned to fit."""
    rows = [t for t in comparison.tensors if t.name.endswith(".out") and layer_index(t.name) is not None
            and t.position_index and not t.stats_only]
    if not rows:
        return {"cells": []}
    positions = sorted({p for t in rows for p in t.position_index})
    per_bin = max(1, math.ceil(len(positions) / HEATMAP_COLUMNS))
    column_of = {p: i // per_bin for i, p in enumerate(positions)}
    columns = max(column_of.values()) + 1
    grid: list[list[float]] = []
    for t in rows:
        worst = [0.0] * columns
        for p, err in zip(t.position_index, t.position_mean_abs):
            worst[column_of[p]] = max(worst[column_of[p]], err)
        grid.append([_log10_error(v) for v in worst])
    flat = [v for row in grid for v in row]
    lo, hi = min(flat), max(flat)
    cell_w = max(2.0, (PLOT_W - MARGIN) / columns)
    cells = [{"x": MARGIN + c * cell_w, "y": 20 + r * 14, "w": cell_w, "color": _color(v, lo, hi),
              "title": f"{rows[r].name}, positions {positions[c * per_bin]}-"
                       f"{positions[min((c + 1) * per_bin, len(positions)) - 1]}: mean abs err 1e{v:.1f}"}
             for r, row in enumerate(grid) for c, v in enumerate(row)]
    return {"cells": cells, "labels": [{"y": 20 + r * 14 + 10, "text": t.name} for r, t in enumerate(rows)],
            "width": MARGIN + columns * cell_w + 10, "height": 30 + len(rows) * 14,
            "lo": f"1e{lo:.1f}", "hi": f"1e{hi:.1f}", "per_bin": per_bin}


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, Mapping):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        flat = {}
        for i, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{i}]"))
        return flat
    return {prefix: "" if value is None else str(value)}


def _side_by_side(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [{"key": k, "a": fa.get(k, "—"), "b": fb.get(k, "—"), "differs": fa.get(k) != fb.get(k)}
            for k in keys]


def _token_text(run: Mapping[str, Any], request: int, step: int) -> str | None:
    tokens = run["output_tokens"][request] if request < len(run["output_tokens"]) else []
    return tokens[step] if step < len(tokens) else None


def _timeline(comparison: Comparison) -> list[dict[str, Any]]:
    timelines = []
    for request in comparison.requests:
        steps = []
        for s in range(max(len(request.tokens_a), len(request.tokens_b))):
            a = request.tokens_a[s] if s < len(request.tokens_a) else None
            b = request.tokens_b[s] if s < len(request.tokens_b) else None
            steps.append({
                "step": s, "a": a, "b": b, "same": a == b,
                "text_a": _token_text(comparison.a, request.index, s),
                "text_b": _token_text(comparison.b, request.index, s),
                "alt_a": request.topk_a[s][:5] if s < len(request.topk_a) else [],
                "alt_b": request.topk_b[s][:5] if s < len(request.topk_b) else [],
                "kl": request.kl[s] if s < len(request.kl) else None})
        timelines.append({"request": request, "steps": steps})
    return timelines


def _title(c: Comparison) -> str:
    """A replay is named by what changed (engine, dtype); two other bundles by their files."""
    replay = c.b["replay"]
    if replay is not None and replay["source_bundle_id"] == c.a["bundle_id"]:
        return f"ptrace: {c.a['backend']} {c.a['dtype']} vs {c.b['backend']} {c.b['dtype']}"
    return f"ptrace: {PurePath(c.a['path']).name} vs {PurePath(c.b['path']).name}"


def _commands(c: Comparison) -> list[str]:
    """The comparisons that reproduce this report from the bundles (two for a replay that ran
    in both modes: tensors from one run, tokens from the other)."""
    others = [c.b["path"], *([c.b["token_run_path"]] if "token_run_path" in c.b else [])]
    return [shlex.join(["ptrace", "compare", c.a["path"], other]) for other in others]


def render(comparison: Comparison) -> str:
    """The report as one HTML string, from the comparison alone (it may come from JSON)."""
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=_title(comparison), c=comparison, plot=_layer_plot(comparison), heatmap=_heatmap(comparison),
        timelines=_timeline(comparison), prompts=comparison.a.get("prompts", []),
        run_rows=_side_by_side(comparison.a["run"], comparison.b["run"]),
        env_rows=_side_by_side(comparison.a["environment"], comparison.b["environment"]),
        commands=_commands(comparison),
    )


def write_report(comparison: Comparison, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(comparison), encoding="utf-8")
    return path
