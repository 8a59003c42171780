"""Compare two bundles: tokens, tensors, distributions; then localize the divergence.

Engine-free by design (it reads bundles, never runs a model), so ``ptrace compare`` works on a
laptop with neither engine installed. Tensors stream through in blocks of rows; the result is
plain data (:class:`Comparison`) that the report renders without recomputing anything.

Alignment: rows are positions. Position ``p`` of the two runs is comparable only while both
were *fed the same tokens* up to ``p``; in a free-running replay that ends where the generated
tokens first differ, in a teacher-forced replay (both fed the reference's tokens) never.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ptrace.bundle_spec.layout import tensor_array
from ptrace.bundle_spec.names import forward_key, sort_forward
from ptrace.bundle_spec.reader import Bundle
from ptrace.replay.metrics import RunningTotals, kl_full, kl_topk, row_errors
from ptrace.replay.thresholds import FAIL, PASS, WARN, Thresholds, thresholds_for, worst

#: Rows per block, as float64 bytes: memory is bounded by this x a few temporaries x workers.
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorResult:
    name: str
    verdict: str
    positions: int
    max_abs_err: float
    mean_abs_err: float
    mean_rel_err: float
    cos_sim: float
    min_cos_sim: float
    thousandth_ratio: float
    first_fail_position: int | None
    stats_only: bool = False
    #: per compared position, for plots: absolute positions, mean abs error and cosine
    position_index: list[int] = field(default_factory=list, repr=False)
    position_mean_abs: list[float] = field(default_factory=list, repr=False)
    position_cos: list[float] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Divergence:
    """The first step where the generated tokens differ, and whether it is a near-tie."""

    step: int
    token_a: int
    token_b: int
    a_in_b_topk: bool
    b_in_a_topk: bool
    margin_a: float | None
    margin_b: float | None
    near_tie: bool


@dataclass(frozen=True)
class RequestResult:
    index: int
    prompt_len: int
    tokens_a: list[int]
    tokens_b: list[int]
    token_match_rate: float
    first_divergent_step: int | None
    divergence: Divergence | None
    compared_positions: int
    kl: list[float]
    kl_source: str
    topk_a: list[list[int]] = field(repr=False, default_factory=list)
    topk_b: list[list[int]] = field(repr=False, default_factory=list)


@dataclass(frozen=True)
class Comparison:
    verdict: str
    summary: str
    token_match_rate: float
    first_divergent_step: int | None
    first_divergent_tensor: str | None
    first_divergent_position: int | None
    largest_local_error: str | None
    first_nonfinite: dict[str, Any] | None
    thresholds: dict[str, float]
    tensors: list[TensorResult]
    requests: list[RequestResult]
    a: dict[str, Any]
    b: dict[str, Any]
    missing: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- alignment ----------------------------------------------------------------------------------

def _fed_tokens(bundle: Bundle, request: int) -> np.ndarray:
    """Tokens fed to the model at every position (SPEC: prompt, then generated tokens fed back)."""
    fed = bundle.input_ids(request)
    if fed is not None:
        return fed
    return np.concatenate([bundle.prompt_ids(request), bundle.output_ids(request)[:-1]])


def _comparable_positions(a: Bundle, b: Bundle, request: int) -> np.ndarray:
    """Positions captured in both runs whose whole input prefix is identical."""
    fed_a, fed_b = _fed_tokens(a, request), _fed_tokens(b, request)
    n = min(len(fed_a), len(fed_b))
    differs = np.flatnonzero(fed_a[:n] != fed_b[:n])
    limit = int(differs[0]) if differs.size else n
    common = np.intersect1d(a.positions(request), b.positions(request))
    return common[common < limit]


def _row_indices(positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    return np.searchsorted(positions, wanted)


def _read_rows(bundle: Bundle, request: int, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted indices) of a tensor, reading one contiguous slice."""
    block = bundle.tensor_rows(request, name, int(rows[0]), int(rows[-1]) + 1)
    contiguous = int(rows[-1]) - int(rows[0]) + 1 == rows.size
    return block if contiguous else block[rows - rows[0]]


# -- tokens -------------------------------------------------------------------------------------

def _margin(logprobs: np.ndarray) -> float | None:
    return float(logprobs[0] - logprobs[1]) if logprobs.shape[0] >= 2 else None


def _compare_tokens(a: Bundle, b: Bundle, request: int, thresholds: Thresholds) -> tuple:
    out_a, out_b = a.output_ids(request), b.output_ids(request)
    ids_a, lp_a = a.topk(request)
    ids_b, lp_b = b.topk(request)
    n = min(len(out_a), len(out_b))
    same = out_a[:n] == out_b[:n]
    rate = float(same.mean()) if n else 1.0
    mismatches = np.flatnonzero(~same)
    first = int(mismatches[0]) if mismatches.size else (n if len(out_a) != len(out_b) else None)
    divergence = None
    if first is not None and first < n:
        ta, tb = int(out_a[first]), int(out_b[first])
        a_in_b, b_in_a = ta in ids_b[first].tolist(), tb in ids_a[first].tolist()
        margin_a, margin_b = _margin(lp_a[first]), _margin(lp_b[first])
        margins = [m for m in (margin_a, margin_b) if m is not None]
        near_tie = a_in_b and b_in_a and bool(margins) and min(margins) < thresholds.tie_margin
        divergence = Divergence(first, ta, tb, a_in_b, b_in_a, margin_a, margin_b, near_tie)
    return rate, first, divergence, (ids_a, lp_a, ids_b, lp_b)


def _kl_per_step(a: Bundle, b: Bundle, request: int, steps: int, topk: tuple) -> tuple[list[float], str]:
    """KL(P_a || P_b) of each compared decode step's next-token distribution."""
    if steps <= 0:
        return [], "none"
    prompt_len = a.requests.requests[request].prompt_len
    wanted = prompt_len - 1 + np.arange(steps)  # the logits row that predicts token s
    if a.has_tensor(request, "logits") and b.has_tensor(request, "logits"):
        pos_a, pos_b = a.positions(request), b.positions(request)
        if np.isin(wanted, pos_a).all() and np.isin(wanted, pos_b).all():
            la = _read_rows(a, request, "logits", _row_indices(pos_a, wanted))
            lb = _read_rows(b, request, "logits", _row_indices(pos_b, wanted))
            return kl_full(la, lb).tolist(), "full logits"
    ids_a, lp_a, ids_b, lp_b = topk
    return kl_topk(ids_a[:steps], lp_a[:steps], ids_b[:steps], lp_b[:steps]).tolist(), \
        f"top-{ids_a.shape[1]} logprobs"


# -- tensors ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Alignment:
    """Per request: the comparable positions, and where they sit in each bundle's rows."""

    positions: np.ndarray
    rows_a: np.ndarray
    rows_b: np.ndarray


def _align(a: Bundle, b: Bundle, request: int) -> _Alignment:
    wanted = _comparable_positions(a, b, request)
    return _Alignment(wanted, _row_indices(a.positions(request), wanted),
                      _row_indices(b.positions(request), wanted))


def _compare_tensor(a: Bundle, b: Bundle, name: str, alignments: dict[int, _Alignment],
                    thresholds: Thresholds) -> TensorResult:
    if not all(a.has_tensor(r, name) and b.has_tensor(r, name) for r in alignments):
        return _compare_stats(a, b, name, alignments, thresholds)
    totals = RunningTotals()
    index: list[np.ndarray] = []
    for request, aligned in alignments.items():
        wanted = aligned.positions
        if not wanted.size:
            continue
        row_bytes = max(1, int(np.prod(a.manifest.arrays[tensor_array(request, name)].shape[1:])) * 8)
        block = max(1, BLOCK_BYTES // row_bytes)
        for start in range(0, wanted.size, block):
            rows_a = _read_rows(a, request, name, aligned.rows_a[start:start + block])
            rows_b = _read_rows(b, request, name, aligned.rows_b[start:start + block])
            totals.add(row_errors(rows_a, rows_b))
            index.append(wanted[start:start + block])
    mean_abs, cos = totals.rows_of("mean_abs"), totals.rows_of("cos")
    verdicts = [thresholds.verdict(m, c) for m, c in zip(mean_abs, cos)]
    failing = [i for i, v in enumerate(verdicts) if v == FAIL]
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    return TensorResult(
        name=name, verdict=thresholds.verdict(totals.mean_abs, totals.cos) if totals.rows else PASS,
        positions=totals.rows, max_abs_err=totals.max_abs, mean_abs_err=totals.mean_abs,
        mean_rel_err=totals.mean_rel, cos_sim=totals.cos,
        min_cos_sim=float(cos.min()) if cos.size else float("nan"),
        thousandth_ratio=totals.thousandth,
        first_fail_position=int(flat_index[failing[0]]) if failing else None,
        position_index=flat_index.tolist(), position_mean_abs=mean_abs.tolist(), position_cos=cos.tolist())


def _compare_stats(a: Bundle, b: Bundle, name: str, alignments: dict[int, _Alignment],
                   thresholds: Thresholds) -> TensorResult:
    """Stats-only bundles: compare per-position mean |x| and std instead of elements."""
    diffs, index = [], []
    for request, aligned in alignments.items():
        wanted = aligned.positions
        if not wanted.size:
            continue
        sa = a.stats(request, name)[aligned.rows_a]
        sb = b.stats(request, name)[aligned.rows_b]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(sa[:, [3, 4]] - sb[:, [3, 4]]) / (np.abs(sa[:, [3, 4]]) + 1e-8)
        diffs.append(np.nanmax(rel, axis=1))
        index.append(wanted)
    rel = np.concatenate(diffs) if diffs else np.zeros(0)
    worst_rel = float(rel.max()) if rel.size else 0.0
    # A relative change of the row's scale is compared with the mean-abs thresholds.
    verdict = PASS if worst_rel < thresholds.pass_mean_abs else WARN if worst_rel < thresholds.warn_mean_abs else FAIL
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    failing = np.flatnonzero(rel >= thresholds.warn_mean_abs)
    nan = float("nan")
    return TensorResult(
        name=name, verdict=verdict, positions=int(rel.size), max_abs_err=nan, mean_abs_err=nan,
        mean_rel_err=float(rel.mean()) if rel.size else nan, cos_sim=nan, min_cos_sim=nan,
        thousandth_ratio=nan, first_fail_position=int(flat_index[failing[0]]) if failing.size else None,
        stats_only=True, position_index=flat_index.tolist(), position_mean_abs=rel.tolist(), position_cos=[])


def _first_nonfinite(bundle: Bundle, label: str, names: list[str]) -> dict[str, Any] | None:
    """The first tensor in forward order (then position) holding a NaN or Inf."""
    found = None
    for request in range(bundle.num_requests):
        for name in names:
            stats = bundle.stats(request, name)
            bad = np.flatnonzero(stats[:, 5] + stats[:, 6] > 0)
            if bad.size:
                position = int(bundle.positions(request)[bad[0]])
                key = (forward_key(name), position)
                if found is None or key < found[0]:
                    found = (key, {"bundle": label, "request": request, "tensor": name, "position": position})
                break
    return found[1] if found else None


def _largest_local_error(results: list[TensorResult]) -> str | None:
    """The tensor whose error grows most over the tensor before it in forward order."""
    best, best_growth, previous = None, 1.0, 0.0
    for result in results:
        if result.stats_only or not np.isfinite(result.cos_sim):
            continue
        error = max(1.0 - result.cos_sim, 0.0)
        growth = error / max(previous, 1e-12)
        if error > 1e-9 and growth > best_growth:
            best, best_growth = result.name, growth
        previous = error
    return best


def _run_summary(bundle: Bundle) -> dict[str, Any]:
    run = bundle.run
    return {
        "path": str(bundle.path), "bundle_id": bundle.manifest.bundle_id, "backend": run.backend,
        "backend_version": run.backend_version, "dtype": run.dtype, "device": run.device,
        "mode": bundle.mode, "command": list(bundle.manifest.command), "model": bundle.model.name,
        "model_fingerprint": bundle.model.fingerprint, "run": run.to_dict(),
        "environment": bundle.environment.to_dict(), "replay": bundle.replay_info(),
        "output_tokens": [list(r.output_tokens) for r in bundle.requests.requests],
    }


def compare(a: Bundle, b: Bundle, *, threshold_overrides: dict[str, float] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Compare run ``b`` against reference run ``a`` (same inputs; engines, dtypes may differ)."""
    thresholds = thresholds_for(a.run.dtype, threshold_overrides)
    if a.num_requests != b.num_requests:
        raise ValueError(f"the bundles have {a.num_requests} and {b.num_requests} requests")
    for r in range(a.num_requests):
        if a.prompt_ids(r).tolist() != b.prompt_ids(r).tolist():
            raise ValueError(f"request {r} has different prompts in the two bundles: not the same run")

    requests, alignments = [], {}
    for r in range(a.num_requests):
        rate, first, divergence, topk = _compare_tokens(a, b, r, thresholds)
        alignments[r] = _align(a, b, r)
        compared = alignments[r].positions
        prompt_len = a.requests.requests[r].prompt_len
        steps = int(min(len(a.output_ids(r)), len(b.output_ids(r)),
                        max(0, compared.max() - prompt_len + 2) if compared.size else 0))
        kl, kl_source = _kl_per_step(a, b, r, steps, topk)
        requests.append(RequestResult(
            index=r, prompt_len=prompt_len, tokens_a=a.output_ids(r).tolist(),
            tokens_b=b.output_ids(r).tolist(), token_match_rate=rate, first_divergent_step=first,
            divergence=divergence, compared_positions=int(compared.size), kl=kl, kl_source=kl_source,
            topk_a=topk[0].tolist(), topk_b=topk[2].tolist()))

    names = sort_forward(set(a.tensor_names) & set(b.tensor_names))
    missing = sorted(set(a.tensor_names) ^ set(b.tensor_names))
    # Tensors are independent and numpy releases the GIL: one worker per core.
    done = 0

    def one(name: str) -> TensorResult:
        nonlocal done
        result = _compare_tensor(a, b, name, alignments, thresholds)
        done += 1
        if progress:
            progress(done, len(names))
        return result

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        tensors = list(pool.map(one, names))

    first_tensor, first_position = _first_divergent(tensors)
    total = sum(len(r.tokens_a) for r in requests)
    matched = sum(r.token_match_rate * min(len(r.tokens_a), len(r.tokens_b)) for r in requests)
    token_rate = matched / total if total else 1.0
    first_step = min((r.first_divergent_step for r in requests if r.first_divergent_step is not None),
                     default=None)
    token_verdicts = [PASS if r.divergence is None and r.first_divergent_step is None
                      else WARN if r.divergence is not None and r.divergence.near_tie else FAIL
                      for r in requests]
    verdict = worst([t.verdict for t in tensors] + token_verdicts)
    comparison = Comparison(
        verdict=verdict, summary="", token_match_rate=token_rate, first_divergent_step=first_step,
        first_divergent_tensor=first_tensor, first_divergent_position=first_position,
        largest_local_error=_largest_local_error(tensors),
        first_nonfinite=_first_nonfinite(a, "a", names) or _first_nonfinite(b, "b", names),
        thresholds=thresholds.to_dict(), tensors=tensors, requests=requests,
        a=_run_summary(a), b=_run_summary(b), missing=missing)
    return _with_summary(comparison)


def combine(*, tensors: Comparison, tokens: Comparison) -> Comparison:
    """One result from two replays of the same bundle: tensor metrics from one (teacher-forced,
    aligned at every position), token agreement from the other (free-running)."""
    if tensors is tokens:
        return tensors
    merged = {**tensors.__dict__, "token_match_rate": tokens.token_match_rate,
              "first_divergent_step": tokens.first_divergent_step, "requests": tokens.requests,
              "verdict": worst([tensors.verdict, tokens.verdict])}
    return _with_summary(Comparison(**merged))


def _first_divergent(tensors: list[TensorResult]) -> tuple[str | None, int | None]:
    """The earliest failing tensor in forward order at the earliest failing position."""
    failing = [t for t in tensors if t.first_fail_position is not None]
    if not failing:
        return None, None
    position = min(t.first_fail_position for t in failing)
    first = min((t for t in failing if t.first_fail_position == position), key=lambda t: forward_key(t.name))
    return first.name, position


def _with_summary(c: Comparison) -> Comparison:
    """The one sentence at the top of the report."""
    total = sum(len(r.tokens_a) for r in c.requests)
    same = round(c.token_match_rate * total)
    if c.first_divergent_step is None:
        tokens = f"tokens identical for {same}/{total} steps"
    else:
        tie = any(r.divergence is not None and r.divergence.near_tie for r in c.requests)
        tokens = (f"tokens agree for {same}/{total} steps, first divergence at step "
                  f"{c.first_divergent_step}{' (a near-tie flip)' if tie else ''}")
    if c.first_divergent_tensor is not None:
        result = next(t for t in c.tensors if t.name == c.first_divergent_tensor)
        where = (f"first divergent tensor {c.first_divergent_tensor} at position {c.first_divergent_position}"
                 + (f", cos {result.cos_sim:.6g}" if not result.stats_only else ""))
    elif warned := [t.name for t in c.tensors if t.verdict == WARN]:
        where = f"no tensor fails, {len(warned)} warn (first: {warned[0]})"
    else:
        worst_cos = min((t.cos_sim for t in c.tensors if not t.stats_only), default=None)
        where = "every tensor within tolerance" + (f" (worst cos {worst_cos:.7g})" if worst_cos is not None else "")
    summary = f"{c.verdict.upper()}: {tokens}; {where}"
    if c.first_nonfinite:
        summary += f"; first NaN/Inf in {c.first_nonfinite['tensor']} ({c.first_nonfinite['bundle']})"
    return Comparison(**{**c.__dict__, "summary": summary})
