"""Layer x position maps, one per request: where along the prompt and the generation each layer's
output departs from the reference.

Never pooled across requests (position 17 of one prompt has nothing to do with position 17 of
another). The colour is the error in units of the noise floor: white where the runs are
bit-identical, pale grey to blue up to the floor (rounding only), then yellow to dark red above
it, the scale spanning the data's own smallest to largest ratio (one scale for all maps of a
report) so that a map of rounding alone still shows its structure.
"""

from __future__ import annotations

import math
from functools import reduce
from itertools import groupby
from typing import Any

from ptrace.bundle_spec.names import forward_key, layer_index
from ptrace.compare import Comparison
from ptrace.compare.results import RequestResult, TensorResult
from ptrace.reports.plots import NONFINITE, ROUNDING, number, ramp

#: At most this many columns per map; longer requests show the worst of several positions each.
COLUMNS = 160
EXACT = "#ffffff"
#: Yellow to dark red over the decades above the noise floor, in this many distinct shades.
ABOVE = ("#fee08b", "#fdae61", "#f46d43", "#d73027", "#7f0000")
#: Pale grey to blue from the data's smallest ratio up to the noise floor.
BELOW = ("#eef1f5", "#c6dbef", "#9ecae1", "#4292c6", "#08519c")
SHADES = 16
LEFT, TOP, BOTTOM = 46, 22, 34


def _is_stream(name: str) -> bool:
    """The residual stream and what leaves it: one row per layer keeps a 30-layer map readable."""
    return name in ("embed", "final_norm", "logits") or (layer_index(name) is not None and name.endswith(".out"))


def _row_label(name: str) -> str:
    layer = layer_index(name)
    return f"L{layer}" if layer is not None else {"embed": "emb", "final_norm": "norm"}.get(name, name)


def _ratio(rel: float, floor: float) -> float:
    """Error in units of the noise floor (NaN stays NaN: a non-finite value); with no floor any
    difference counts as far above it."""
    if math.isnan(rel) or rel == 0:
        return rel
    return rel / floor if floor > 0 else math.inf


def _worse(a: float | None, b: float) -> float:
    """The worse of two ratios; a NaN (non-finite output) is worse than any number."""
    if a is None:
        return b
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


class Scale:
    """Ratio to colour over the data's own range: from its smallest non-zero ratio to its largest,
    log-scaled, the noise floor (1x) marked where it falls. Below the floor greys to blues (the
    runs differ by rounding, and the map still shows where more and where less), above it
    yellow to dark red; when nothing rises above the floor the scale ends at the data's top."""

    def __init__(self, ratios: list[float]):
        finite = [r for r in ratios if r > 0 and math.isfinite(r)]
        self.low = min(finite, default=0.1)
        self.high = max(finite, default=10.0)
        self.low = min(self.low, self.high / 10)  # at least a decade, so one value is not the whole scale

    def _t(self, ratio: float) -> float:
        span = math.log10(self.high) - math.log10(self.low)
        return min(1.0, max(0.0, (math.log10(ratio) - math.log10(self.low)) / span))

    def color(self, ratio: float) -> str:
        if math.isnan(ratio):
            return NONFINITE
        if ratio == 0:
            return EXACT
        if ratio <= 1:
            return ramp(BELOW, round(self._t(ratio) / self._t(1.0) * SHADES) / SHADES if self._t(1.0) > 0 else 1.0)
        top = max(self.high, 1.0)
        t = math.log10(ratio) / math.log10(top) if math.isfinite(ratio) and top > 1 else 1.0
        return ramp(ABOVE, round(min(1.0, t) * SHADES) / SHADES)

    def legend(self) -> list[dict[str, str]]:
        """Stops from the data's smallest ratio to its largest, the floor (1x) among them."""
        stops = sorted({self.low, *(r for r in (1.0, self.high) if r >= self.low)})
        if self.high > 1:
            stops += [10 ** (math.log10(self.high) * t) for t in (0.5,)]
        if self.low < 1:
            stops += [10 ** (math.log10(self.low) * t) for t in (0.5,)]
        return [{"color": self.color(r), "label": _times(r) + (" = noise floor" if r == 1.0 else "")}
                for r in sorted(set(stops)) if r <= max(self.high, 1.0)]


def _times(ratio: float) -> str:
    """``3.2x``, ``100x``, ``3e4x``: short enough for a legend."""
    if ratio < 1000:
        return f"{ratio:.2g}x" if ratio < 10 else f"{ratio:.0f}x"
    return f"{ratio:.0e}x".replace("e+0", "e").replace("e+", "e")


def _position_ticks(positions: list[int], per_bin: int, cell: float) -> list[dict[str, Any]]:
    span = positions[-1] - positions[0] + 1
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10**9) if span / s <= 10)
    ticks = []
    for column, first in enumerate(positions[::per_bin]):
        last = positions[min((column + 1) * per_bin, len(positions)) - 1]
        mark = -(-first // step) * step  # the first multiple of step in this column
        if mark <= last:
            ticks.append({"x": round(LEFT + (column + 0.5) * cell, 1), "label": str(mark)})
    return ticks


def _describe(ratio: float | None) -> str:
    if ratio is None:
        return "not compared"
    if math.isnan(ratio):
        return "NaN/Inf"
    return "bit-identical" if ratio == 0 else f"{number(ratio, 3)}x the noise floor"


def _one(request: RequestResult | None, index: int, rows: list[TensorResult], scale: Scale,
         width: float) -> dict[str, Any] | None:
    cells: dict[str, dict[int, float]] = {}
    for t in rows:
        here = t.position_request == index
        mine = {p: _ratio(r, t.noise_floor) for p, r in zip(t.position_index[here].tolist(),
                                                             t.position_rel[here].tolist())}
        if mine:
            cells[t.name] = mine
    if not cells:
        return None
    names = [t.name for t in rows if t.name in cells]
    positions = sorted({p for mine in cells.values() for p in mine})
    per_bin = max(1, math.ceil(len(positions) / COLUMNS))
    columns = math.ceil(len(positions) / per_bin)
    column_of = {p: i // per_bin for i, p in enumerate(positions)}
    cell = (width - LEFT - 8) / columns
    row_h = min(14.0, max(5.0, 220 / len(names)))
    out = []
    for r, name in enumerate(names):
        worst: dict[int, float] = {}
        for p, ratio in cells[name].items():
            worst[column_of[p]] = _worse(worst.get(column_of[p]), ratio)
        colors = [scale.color(worst[c]) if c in worst else None for c in range(columns)]
        # one rectangle per run of equal colour: a long prompt's map stays a few hundred shapes
        for color, run in groupby(range(columns), key=colors.__getitem__):
            span = list(run)
            first = positions[span[0] * per_bin]
            last = positions[min((span[-1] + 1) * per_bin, len(positions)) - 1]
            where = f"position {first}" if first == last else f"positions {first}-{last} (worst)"
            ratio = reduce(_worse, (worst[c] for c in span if c in worst), None)
            left, right = round(LEFT + span[0] * cell), round(LEFT + (span[-1] + 1) * cell)  # whole pixels: no seams
            out.append({"x": left, "y": round(TOP + r * row_h, 1), "w": right - left, "h": round(row_h, 1),
                        "color": color, "title": f"{name}, {where}: {_describe(ratio)}"})
    grid_h = round(len(names) * row_h, 1)
    view = {"index": index, "cells": out, "width": width, "height": round(TOP + grid_h + BOTTOM, 1),
            "grid": {"x": LEFT, "y": TOP, "w": round(columns * cell, 1), "h": grid_h},
            "labels": [{"y": round(TOP + (r + 0.5) * row_h + 3.5, 1), "text": _row_label(n)}
                       for r, n in enumerate(names) if row_h >= 9 or r % math.ceil(9 / row_h) == 0],
            "ticks": _position_ticks(positions, per_bin, cell), "per_bin": per_bin,
            "request": request, "prompt_end": None, "marker": None}
    if request is not None and request.prompt_len in column_of and column_of[request.prompt_len]:
        view["prompt_end"] = round(LEFT + column_of[request.prompt_len] * cell, 1)
    if request is not None and request.first_divergent_tensor is not None:
        view["marker"] = _marker(request, names, column_of, cell, row_h)
    return view


def _marker(request: RequestResult, names: list[str], column_of: dict[int, int], cell: float,
            row_h: float) -> dict[str, Any] | None:
    """The cell of the request's first divergent tensor (its layer's output row, when the tensor
    is inside a layer) at its first divergent position."""
    tensor, position = request.first_divergent_tensor, request.first_divergent_position
    layer = layer_index(tensor or "")
    row_name = tensor if tensor in names else f"layers.{layer}.out"
    if row_name not in names or position not in column_of:
        return None
    row, column = names.index(row_name), column_of[position]
    x = LEFT + column * cell
    return {"row": row, "column": column, "x": round(x - 1, 1), "y": round(TOP + row * row_h - 1, 1),
            "w": round(cell + 2, 1), "h": round(row_h + 2, 1), "cx": round(x + cell / 2, 1)}


def heatmaps(c: Comparison) -> dict[str, Any] | None:
    """One map per request, on one shared colour scale; None when no tensor has per-position errors."""
    rows = sorted((t for t in c.tensors if _is_stream(t.name) and t.position_rel.size),
                  key=lambda t: forward_key(t.name))
    if not rows:
        return None
    scale = Scale([_ratio(r, t.noise_floor) for t in rows for r in t.position_rel.tolist()])
    requests = {r.index: r for r in c.requests}
    indices = sorted({q for t in rows for q in t.position_request.tolist()} | set(requests))
    width = 1100 if len(indices) == 1 else 540
    maps = [m for i in indices if (m := _one(requests.get(i), i, rows, scale, width)) is not None]
    return {"maps": maps, "legend": scale.legend(), "stats_only": all(t.stats_only for t in rows),
            "colors": {"exact": EXACT, "rounding": ROUNDING, "nonfinite": NONFINITE}}
