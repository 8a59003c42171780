"""The report's "where do the runs part ways" panels: the error of every tensor along the forward
pass against its noise floor (and the calibration run's error, when there is one), and each
layer's own error against the error it inherits.

Errors are normwise relative errors ``||B - A|| / ||A||`` (for stats-only tensors: the relative
change of a row's scale), on a log axis: activations and their errors range over orders of
magnitude between layers, and the noise floor is relative too (``ptrace.compare.noise``).
"""

from __future__ import annotations

from typing import Any

from ptrace.compare import Comparison
from ptrace.compare.results import LocalError, TensorResult
from ptrace.reports.plots import NONFINITE, ROUNDING, CategoryAxis, Chart, ForwardAxis, Frame, LogAxis, finite, number

ERROR, ABOVE, CALIBRATION, DIVERGENT = "#33475b", "#d62728", "#9ecae1", "#c5221f"
LOCAL, PROPAGATED = "#f28e2b", "#4e79a7"


def _times(value: float, reference: float) -> str:
    return f"{number(value / reference, 3)}x" if reference > 0 and finite(value) else "–"


def _tooltip(t: TensorResult, calibration: float | None) -> str:
    what = "relative change of scale (stats only)" if t.stats_only else "relative error"
    text = (f"{t.name}: {what} {number(t.rel_err)}; noise floor {number(t.noise_floor)} "
            f"({_times(t.rel_err, t.noise_floor)})")
    if calibration is not None:
        text += f"; calibration {number(calibration)} ({_times(t.rel_err, calibration)})"
    return text


def error_chart(c: Comparison) -> Chart | None:
    """Every tensor's error in forward order, over the noise floor band and the calibration band;
    dots above the floor are red, a NaN or Inf sits at the top, and the first divergent tensor is
    marked."""
    tensors = [t for t in c.tensors if t.positions]  # a tensor with no compared row has nothing to show
    if not tensors:
        return None
    calibrated = {t.name: t.rel_err for t in c.calibration.tensors} if c.calibration else {}
    frame = Frame(height=300)
    x = ForwardAxis.over([t.name for t in tensors], frame.x0, frame.x1)
    y = LogAxis.over([v for t in tensors for v in (t.rel_err, t.noise_floor or None)]
                     + [calibrated.get(t.name) for t in tensors], frame.y0, frame.y1)
    stats_only = all(t.stats_only for t in tensors)
    chart = Chart(frame, x, y, "tensor in forward order (by layer)",
                  "relative change of scale" if stats_only else "relative error ‖B−A‖ / ‖A‖",
                  label="relative error of every tensor in forward order")
    chart.shades += [{"x": bx, "w": bw} for bx, bw in x.bands()]
    floors = [(t.name, t.noise_floor) for t in tensors if t.noise_floor > 0]
    if floors:
        chart.area(floors, ROUNDING, title="noise floor: below it, a difference is rounding", edge="#aab4bf")
        chart.key("noise floor (rounding)", ROUNDING, "band")
    if calibrated and c.calibration:
        curve = [(t.name, calibrated.get(t.name)) for t in tensors]
        name = f"calibration: {c.calibration.backend} {c.calibration.dtype} against A"
        chart.area(curve, CALIBRATION, title=name, opacity=0.55, edge="#4a90c2")
        chart.key(name, CALIBRATION, "band")
    chart.line([(t.name, t.rel_err) for t in tensors], ERROR, title="B against A", width=1.6)
    chart.key("B against A", ERROR)
    for t in tensors:
        above = t.rel_err > t.noise_floor
        chart.dot(t.name, t.rel_err, ABOVE if above else ERROR, title=_tooltip(t, calibrated.get(t.name)),
                  radius=3.2 if above else 2.4, hollow=t.stats_only)
    if any(t.rel_err > t.noise_floor for t in tensors):
        chart.key("above the noise floor", ABOVE, "dot")
    broken = [t for t in tensors if not finite(t.rel_err)]
    for t in broken:
        chart.dot(t.name, 10.0**y.hi, NONFINITE, title=f"{t.name}: NaN or Inf", radius=4)
    if broken:
        chart.key("NaN / Inf", NONFINITE, "dot")
    if any(t.stats_only for t in tensors) and not stats_only:
        chart.key("stats only: relative change of scale", ERROR, "ring")
    if c.first_divergent_tensor in x.names:
        chart.vertical(c.first_divergent_tensor, DIVERGENT, f"first divergent: {c.first_divergent_tensor}")
    return chart


def local_error_chart(errors: list[LocalError], source: str) -> Chart | None:
    """Each layer's own error (bars) against the error it shows in the plain replay (line)."""
    if not errors:
        return None
    frame = Frame(height=260)
    x = CategoryAxis(tuple(e.tensor for e in errors), frame.x0, frame.x1)
    y = LogAxis.over([v for e in errors for v in (e.local_error, e.propagated_error)], frame.y0, frame.y1)
    chart = Chart(frame, x, y, "layer", "relative error", label="local and propagated error per layer")
    own = "own error (input spliced from A)" if source == "measured" else "own error (growth over the tensor before)"
    for e in errors:
        tip = (f"{e.tensor}: own error {number(e.local_error)}, propagated {number(e.propagated_error)}, "
               f"amplification {number(e.amplification)}x")
        chart.bar(e.tensor, e.local_error, LOCAL, title=tip)
        chart.dot(e.tensor, e.propagated_error, PROPAGATED, title=tip)
        if finite(e.amplification) and finite(e.propagated_error) and len(errors) <= 40:
            chart.note(x.px(e.tensor), y.px(e.propagated_error) - 8, f"{number(e.amplification, 2)}x", "#555")
    chart.line([(e.tensor, e.propagated_error) for e in errors], PROPAGATED, title="propagated error")
    chart.key(own, LOCAL, "bar")
    chart.key("error in the plain replay (inherited + own); above it: amplification, propagated / own", PROPAGATED)
    return chart


def calibration_rows(c: Comparison) -> list[dict[str, Any]]:
    """The ratio table: the replay's error, the calibration's, and their ratio per tensor."""
    if c.calibration is None:
        return []
    replay = {t.name: t.rel_err for t in c.tensors}
    return [{"name": t.name, "replay": replay.get(t.name), "calibration": t.rel_err, "mean": t.ratio_mean,
             "max": t.ratio_max, "p_value": t.p_value, "within": t.within} for t in c.calibration.tensors]
