"""The report's "What-ifs" section: what each error injection did (against the unperturbed
baseline replay on the same engine), as sentences, a table, the error's propagation along the
forward pass, for a sweep the divergence rate and KL against the swept value, and over requests of
several prompt lengths the same against prompt length.

Runs of one sweep (the same injections with another value of the swept parameter) and repeats
(another noise seed) form one *family*: one hue, lighter for smaller values, so that a family of
propagation curves reads as one story and the sweep plots draw one curve per family.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from statistics import mean
from typing import Any

from ptrace.compare.results import Comparison, WhatIfResult
from ptrace.reports.plots import Chart, ForwardAxis, Frame, LinearAxis, LogAxis, color, finite, number, shade
from ptrace.reports.stability import bucket_axis, bucket_label, percent_axis

#: Above this many points in the propagation plot, lines only (dots would merge into a smear).
MAX_DOTS = 1500


def _family(w: WhatIfResult) -> str:
    """What a run's injections are, without the swept value and the noise seed."""
    specs = []
    for spec in w.spec:
        params = {k: v for k, v in dict(spec.get("params") or {}).items()
                  if w.sweep_value is None or k != w.sweep_param}
        specs.append({**spec, "params": params, "seed": None})
    return json.dumps(specs, sort_keys=True, default=str)


def _family_name(w: WhatIfResult) -> str:
    """The run's label with the swept value written as a range (``noise std=… in k,v``)."""
    if w.sweep_value is None or not w.sweep_param:
        return w.label
    return re.sub(rf"\b{re.escape(w.sweep_param)}=[^\s,:;]+", f"{w.sweep_param}=…", w.label, count=1)


def _hues(whatifs: list[WhatIfResult]) -> dict[str, str]:
    return {family: color(i) for i, family in enumerate(dict.fromkeys(_family(w) for w in whatifs))}


def _colors(whatifs: list[WhatIfResult], hues: dict[str, str]) -> list[str]:
    """Each family its hue; within a sweep, lighter for smaller swept values."""
    values: dict[str, set[float]] = defaultdict(set)
    for w in whatifs:
        if w.sweep_value is not None:
            values[_family(w)].add(w.sweep_value)
    out = []
    for w in whatifs:
        ranks = sorted(values[_family(w)])
        out.append(shade(hues[_family(w)], ranks.index(w.sweep_value) / (len(ranks) - 1))
                   if w.sweep_value is not None and len(ranks) > 1 else hues[_family(w)])
    return out


def propagation_chart(whatifs: list[WhatIfResult], colors: list[str]) -> Chart | None:
    """Error against the baseline at every tensor from the injection point on, one line per run."""
    drawn = [(w, c) for w, c in zip(whatifs, colors) if w.propagation]
    if not drawn:
        return None
    frame = Frame(height=300)
    x = ForwardAxis.over([p.tensor for w, _ in drawn for p in w.propagation], frame.x0, frame.x1)
    y = LogAxis.over([p.error for w, _ in drawn for p in w.propagation], frame.y0, frame.y1)
    chart = Chart(frame, x, y, "tensor in forward order (by layer)", "relative error against the baseline",
                  label="error propagation of every what-if")
    chart.shades += [{"x": bx, "w": bw} for bx, bw in x.bands()]
    dotted = sum(len(w.propagation) for w, _ in drawn) <= MAX_DOTS
    for w, c in drawn:
        chart.line([(p.tensor, p.error) for p in w.propagation], c, title=w.label, width=1.8)
        for p in w.propagation if dotted else ():
            chart.dot(p.tensor, p.error, c, title=f"{w.label}: {p.tensor} {number(p.error)}", radius=2.2)
        chart.key(w.label, c)
    return chart


def _sweep_axis(values: list[float], frame: Frame) -> LogAxis | LinearAxis:
    """Log over the swept values when they are all >= 0 (a zero gets its own tick), else linear."""
    start, end = frame.x0 + 24, frame.x1 - 24  # points off the axes
    if all(v >= 0 for v in values):
        return LogAxis.over(values, start, end)
    return LinearAxis(min(values), max(values), start, end, tuple(sorted(set(values))))


def sweep_charts(whatifs: list[WhatIfResult], colors: list[str], hues: dict[str, str]) -> list[Chart]:
    """Divergence rate and mean KL against the swept value: one curve per family through the mean
    over repeats, every run a dot, a whisker from the smallest to the largest repeat."""
    swept = [(w, c) for w, c in zip(whatifs, colors) if w.sweep_value is not None and finite(w.sweep_value)]
    if not swept:
        return []
    param = swept[0][0].sweep_param or "value"
    families: dict[str, list[tuple[WhatIfResult, str]]] = defaultdict(list)
    for w, c in swept:
        families[_family(w)].append((w, c))
    values = [w.sweep_value for w, _ in swept]
    charts = []
    for metric, title in (("divergence_rate", "requests that diverge"), ("mean_kl", "mean KL per step")):
        frame = Frame(width=540, height=260, left=64)
        x = _sweep_axis(values, frame)
        y = (percent_axis(frame)
             if metric == "divergence_rate" else
             LogAxis.over([getattr(w, metric) for w, _ in swept], frame.y0, frame.y1))
        chart = Chart(frame, x, y, param, title, label=f"{title} against {param}")
        for family, members in families.items():
            hue = hues[family]
            by_value: dict[float, list[float]] = defaultdict(list)
            for w, c in members:
                by_value[w.sweep_value].append(getattr(w, metric))
                chart.dot(w.sweep_value, getattr(w, metric), c, radius=3.5,
                          title=f"{w.label} (repeat {w.repeat}): {title} {number(getattr(w, metric))}")
            points = sorted((v, mean(ys)) for v, ys in by_value.items())
            chart.line(points, hue, title=_family_name(members[0][0]))
            for v, ys in by_value.items():
                chart.whisker(v, min(ys), max(ys), hue)
            chart.key(_family_name(members[0][0]), hue)
        charts.append(chart)
    return charts


def _bucket_means(runs: list[WhatIfResult], metric: str) -> list[float | None]:
    """Per prompt-length bucket, ``metric``'s mean over ``runs`` (repeats), None where unmeasured."""
    means = []
    for i in range(len(runs[0].stability.buckets)):
        measured = [getattr(w.stability.buckets[i], metric) for w in runs]
        measured = [v for v in measured if v is not None]
        means.append(mean(measured) if measured else None)
    return means


def length_charts(whatifs: list[WhatIfResult], colors: list[str]) -> list[Chart]:
    """Divergence rate and mean KL against the baseline per prompt-length bucket (long-context
    what-ifs): one curve per what-if and swept value through the mean over repeats. Every run
    replays the same requests, so they share the buckets; drawn from two buckets on."""
    measured = [(w, c) for w, c in zip(whatifs, colors) if w.stability is not None and len(w.stability.buckets) > 1]
    if not measured:
        return []
    buckets = measured[0][0].stability.buckets
    labels = [bucket_label(b) for b in buckets]
    curves: dict[tuple[str, float | None], list[tuple[WhatIfResult, str]]] = defaultdict(list)
    for w, c in measured:
        curves[(_family(w), w.sweep_value)].append((w, c))
    charts = []
    for metric, title in (("divergence_rate", "requests that diverge"), ("mean_kl", "mean KL per step")):
        frame = Frame(width=540, height=260, left=64)
        values = {key: _bucket_means([w for w, _ in members], metric) for key, members in curves.items()}
        y = (percent_axis(frame) if metric == "divergence_rate"
             else LogAxis.over([v for ys in values.values() for v in ys], frame.y0, frame.y1))
        chart = Chart(frame, bucket_axis(buckets, frame), y, "prompt length (tokens)", title,
                      label=f"{title} against prompt length, per what-if")
        for key, members in curves.items():
            w, c = members[0]
            chart.line(list(zip(labels, values[key])), c, title=w.label)
            for label, value in zip(labels, values[key]):
                chart.dot(label, value, c, radius=3, title=f"{w.label}, prompts of {label} tokens: {title} {number(value)}")
            chart.key(w.label, c)
        charts.append(chart)
    return charts


def _row(w: WhatIfResult, c: str) -> dict[str, Any]:
    steps = [s for s in w.first_divergent_step if s is not None]
    return {"w": w, "color": c, "first_step": min(steps) if steps else None,
            "vs_verdict": str(w.vs_source.get("verdict", "")), "vs_summary": str(w.vs_source.get("summary", "")),
            "vs_tensor": w.vs_source.get("first_divergent_tensor")}


def token_view(w: WhatIfResult, baseline: Comparison) -> list[dict[str, Any]]:
    """Per request, the what-if's own tokens (free-running) against the baseline's: each token
    "same", "diff" (the first that differs) or "after" (it follows from that one)."""
    view = []
    texts = baseline.b.get("output_tokens") or []
    for request, tokens in zip(baseline.requests, w.tokens):
        base = request.tokens_b
        own = w.token_texts[request.index] if request.index < len(w.token_texts) else []
        first = next((s for s, (x, y) in enumerate(zip(base, tokens)) if x != y), None)
        steps = [{"text": (own[s] if s < len(own) else str(token)).replace("\n", "↵"),
                  "state": "same" if first is None or s < first else "diff" if s == first else "after"}
                 for s, token in enumerate(tokens)]
        base_texts = texts[request.index] if request.index < len(texts) else []
        view.append({"request": request.index, "steps": steps, "diverged": first is not None,
                     "baseline": "".join(base_texts)})
    return view


def section(whatifs: list[WhatIfResult], baseline: Comparison | None = None) -> dict[str, Any] | None:
    """The what-ifs' panel, or None; with ``baseline`` (the baseline replay's comparison with its
    source) a token view per what-if too."""
    if not whatifs:
        return None
    hues = _hues(whatifs)
    colors = _colors(whatifs, hues)
    distinct = [color(i) for i in range(len(whatifs))]  # one hue per curve: shades of one hue blur
    return {"rows": [{**_row(w, col), "tokens": token_view(w, baseline) if baseline else []}
                     for w, col in zip(whatifs, colors)],
            "propagation": propagation_chart(whatifs, distinct), "sweeps": sweep_charts(whatifs, colors, hues),
            "lengths": length_charts(whatifs, colors),
            "repeats": any(w.repeat for w in whatifs), "swept": any(w.sweep_value is not None for w in whatifs),
            "param": next((w.sweep_param for w in whatifs if w.sweep_value is not None), None)}
