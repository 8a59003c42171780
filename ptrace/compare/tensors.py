"""Per-tensor agreement over the comparable positions, streamed in blocks of rows.

Memory stays bounded by the block size whatever the bundle size: rows are read a block at a
time and folded into running totals (:class:`~ptrace.compare.metrics.RunningTotals`). Where a
run captured only statistics (``--mode stats``), the tensor is compared by its statistics.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ptrace.bundle_spec.layout import tensor_array
from ptrace.bundle_spec.reader import Bundle
from ptrace.compare import noise
from ptrace.compare.align import Alignment, align_tensor
from ptrace.compare.metrics import KERNEL_MIN_ELEMENTS, RunningTotals, row_errors, summable
from ptrace.compare.results import TensorResult
from ptrace.compare.thresholds import FAIL, PASS, WARN, Thresholds
from ptrace.errors import ComparisonError

#: Rows per block, counted as float64 bytes. Each bundle's reader holds one block (at least one
#: chunk) in its stored dtype and the kernel needs no temporaries: memory is bounded by this x 2
#: x workers, plus the per-row results. At 4 MiB a block of ptrace's bundles is one chunk (the
#: writer's 4 MiB, whatever the dtype), still in the cache when its checksum and the kernel read
#: it after decoding: the tensor loop takes 20% less CPU than with blocks of two chunks (16 MiB).
BLOCK_BYTES = 4 << 20


def _selected(bundle: Bundle, request: int, name: str, rows: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """The given rows (sorted indices) of a tensor, block by block, as the row sums take them
    (:func:`~ptrace.compare.metrics.summable`). All the request's rows are read, in order, so
    that their checksums are verified: a tampered bundle is an error, never a verdict.

    A run of consecutive rows comes as a view of the reader's block, which the next block
    overwrites: use each before asking for the next."""
    taken = 0
    logical = bundle.array_dtype(tensor_array(name), request)
    for start, data in bundle.tensor_blocks(request, name, block, stored=True):
        upto = int(np.searchsorted(rows, start + data.shape[0]))
        if upto > taken:
            first, last = int(rows[taken]) - start, int(rows[upto - 1]) - start
            piece = data[first:last + 1] if last - first == upto - taken - 1 else data[rows[taken:upto] - start]
            yield summable(piece, logical)
        taken = upto


def _paired(from_a: Iterator[np.ndarray], from_b: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of two streams as pairs of equally long pieces, cut where either stream's blocks
    end: two bundles chunked differently pair up row for row without copying. A stream is
    advanced only once its piece is used up (its reader reuses the block's memory)."""
    empty = np.zeros(0)
    piece_a, piece_b = empty, empty
    while True:
        if not piece_a.shape[0]:
            piece_a = next(from_a, None)
        if piece_a is not None and not piece_b.shape[0]:
            piece_b = next(from_b, None)
        if piece_a is None or piece_b is None:
            return
        rows = min(piece_a.shape[0], piece_b.shape[0])
        yield piece_a[:rows], piece_b[:rows]
        piece_a, piece_b = piece_a[rows:], piece_b[rows:]


def _elementwise(a: Bundle, b: Bundle, name: str, alignments: dict[int, Alignment]) -> bool:
    """Both runs hold tensor ``name``'s elements for every request (else only its statistics)."""
    return all(a.has_tensor(r, name) and b.has_tensor(r, name) for r in alignments)


def worth_compiling(a: Bundle, b: Bundle, names: list[str], alignments: dict[int, Alignment]) -> bool:
    """Whether comparing tensors ``names`` reads enough elements to pay for loading the compiled
    kernel (:data:`~ptrace.compare.metrics.KERNEL_MIN_ELEMENTS`). Decided once for the whole
    comparison from the bundles' metadata, so every tensor's sums come from the same code and a
    comparison repeated gives the same bits."""
    elements = 0
    for name in names:
        tensor_alignments = align_tensor(a, b, name, alignments)
        if _elementwise(a, b, name, tensor_alignments):
            elements += sum(aligned.positions.size * int(np.prod(a.tensor_row_shape(request, name)))
                            for request, aligned in tensor_alignments.items() if aligned.positions.size)
    return elements >= KERNEL_MIN_ELEMENTS


def size_verdict(size: str, rel: np.ndarray, floor: float) -> str:
    """One rule for size and noise: a tensor with no position compared warns (an empty check
    proves nothing); one whose every position stays within its noise floor passes, whatever its
    size (rounding of the coarser dtype explains it); else its size decides (``thresholds``)."""
    if not rel.size:
        return WARN
    if bool(np.all(rel <= floor)):
        return PASS
    return size


def _first(index: np.ndarray, at_level: np.ndarray, verdict: str) -> int | None:
    """The first position whose own verdict is as bad as the tensor's (None when it passes)."""
    hits = np.flatnonzero(at_level)
    return int(index[hits[0]]) if verdict != PASS and hits.size else None


def compare_tensor(a: Bundle, b: Bundle, name: str, alignments: dict[int, Alignment],
                   thresholds: Thresholds, *, compiled: bool = True) -> TensorResult:
    """``compiled``: sum with the compiled kernel (see :func:`worth_compiling`), else numpy."""
    floor = noise.floor(name, a.run.dtype, b.run.dtype, a.model.num_layers)
    alignments = align_tensor(a, b, name, alignments)
    if not _elementwise(a, b, name, alignments):
        return compare_stats(a, b, name, alignments, thresholds, floor)
    totals = RunningTotals()
    index: list[np.ndarray] = []
    requests: list[np.ndarray] = []
    for request, aligned in alignments.items():
        wanted = aligned.positions
        if not wanted.size:
            continue
        shape, shape_b = a.tensor_row_shape(request, name), b.tensor_row_shape(request, name)
        if shape != shape_b:
            raise ComparisonError(f"cannot compare {a.path} with {b.path}: tensor {name} has rows of shape "
                                  f"{shape} in one and {shape_b} in the other",
                                  hint="both runs must use the same model architecture")
        block = max(1, BLOCK_BYTES // max(1, int(np.prod(shape)) * 8))
        from_a = _selected(a, request, name, aligned.rows_a, block)
        from_b = _selected(b, request, name, aligned.rows_b, block)
        start = 0
        for rows_a, rows_b in _paired(from_a, from_b):
            totals.add(row_errors(rows_a, rows_b, compiled=compiled))
            index.append(wanted[start:start + rows_a.shape[0]])
            requests.append(np.full(rows_a.shape[0], request, np.int64))
            start += rows_a.shape[0]
        for rest in (from_a, from_b):  # read to the end: the whole-array checksums are checked there
            for _ in rest:
                pass
    mean_abs, cos, rel = totals.rows_of("mean_abs"), totals.rows_of("cos"), totals.rows_of("rel")
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    verdict = size_verdict(thresholds.verdict(totals.mean_abs, totals.cos), rel, floor)
    at_level = thresholds.failing(mean_abs, cos) if verdict == FAIL else ~thresholds.passing(mean_abs, cos)
    return TensorResult(
        name=name, verdict=verdict,
        positions=totals.rows, max_abs_err=totals.max_abs, mean_abs_err=totals.mean_abs,
        mean_rel_err=totals.mean_rel, cos_sim=totals.cos,
        min_cos_sim=float(cos.min()) if cos.size else float("nan"),
        thousandth_ratio=totals.thousandth,
        first_fail_position=_first(flat_index, at_level, verdict),
        rel_err=totals.rel, noise_floor=floor,
        position_request=np.concatenate(requests) if requests else np.zeros(0, np.int64),
        position_index=flat_index, position_mean_abs=mean_abs, position_cos=cos, position_rel=rel)


def compare_stats(a: Bundle, b: Bundle, name: str, alignments: dict[int, Alignment],
                  thresholds: Thresholds, floor: float) -> TensorResult:
    """Stats-only bundles: compare per-position mean |x| and std instead of elements.

    The relative change of a row's scale (its std or mean |x|) stands in for the row's normwise
    relative error, which needs the elements, and is held against the same noise floor."""
    diffs, index, requests = [], [], []
    stats_a, stats_b = a.stats_by_request(name), b.stats_by_request(name)
    for request, aligned in alignments.items():
        wanted = aligned.positions
        if not wanted.size:
            continue
        sa = stats_a[request][aligned.rows_a]
        sb = stats_b[request][aligned.rows_b]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(sa[:, [3, 4]] - sb[:, [3, 4]]) / (np.abs(sa[:, [3, 4]]) + 1e-8)
        diffs.append(np.nanmax(rel, axis=1))
        index.append(wanted)
        requests.append(np.full(wanted.size, request, np.int64))
    rel = np.concatenate(diffs) if diffs else np.zeros(0)
    worst_rel = float(rel.max()) if rel.size else 0.0
    # A relative change of the row's scale is compared with the mean-abs thresholds.
    size = PASS if worst_rel < thresholds.pass_mean_abs else WARN if worst_rel < thresholds.warn_mean_abs else FAIL
    verdict = size_verdict(size, rel, floor)
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    at_level = rel >= (thresholds.warn_mean_abs if verdict == FAIL else thresholds.pass_mean_abs)
    nan = float("nan")
    return TensorResult(
        name=name, verdict=verdict, positions=int(rel.size), max_abs_err=nan, mean_abs_err=nan,
        mean_rel_err=float(rel.mean()) if rel.size else nan, cos_sim=nan, min_cos_sim=nan,
        thousandth_ratio=nan, first_fail_position=_first(flat_index, at_level, verdict),
        stats_only=True, rel_err=worst_rel if rel.size else nan, noise_floor=floor,
        position_request=np.concatenate(requests) if requests else np.zeros(0, np.int64),
        position_index=flat_index, position_mean_abs=rel, position_rel=rel)
