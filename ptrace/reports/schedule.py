"""The report's "Schedule" panel: which requests a batched engine ran together, step by step
(``meta/schedule``), one stacked bar per engine step, for the compared runs and for each batch
what-if's own run.

A bar's height is the step's batch size (requests), split into the recorded requests' prefill
chunks, their decodes, and requests the bundle does not record (a batch what-if's fillers); its
tooltip gives the tokens. Nothing is measured here: the counts are the node's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptrace.bundle_spec.summary import schedule_summary
from ptrace.compare.results import WhatIfResult
from ptrace.reports.plots import ROUNDING, Chart, Frame, LinearAxis, color

#: Steps drawn at most (the first ones): a long run's decode steps all look alike.
MAX_STEPS = 400
_PARTS = (("prefill (recorded requests)", color(1)), ("decode (recorded requests)", color(0)),
          ("not recorded (fillers)", ROUNDING))


def _parts(step: dict[str, Any]) -> tuple[int, int, int]:
    """Requests of a step: recorded prefills, recorded decodes, unrecorded."""
    entries = list(zip(step["requests"], step["prefill"]))
    return (sum(r >= 0 and p for r, p in entries), sum(r >= 0 and not p for r, p in entries),
            sum(r < 0 for r, _ in entries))


def timeline(schedule: dict[str, Any], run: str) -> Chart:
    steps = schedule["steps"][:MAX_STEPS]
    frame = Frame(height=220)
    x = LinearAxis.over([0, max(len(steps) - 1, 1)], frame.x0 + 16, frame.x1 - 16, most=12, whole=True)
    y = LinearAxis.over([len(s["requests"]) for s in steps] or [1], frame.y0, frame.y1, most=5, whole=True)
    shown = len(steps) if len(steps) == len(schedule["steps"]) else f"the first {len(steps)} of {len(schedule['steps'])}"
    chart = Chart(frame, x, y, f"engine step ({shown})", "requests in the step", label=f"schedule of {run}")
    width = max(min((frame.x1 - frame.x0) / max(len(steps), 1) * 0.7, 24.0), 0.6)
    for index, step in enumerate(steps):
        tokens = sum(step["tokens"])
        counts = _parts(step)
        title = (f"step {index}: {len(step['requests'])} requests, {tokens} tokens; {counts[0]} prefill chunks, "
                 f"{counts[1]} decodes of recorded requests, {counts[2]} unrecorded"
                 + (f"; {sum(step['cached'])} prompt tokens from the prefix cache" if any(step["cached"]) else ""))
        below = 0
        for count, (_, fill) in zip(counts, _PARTS):
            if count:
                top, bottom = y.px(below + count), y.px(below)
                chart.bars.append({"x": round(x.px(index) - width / 2, 1), "y": top, "w": round(width, 1),
                                   "h": round(bottom - top, 1), "color": fill, "title": title})
                below += count
    for name, fill in _PARTS:
        chart.key(name, fill, "bar")
    return chart


def section(a: dict[str, Any], b: dict[str, Any], whatifs: Sequence[WhatIfResult] = ()) -> list[dict[str, Any]]:
    """A timeline and a summary for each run that recorded its schedule: the compared runs, then
    each batch what-if's own (its teacher-forced run's), beside the baseline's batches (B)."""
    runs = [(name, run.get("schedule"), run["path"]) for name, run in (("A", a), ("B", b))]
    runs += [(f"what-if {w.label} (teacher-forced)", w.schedule, w.bundles.get("teacher-forced", ""))
             for w in whatifs]
    return [{"run": name, "path": path, "chart": timeline(schedule, name), "summary": schedule_summary(schedule)}
            for name, schedule, path in runs if schedule and schedule["steps"]]
