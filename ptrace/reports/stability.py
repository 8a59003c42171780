"""The report's "Stability across requests" section: divergence rate against prompt length, KL and
top-1 agreement against absolute position, and where first divergences fall ("Div_Index").

It draws ``Comparison.stability`` (``compare.stability``) and measures nothing. One request has no
distribution to show, so the section appears from :data:`MIN_REQUESTS` requests on.
"""

from __future__ import annotations

from typing import Any

from ptrace.compare.results import LengthBucket, Stability
from ptrace.compare.stability import MIN_PER_BUCKET
from ptrace.reports.plots import CategoryAxis, Chart, Frame, LinearAxis, LogAxis, color, number

MIN_REQUESTS = 2
PERCENT = (0.0, 0.25, 0.5, 0.75, 1.0)


def bucket_label(bucket: LengthBucket) -> str:
    return str(bucket.min_len) if bucket.min_len == bucket.max_len else f"{bucket.min_len}–{bucket.max_len}"


def _half() -> Frame:
    return Frame(width=540, height=260, left=64)


def percent_axis(frame: Frame) -> LinearAxis:
    return LinearAxis(0.0, 1.0, frame.y0, frame.y1, PERCENT, percent=True)


def bucket_axis(buckets: list[LengthBucket], frame: Frame) -> CategoryAxis:
    return CategoryAxis(tuple(bucket_label(b) for b in buckets), frame.x0, frame.x1)


def divergence_chart(s: Stability) -> Chart:
    """One bar per prompt-length bucket: the share of its requests whose tokens differ."""
    frame = _half()
    chart = Chart(frame, bucket_axis(s.buckets, frame), percent_axis(frame), "prompt length (tokens)",
                  "requests that diverge", label="divergence rate against prompt length")
    for bucket in s.buckets:
        chart.bar(bucket_label(bucket), bucket.divergence_rate, color(3), width=0.7,
                  title=f"prompts of {bucket_label(bucket)} tokens: {bucket.diverged}/{bucket.requests} "
                        f"requests diverge; mean KL {number(bucket.mean_kl)}")
    return chart


def div_index_chart(s: Stability) -> Chart | None:
    """How many requests first diverge at each decode step (binned)."""
    if not s.div_index:
        return None
    frame = _half()
    labels = tuple(str(b.min_step) if b.min_step == b.max_step else f"{b.min_step}–{b.max_step}"
                   for b in s.div_index)
    y = LinearAxis.over([b.requests for b in s.div_index], frame.y0, frame.y1, most=5, whole=True)
    chart = Chart(frame, CategoryAxis(labels, frame.x0, frame.x1), y, "first divergent step (Div_Index)",
                  "requests", label="distribution of first divergent steps")
    for label, b in zip(labels, s.div_index):
        chart.bar(label, b.requests, color(0), width=0.7, title=f"step {label}: {b.requests} request(s) first diverge")
    return chart


def _position_axis(s: Stability, frame: Frame) -> LinearAxis:
    return LinearAxis.over([b.max_pos + 1 for b in s.positions] + [min(b.min_pos for b in s.positions)],
                           frame.x0, frame.x1, most=6)


def _middle(first: int, last: int) -> float:
    return (first + last) / 2


def kl_chart(s: Stability) -> Chart | None:
    """Mean KL per position bin (a line) and the largest (rings)."""
    drawn = [b for b in s.positions if b.mean_kl is not None]
    if not drawn:
        return None
    frame = _half()
    y = LogAxis.over([b.max_kl for b in drawn] + [b.mean_kl for b in drawn], frame.y0, frame.y1)
    chart = Chart(frame, _position_axis(s, frame), y, "absolute position (tokens of context)",
                  "KL(A ‖ B) per step", label="KL against position")
    chart.line([(_middle(b.min_pos, b.max_pos), b.mean_kl) for b in drawn], color(0), title="mean KL")
    for b in drawn:
        at = f"positions {b.min_pos}–{b.max_pos}" if b.max_pos > b.min_pos else f"position {b.min_pos}"
        chart.dot(_middle(b.min_pos, b.max_pos), b.mean_kl, color(0), radius=2.5,
                  title=f"{at}: mean KL {number(b.mean_kl)} over {b.steps} steps of {b.requests} request(s)")
        chart.dot(_middle(b.min_pos, b.max_pos), b.max_kl, color(1), radius=3, hollow=True,
                  title=f"{at}: largest KL {number(b.max_kl)}")
    chart.key("mean", color(0))
    chart.key("largest", color(1), "ring")
    return chart


def agreement_chart(s: Stability) -> Chart | None:
    """The share of steps per position bin where both runs' most likely token is the same."""
    drawn = [b for b in s.positions if b.top1_agreement is not None]
    if not drawn:
        return None
    frame = _half()
    chart = Chart(frame, _position_axis(s, frame), percent_axis(frame), "absolute position (tokens of context)",
                  "top-1 agreement", label="top-1 agreement against position")
    chart.line([(_middle(b.min_pos, b.max_pos), b.top1_agreement) for b in drawn], color(2), title="top-1 agreement")
    for b in drawn:
        chart.dot(_middle(b.min_pos, b.max_pos), b.top1_agreement, color(2), radius=2.5,
                  title=f"positions {b.min_pos}–{b.max_pos}: top-1 agrees at "
                        f"{b.top1_agreement * 100:.1f}% of {b.steps} steps")
    return chart


def section(s: Stability | None) -> dict[str, Any] | None:
    if s is None or s.requests < MIN_REQUESTS:
        return None
    return {"s": s, "labels": [bucket_label(b) for b in s.buckets], "min_per_bucket": MIN_PER_BUCKET,
            "charts": [c for c in (divergence_chart(s), div_index_chart(s)) if c is not None],
            "position_charts": [c for c in (kl_chart(s), agreement_chart(s)) if c is not None]}
