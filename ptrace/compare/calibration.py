"""Calibrated verdicts for a dtype or device change: the "double benchmark".

A bfloat16 replay of a float32 capture differs from it everywhere, by design; the question is
whether it differs *more than bfloat16 explains*. Ascend's own precision standard answers it by
scoring the device under test against a trusted device, both against a float32 reference:
the error ratio, not the error, is judged (mindformers ``tests/utils/double_benchmark.py``).
ptrace does the same with a **calibration run**: a trusted engine (the reference's own, else HF
transformers) replays the reference at the replay's dtype. For every tensor,

- ``ratio_mean``: the replay's normwise relative error over the calibration's (all compared
  positions; an RMSE ratio), limit :data:`LIMITS` ``["mean"]``;
- ``ratio_max``: the largest per-position error over the calibration's largest, limit
  ``["max"]``.

Within both limits everywhere, the replay passes "within <dtype> noise". Otherwise the first
divergent tensor of each request is the earliest tensor in forward order whose ratios break
out there, at the earliest position where its error exceeds ``LIMITS["mean"]`` times the
calibration's typical error for that request ("vllm's bfloat16 layers.2.attn adds 6x the error
of torch's bfloat16").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ptrace.bundle_spec.names import forward_key
from ptrace.compare.localize import earliest
from ptrace.compare.results import Calibration, CalibratedTensor, Comparison, TensorResult
from ptrace.compare.summary import with_summary
from ptrace.compare.thresholds import FAIL, PASS, WARN, worst

#: Largest accepted ratios of the replay's error to the calibration's (module docstring). The
#: same engine twice gives 1; vLLM and HF transformers, both in bfloat16 against float32, stayed
#: within 0.86-1.14 (mean) on the example model (November 2026).
LIMITS = {"mean": 2.0, "max": 5.0}


def _per_request(t: TensorResult) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """request -> (positions, per-position relative errors)."""
    requests = np.asarray(t.position_request, np.int64)
    positions = np.asarray(t.position_index, np.int64)
    rel = np.asarray(t.position_rel, np.float64)
    return {int(r): (positions[requests == r], rel[requests == r]) for r in np.unique(requests)}


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values**2))) if values.size else 0.0


def _ratio(replay: float, calibration: float) -> float:
    if replay == 0:
        return 0.0 if calibration == 0 or np.isfinite(calibration) else np.nan
    return replay / calibration if calibration > 0 else np.inf


def _located(replay: TensorResult, calibration: TensorResult) -> dict[int, int]:
    """request -> the earliest position where this tensor's error breaks out of calibration."""
    found = {}
    reference = _per_request(calibration)
    for request, (positions, rel) in _per_request(replay).items():
        cal_positions, cal_rel = reference.get(request, (np.zeros(0, np.int64), np.zeros(0)))
        if _ratio(_rms(rel), _rms(cal_rel)) <= LIMITS["mean"] and \
                _ratio(float(rel.max(initial=0)), float(cal_rel.max(initial=0))) <= LIMITS["max"]:
            continue
        level = LIMITS["mean"] * _rms(cal_rel)
        above = np.flatnonzero(~(rel <= level))
        if above.size:
            found[request] = int(positions[above[0]])
    return found


def calibrate(replay: Comparison, calibration: Comparison) -> Comparison:
    """``replay`` judged against ``calibration`` (both against the same reference A)."""
    theirs = {t.name: t for t in calibration.tensors}
    tensors, results, divergent = [], [], {}
    for t in sorted(replay.tensors, key=lambda t: forward_key(t.name)):
        cal = theirs.get(t.name)
        if cal is None or t.stats_only != cal.stats_only:
            tensors.append(t)
            continue
        ratio_mean = _ratio(t.rel_err, cal.rel_err)
        ratio_max = _ratio(max(t.position_rel, default=0.0), max(cal.position_rel, default=0.0))
        within = bool(ratio_mean <= LIMITS["mean"] and ratio_max <= LIMITS["max"])
        results.append(CalibratedTensor(name=t.name, rel_err=cal.rel_err, position_rel=cal.position_rel,
                                        ratio_mean=ratio_mean, ratio_max=ratio_max, within=within))
        tensors.append(replace(t, verdict=PASS if within else FAIL))
        for request, position in _located(t, cal).items():
            divergent.setdefault(request, (t.name, position))
    within = all(r.within for r in results)
    requests, token_levels = [], []
    calibration_flips = {c.index: c.first_divergent_step is not None for c in calibration.requests}
    for r in replay.requests:
        located = divergent.get(r.index, (None, None))
        requests.append(replace(r, first_divergent_tensor=located[0], first_divergent_position=located[1]))
        # A token flip the trusted engine makes too at this dtype is the dtype's, not a bug.
        if r.first_divergent_step is None or calibration_flips.get(r.index, False):
            token_levels.append(PASS)
        else:
            token_levels.append(WARN if r.divergence is not None and r.divergence.near_tie else FAIL)
    first = earliest(divergent)
    verdict = worst([PASS if within else FAIL, *token_levels])
    b, dtype = calibration.b, calibration.b["dtype"]
    worst_ratio = max(results, key=lambda r: r.ratio_mean if np.isfinite(r.ratio_mean) else 0, default=None)
    if within:
        sentence = (f"every tensor's error is within {LIMITS['mean']:g}x (mean) and {LIMITS['max']:g}x "
                    f"(largest) of {b['backend']}'s {dtype} error"
                    + (f" (largest ratio {worst_ratio.ratio_mean:.2g}, at {worst_ratio.name})" if worst_ratio else ""))
    elif first is not None:
        request, name, position = first
        result = next(r for r in results if r.name == name)
        sentence = (f"{replay.b['backend']}'s {replay.b['dtype']} {name} adds {result.ratio_mean:.2g}x the error of "
                    f"{b['backend']}'s {dtype} (request {request}, position {position})")
    else:
        sentence = f"tokens diverge where {b['backend']}'s {dtype} does not"
    record = Calibration(backend=b["backend"], dtype=dtype, device=b["device"], path=b["path"],
                         limits=dict(LIMITS), tensors=results, within=within, sentence=sentence)
    request_first, name_first, position_first = first or (None, None, None)
    return with_summary(replace(
        replay, verdict=verdict, tensors=tensors, requests=requests, calibration=record, localized_by="calibration",
        first_divergent_tensor=name_first, first_divergent_position=position_first,
        first_divergent_request=request_first))
