"""Plot geometry for the report: axes that turn values into SVG pixels, and a chart that collects
the shapes to draw.

Nothing is measured here (the values come from the Comparison) and nothing is drawn here (the
template draws a :class:`Chart` with one macro, so every plot looks alike). Hand-written rather
than a plotting library because the core install stays light (it goes into every engine's
environment) and the report has no script: a chart is plain SVG shapes with ``<title>``
tooltips. Coordinates are rounded to 0.1 px so that the same data renders the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ptrace.bundle_spec.names import forward_key, layer_index

#: Categorical colours (Tableau 10: distinct, readable on white, colour-blind tolerable).
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
           "#ff9da7", "#bab0ac")
#: Shared meanings: at or below the noise floor (rounding only), and a NaN or Inf.
ROUNDING, NONFINITE = "#dde3ea", "#6a3d9a"
#: Pixels between a log axis's "0" tick (exact zeros: bit-identical) and its lowest decade.
ZERO_GAP = 14.0


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _mix(a: str, b: str, t: float) -> str:
    """Colour ``a`` moved a fraction ``t`` towards colour ``b`` (both ``#rrggbb``)."""
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def ramp(stops: Sequence[str], t: float) -> str:
    """The colour at ``t`` (0..1) along a piecewise-linear gradient through ``stops``."""
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    return _mix(stops[i], stops[i + 1], t - i)


def shade(base: str, t: float) -> str:
    """``base`` lightened towards white for small ``t`` (0..1): members of one family of curves."""
    return _mix("#ffffff", base, 0.45 + 0.55 * min(max(t, 0.0), 1.0))


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def number(value: Any, digits: int = 4) -> str:
    """A value as the report prints it: "–" for nothing, scientific when very small or large."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def exponent_label(exponent: int) -> str:
    return {-2: "0.01", -1: "0.1", 0: "1", 1: "10", 2: "100"}.get(exponent, f"1e{exponent}")


class Axis(Protocol):
    def px(self, value: Any) -> float: ...

    def ticks(self) -> list[tuple[float, str]]: ...


@dataclass(frozen=True)
class LogAxis:
    """Decades ``10**lo .. 10**hi`` over pixels ``start .. end`` (``end`` may be smaller: a y
    axis grows upwards). A log scale has no zero, so exact zeros (a bit-identical tensor, a
    sweep's ``std=0``) get a "0" tick of their own just before the lowest decade."""

    lo: int
    hi: int
    start: float
    end: float
    has_zero: bool = False

    @classmethod
    def over(cls, values: Iterable[float | None], start: float, end: float) -> LogAxis:
        values = [v for v in values if finite(v)]
        positive = [v for v in values if v > 0]
        lo = math.floor(math.log10(min(positive))) if positive else -1
        hi = math.ceil(math.log10(max(positive))) if positive else 0
        return cls(lo, max(hi, lo + 1), start, end, has_zero=any(v <= 0 for v in values))

    @property
    def _first_decade(self) -> float:
        if not self.has_zero:
            return self.start
        return self.start + math.copysign(ZERO_GAP, self.end - self.start)

    def px(self, value: float) -> float:
        if value <= 0:
            return round(self.start, 1)
        t = (math.log10(value) - self.lo) / (self.hi - self.lo)
        first = self._first_decade
        return round(first + min(max(t, 0.0), 1.0) * (self.end - first), 1)

    def ticks(self) -> list[tuple[float, str]]:
        step = max(1, math.ceil((self.hi - self.lo) / 8))
        ticks = [(self.px(10.0**e), exponent_label(e)) for e in range(self.lo, self.hi + 1, step)]
        return ([(round(self.start, 1), "0")] if self.has_zero else []) + ticks


@dataclass(frozen=True)
class LinearAxis:
    """``lo .. hi`` over pixels ``start .. end``, ticks at ``marks`` labelled by ``label``."""

    lo: float
    hi: float
    start: float
    end: float
    marks: tuple[float, ...]
    percent: bool = False

    @classmethod
    def over(cls, values: Iterable[float], start: float, end: float, most: int = 8,
             whole: bool = False) -> LinearAxis:
        """From 0 (or the smallest value, if below) to the largest value rounded up, ticks at
        a round step (1, 2 or 5 times a power of ten) giving at most ``most`` of them; ``whole``:
        a step of at least 1 (counts)."""
        values = [v for v in values if finite(v)] or [0.0]
        lo, hi = min(0.0, min(values)), max(values)
        raw = (hi - lo) / most if hi > lo else 1.0
        power = 10.0 ** math.floor(math.log10(raw))
        step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
        step = max(step, 1.0) if whole else step
        first, last = math.floor(lo / step), math.ceil(hi / step)
        return cls(first * step, max(last, first + 1) * step, start, end,
                   tuple(i * step for i in range(first, max(last, first + 1) + 1)))

    def px(self, value: float) -> float:
        t = (value - self.lo) / (self.hi - self.lo) if self.hi > self.lo else 0.5
        return round(self.start + t * (self.end - self.start), 1)

    def ticks(self) -> list[tuple[float, str]]:
        return [(self.px(m), f"{m * 100:.0f}%" if self.percent else f"{m:g}") for m in self.marks]


@dataclass(frozen=True)
class ForwardAxis:
    """Tensors in forward order, one slot each; labelled per layer (a band per layer) since a
    30-layer model has hundreds of tensors and the question is *where* in the model."""

    names: tuple[str, ...]
    start: float
    end: float

    @classmethod
    def over(cls, names: Iterable[str], start: float, end: float) -> ForwardAxis:
        return cls(tuple(sorted(set(names), key=lambda n: (forward_key(n), n))), start, end)

    @property
    def slot(self) -> float:
        return (self.end - self.start) / max(len(self.names), 1)

    def px(self, name: str) -> float:
        return round(self.start + (self.names.index(name) + 0.5) * self.slot, 1)

    def groups(self) -> list[tuple[str, int, int]]:
        """(label, first slot, last slot) of each layer, or of each tensor outside layers."""
        groups: list[tuple[str, int, int]] = []
        for i, name in enumerate(self.names):
            layer = layer_index(name)
            label = name if layer is None else str(layer)
            if groups and groups[-1][0] == label and layer is not None:
                groups[-1] = (label, groups[-1][1], i)
            else:
                groups.append((label, i, i))
        return groups

    def ticks(self) -> list[tuple[float, str]]:
        groups = self.groups()
        layers = [g for g in groups if g[0].isdigit()]
        every = max(1, math.ceil(len(layers) / 16))  # at most ~16 layer labels
        ticks: list[tuple[float, str]] = []
        for label, first, last in groups:
            if label.isdigit() and int(label) % every and label != layers[-1][0]:
                continue
            short = {"embed": "emb", "final_norm": "norm"}.get(label, label)
            x = round(self.start + (first + last + 1) / 2 * self.slot, 1)
            if ticks and x - ticks[-1][0] < 3.5 * (len(short) + len(ticks[-1][1])) + 4:
                continue  # would overlap the label before (about 7 px per character)
            ticks.append((x, short))
        return ticks

    def bands(self) -> list[tuple[float, float]]:
        """(x, width) of every other layer, shaded so that layers read as blocks."""
        layers = [g for g in self.groups() if g[0].isdigit()]
        return [(round(self.start + first * self.slot, 1), round((last - first + 1) * self.slot, 1))
                for _, first, last in layers[1::2]]


@dataclass(frozen=True)
class CategoryAxis:
    """Named slots (``layers.3.out``, ...) in the given order, for bars."""

    names: tuple[str, ...]
    start: float
    end: float

    @property
    def slot(self) -> float:
        return (self.end - self.start) / max(len(self.names), 1)

    def px(self, name: str) -> float:
        return round(self.start + (self.names.index(name) + 0.5) * self.slot, 1)

    def ticks(self) -> list[tuple[float, str]]:
        every = max(1, math.ceil(len(self.names) / 16))
        return [(self.px(n), _short(n)) for i, n in enumerate(self.names) if i % every == 0 or i == len(self.names) - 1]


def _short(name: str) -> str:
    """``layers.3.out`` as ``3`` (the axis says "layer"), ``layers.3.mlp`` as ``3.mlp``."""
    layer = layer_index(name)
    if layer is None:
        return name
    return str(layer) if name.endswith(".out") else name.removeprefix("layers.")


@dataclass(frozen=True)
class Frame:
    """A chart's size and the plot area inside it (room left for tick labels and titles)."""

    width: float = 1100
    height: float = 280
    left: float = 60
    right: float = 16
    top: float = 22
    bottom: float = 44

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:
        """The bottom of the plot area (y grows downwards in SVG)."""
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top


@dataclass
class Chart:
    """Shapes in pixels, for the template's ``chart`` macro; ``legend`` is drawn as HTML under the
    chart (long labels wrap there, and are escaped like any text)."""

    frame: Frame
    x: Axis
    y: Axis
    x_title: str
    y_title: str
    label: str
    shades: list[dict[str, Any]] = field(default_factory=list)
    areas: list[dict[str, Any]] = field(default_factory=list)
    bars: list[dict[str, Any]] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)
    dots: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    legend: list[dict[str, Any]] = field(default_factory=list)

    def x_ticks(self) -> list[tuple[float, str]]:
        return self.x.ticks()

    def y_ticks(self) -> list[tuple[float, str]]:
        return self.y.ticks()

    def line(self, points: Sequence[tuple[Any, float | None]], color: str, *, title: str = "",
             width: float = 2, dash: str = "") -> None:
        """A polyline through ``(x value, y value)``; a missing or non-finite y breaks it."""
        for run in _runs(points):
            self.lines.append({"points": " ".join(f"{self.x.px(x)},{self.y.px(y)}" for x, y in run),
                               "color": color, "width": width, "dash": dash, "title": title})

    def area(self, points: Sequence[tuple[Any, float | None]], color: str, *, title: str = "",
             opacity: float = 1.0, edge: str = "none") -> None:
        """The region between the x axis and a step curve through ``points`` (half a slot each
        side of a categorical x), e.g. the noise floor: everything under it is rounding."""
        half = getattr(self.x, "slot", 0.0) / 2
        for run in _runs(points):
            top = []
            for x, y in run:
                px, py = self.x.px(x), self.y.px(y)
                top += [(round(px - half, 1), py), (round(px + half, 1), py)]
            outline = [(top[0][0], self.frame.y0), *top, (top[-1][0], self.frame.y0)]
            self.areas.append({"points": " ".join(f"{x},{y}" for x, y in outline), "color": color,
                               "opacity": opacity, "edge": edge, "title": title})

    def bar(self, x: Any, value: float, color: str, *, title: str = "", width: float = 0.6) -> None:
        """A bar from the x axis to ``value``, ``width`` of a categorical slot (at most 40 px)."""
        if not finite(value):
            return
        w = min(getattr(self.x, "slot", 10.0) * width, 40.0)
        top = self.y.px(value)
        self.bars.append({"x": round(self.x.px(x) - w / 2, 1), "y": top, "w": round(w, 1),
                          "h": round(self.frame.y0 - top, 1), "color": color, "title": title})

    def dot(self, x: Any, y: float | None, color: str, *, title: str = "", radius: float = 3,
            hollow: bool = False) -> None:
        if finite(y):
            self.dots.append({"x": self.x.px(x), "y": self.y.px(y), "r": radius, "color": color,
                              "title": title, "hollow": hollow})

    def whisker(self, x: Any, low: float, high: float, color: str) -> None:
        if finite(low) and finite(high) and low != high:
            px = self.x.px(x)
            self.rules.append({"x1": px, "x2": px, "y1": self.y.px(low), "y2": self.y.px(high),
                               "color": color, "dash": "", "width": 1.5})

    def vertical(self, x: Any, color: str, note: str = "") -> None:
        """A dashed line across the plot at ``x``, with a note at its top."""
        px = self.x.px(x)
        self.rules.append({"x1": px, "x2": px, "y1": self.frame.y1, "y2": self.frame.y0, "color": color,
                           "dash": "4 3", "width": 1.5})
        if note:  # above the plot area, on the side with room for it
            right = px > self.frame.x0 + (self.frame.x1 - self.frame.x0) * 0.7
            self.note(round(px - 4 if right else px + 4, 1), self.frame.y1 - 7, note, color,
                      anchor="end" if right else "start")

    def note(self, x: float, y: float, text: str, color: str, *, anchor: str = "middle") -> None:
        """Text at pixel ``(x, y)``."""
        self.notes.append({"x": x, "y": y, "text": text, "anchor": anchor, "color": color})

    def key(self, name: str, color: str, style: str = "line") -> None:
        """A legend entry (once: repeats of a run share theirs); ``style`` is line, dot, ring, bar
        or band."""
        entry = {"name": name, "color": color, "style": style}
        if entry not in self.legend:
            self.legend.append(entry)


def _runs(points: Sequence[tuple[Any, float | None]]) -> list[list[tuple[Any, float]]]:
    """The stretches of consecutive points with finite y values."""
    runs: list[list[tuple[Any, float]]] = [[]]
    for x, y in points:
        if finite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]
