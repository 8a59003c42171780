"""Calibrated verdicts for a dtype or device change: the "double benchmark", with a test.

A bfloat16 replay of a float32 capture differs from it everywhere, by design; the question is
whether it differs *more than bfloat16 explains*. Ascend's own precision standard answers it by
scoring the device under test against a trusted device, both against a float32 reference: the
error ratio, not the error, is judged (mindformers ``tests/utils/double_benchmark.py``). ptrace
does the same with a **calibration run**: a trusted engine, never the replay's own engine at
the replay's own dtype and device (that would be the replay again), replays the reference at
the replay's dtype.

For every tensor and compared position ``p`` the replay's normwise relative error is divided by
the calibration's at the same position: ``ratio_p``. Two independent roundings to the same dtype
make errors of the same size, so where the replay's error is the dtype's, ``log(ratio_p)`` scatters
around 0 (engines that round differently shift it a little: :data:`MARGIN`). A fault adds error
of its own and pushes the whole distribution up. So, per tensor and request, a **one-sided
Student t-test over the positions' log-ratios** asks whether their mean is above ``log(MARGIN)``,
against their own spread (the calibration's spread and the replay's together): a small fault
seen at many positions is found where no fixed limit on one ratio could tell it from noise, and
one large ratio at one position among many is not mistaken for one. Every tensor and request is
one test; the family-wise error rate is held at :data:`ALPHA` (Bonferroni).

Reported per tensor: ``ratio_mean``, the geometric mean of the per-position ratios (the typical
multiple), ``ratio_max``, the largest per-position ratio (so never below ``ratio_mean``), and
``p_value``, the smallest of its requests' tests. The first divergent tensor of each request is
the earliest tensor in forward order whose test rejects there, at the earliest position whose
log-ratio is above ``log(MARGIN)`` by two of the tensor's standard deviations (else its largest).
"""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

import numpy as np

from ptrace.bundle_spec.names import forward_key
from ptrace.compare.localize import earliest
from ptrace.compare.results import CalibratedTensor, Calibration, Comparison, TensorResult
from ptrace.compare.summary import with_summary
from ptrace.compare.thresholds import FAIL, PASS, WARN, worst

#: Largest typical ratio (geometric mean) that is still the dtype's: two correct engines rounding
#: to the same dtype differ a little in how much error they make. HF transformers' bfloat16
#: against vLLM's, on a trained 30-layer model (SmolLM2-135M, four chat prompts), had typical
#: ratios of 1.11 at layer 17 and at most 1.21 (the last layer) (docs/verdicts.md).
MARGIN = 1.25
#: Family-wise false-alarm rate over all of a comparison's tests (tensors x requests).
ALPHA = 0.01
#: Added to both errors of a ratio, as a fraction of the tensor's noise floor: two bit-identical
#: positions have the ratio 1, not 0/0.
_EPSILON = 1e-3
#: Fewest positions a test needs (a spread needs two; below three it is too wide to tell anything).
MIN_POSITIONS = 3


def limits() -> dict[str, float]:
    """The test's parameters, as recorded with every calibrated verdict."""
    return {"margin": MARGIN, "alpha": ALPHA, "min_positions": float(MIN_POSITIONS)}


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (exact finite series for integer
    ``df``, the normal distribution past 200, where they agree to 1e-3 relative)."""
    if df > 200:
        return 1.0 - NormalDist().cdf(t)
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # P(|T| < t) = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * cos2
            series += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:  # P(|T| < t) = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, series = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * cos2
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, (1 - inside) / 2 if t >= 0 else (1 + inside) / 2))


def _one_sided(log_ratios: np.ndarray) -> tuple[float, float]:
    """(p-value of "mean log-ratio <= log MARGIN", standard deviation of the log-ratios)."""
    n = log_ratios.size
    if n < MIN_POSITIONS:
        return 1.0, 0.0
    excess = float(log_ratios.mean()) - math.log(MARGIN)
    spread = float(log_ratios.std(ddof=1))
    if spread == 0:
        return (0.0 if excess > 0 else 1.0), 0.0
    return t_sf(excess / (spread / math.sqrt(n)), n - 1), spread


def _paired(replay: TensorResult, calibration: TensorResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(request, position, log-ratio) at every position both runs compared."""
    def keyed(t: TensorResult) -> dict[tuple[int, int], float]:
        return dict(zip(zip(np.asarray(t.position_request).tolist(), np.asarray(t.position_index).tolist()),
                        np.asarray(t.position_rel, np.float64).tolist()))

    theirs = keyed(calibration)
    eps = _EPSILON * replay.noise_floor or np.finfo(np.float64).tiny
    rows = [(r, p, math.log((mine + eps) / (theirs[(r, p)] + eps)))
            for (r, p), mine in keyed(replay).items()
            if (r, p) in theirs and math.isfinite(mine) and math.isfinite(theirs[(r, p)])]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    requests, positions, logs = zip(*rows)
    return np.array(requests, np.int64), np.array(positions, np.int64), np.array(logs)


def _judge(replay: TensorResult, calibration: TensorResult, tests: int) -> tuple[CalibratedTensor, dict[int, int]]:
    """One tensor's calibrated result, and request -> first divergent position where it fails."""
    requests, positions, logs = _paired(replay, calibration)
    located, p_values = {}, []
    for request in np.unique(requests):
        mine = requests == request
        p_value, spread = _one_sided(logs[mine])
        p_values.append(p_value)
        if p_value * tests <= ALPHA:
            outliers = np.flatnonzero(logs[mine] > math.log(MARGIN) + 2 * spread)
            at = outliers[0] if outliers.size else int(np.argmax(logs[mine]))
            located[int(request)] = int(positions[mine][at])
    result = CalibratedTensor(
        name=replay.name, rel_err=calibration.rel_err, position_rel=calibration.position_rel,
        ratio_mean=float(np.exp(logs.mean())) if logs.size else math.nan,
        ratio_max=float(np.exp(logs.max())) if logs.size else math.nan,
        p_value=min(p_values, default=1.0), positions=int(logs.size), within=not located)
    return result, located


def calibrate(replay: Comparison, calibration: Comparison) -> Comparison:
    """``replay`` judged against ``calibration`` (both against the same reference A)."""
    theirs = {t.name: t for t in calibration.tensors}
    judged = {t.name: t for t in replay.tensors
              if t.name in theirs and not t.stats_only and not theirs[t.name].stats_only}
    tests = max(1, sum(len(np.unique(t.position_request)) for t in judged.values()))
    tensors, results, divergent = [], [], {}
    for t in sorted(replay.tensors, key=lambda t: forward_key(t.name)):
        if t.name not in judged:
            tensors.append(t)
            continue
        result, located = _judge(t, theirs[t.name], tests)
        results.append(result)
        tensors.append(replace(t, verdict=PASS if result.within else FAIL,
                               first_fail_position=min(located.values()) if located else None))
        for request, position in located.items():
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
    b = calibration.b
    record = Calibration(backend=b["backend"], dtype=b["dtype"], device=b["device"], path=b["path"],
                         limits=limits(), tensors=results, within=within,
                         sentence=_sentence(replay, b, results, first, within,
                                            tokens_own=any(level != PASS for level in token_levels)))
    request_first, name_first, position_first = first or (None, None, None)
    return with_summary(replace(
        replay, verdict=worst([PASS if within else FAIL, *token_levels]), tensors=tensors, requests=requests,
        calibration=record, localized_by="calibration", first_divergent_tensor=name_first,
        first_divergent_position=position_first, first_divergent_request=request_first,
        calibration_note=None))


def _sentence(replay: Comparison, trusted: dict, results: list[CalibratedTensor],
              first: tuple[int, str, int] | None, within: bool, *, tokens_own: bool) -> str:
    theirs = f"{trusted['backend']}'s {trusted['dtype']}"
    tokens = f"; tokens diverge where {theirs} does not" if tokens_own else ""
    return _tensors_sentence(replay, theirs, trusted["dtype"], results, first, within) + tokens


def _tensors_sentence(replay: Comparison, theirs: str, dtype: str, results: list[CalibratedTensor],
                      first: tuple[int, str, int] | None, within: bool) -> str:
    if not results:
        return f"no tensor was compared element-wise in both runs: nothing calibrated against {theirs}"
    if within:
        typical = max(results, key=lambda r: r.ratio_mean if np.isfinite(r.ratio_mean) else 0)
        largest = max(results, key=lambda r: r.ratio_max if np.isfinite(r.ratio_max) else 0)
        return (f"every tensor's error is what {dtype} explains: no tensor's per-position error is "
                f"significantly above {MARGIN:g}x {theirs} (one-sided t-test over positions, family-wise "
                f"alpha {ALPHA:g}; largest typical ratio {typical.ratio_mean:.3g}x at {typical.name}, largest "
                f"single ratio {largest.ratio_max:.3g}x at {largest.name})")
    if first is None:
        return "no tensor's error is more than the dtype explains"
    request, name, position = first
    result = next(r for r in results if r.name == name)
    return (f"{replay.b['backend']}'s {replay.b['dtype']} {name} makes {result.ratio_mean:.3g}x the error of "
            f"{theirs} (typical per-position ratio, p = {result.p_value:.2g} against at most {MARGIN:g}x; "
            f"request {request}, from position {position})")
