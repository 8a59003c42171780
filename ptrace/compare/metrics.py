"""Numerical agreement of two tensors, row by row (rows are positions).

Every function takes blocks of aligned rows ``a`` and ``b`` (any float dtype, bfloat16
included) and works in float64, so a comparison's own rounding never shows up as divergence.
The row sums also take bfloat16 rows as their bits (``uint16``, as bundles store them): compare
reads them so (:func:`summable`), which spares it ml_dtypes' import (up to a second) and a pass.
Per-row results are what the report plots; :class:`RunningTotals` folds blocks into whole-tensor
numbers without keeping the tensor, so bundles larger than memory stream through.

Compare is meant to run at the speed the bundle is read (about 1 GB/s per core), so every per-row sum comes
out of one pass over the elements: a compiled kernel (numba) where numba imports, else numpy,
which needs one pass per sum and gives the same numbers up to the order of float64 additions.
Loading the kernel costs a fixed ~0.3 s (numba's import and its cached machine code), more than
numpy needs for a small comparison: below :data:`KERNEL_MIN_ELEMENTS` numpy does the sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from ptrace.backends.decoding import log_softmax
from ptrace.bundle_spec.dtypes import bfloat16_to_float32, to_float
from ptrace.errors import ComparisonError

#: Denominator guard for relative errors (``|b - a| / (|a| + 1e-8)``: zeros of the reference stay finite).
REL_EPS = 1e-8
#: An element "agrees to one-thousandth" when its relative error is at most this (msprobe's ratio).
THOUSANDTH = 1e-3
#: The per-row metrics that :class:`RunningTotals` keeps for every row.
PER_ROW = ("mean_abs", "cos", "rel")
#: The per-row sums, in the kernel's output columns.
SUM_ABS, SUM_REL, THOUSANDTHS, DOT, SQ_A, SQ_B, SQ_DIFF, MAX_ABS = range(8)
#: Element pairs in a whole comparison from which the compiled kernel pays for loading it: numpy
#: sums about 200 million pairs per CPU-second (float32 or bfloat16 against float32) against the
#: kernel's 2 billion, and loading numba costs ~0.33 CPU-seconds (its import, then its cache), so
#: the break-even lies near 75 million pairs; below it numpy costs less, and ``ptrace compare`` of
#: small bundles never loads numba.
KERNEL_MIN_ELEMENTS = 1 << 26
#: Elements per row block of the numpy sums: four float64 buffers of this size fit the level-2
#: cache (measured: 1 << 16 is 2.3x faster per element than 1 << 12, and as fast as 1 << 18).
NUMPY_BLOCK_ELEMENTS = 1 << 16
#: How the row sums take bfloat16 rows that come as their bits.
BFLOAT16_BITS = np.dtype(np.uint16)


def _flat64(block: np.ndarray) -> np.ndarray:
    return np.asarray(block).reshape(block.shape[0], -1).astype(np.float64, copy=False)


def summable(stored: np.ndarray, logical: str) -> np.ndarray:
    """Rows read in their storage dtype (a bundle's, logical dtype ``logical``) as the row sums
    take them, without importing ml_dtypes: bfloat16 as its bits, anything else as numpy floats
    (float8 decoded, integers widened, so that no uint16 tensor passes for bfloat16)."""
    if logical == "bfloat16" and stored.dtype == BFLOAT16_BITS:
        return stored
    values = to_float(stored, logical)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def _kernel_input(block: np.ndarray) -> np.ndarray:
    """Rows as the kernel reads them: float32 and float64 as they are, bfloat16 as its bits."""
    rows = np.ascontiguousarray(block).reshape(block.shape[0], -1)
    if rows.dtype.name == "bfloat16":  # ml_dtypes' type, from a caller that has it (compare gives bits)
        return rows.view(BFLOAT16_BITS)
    if rows.dtype in (np.float32, np.float64, BFLOAT16_BITS):
        return rows
    return rows.astype(np.float64 if rows.dtype.itemsize > 4 else np.float32)


def _widened(rows: np.ndarray) -> np.ndarray:
    """Rows as numpy reads them: bfloat16's bits as float32."""
    return bfloat16_to_float32(rows) if rows.dtype == BFLOAT16_BITS else rows


def _numpy_row_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The kernel's sums in plain float64 numpy: one pass per sum, over a few rows at a time
    (:data:`NUMPY_BLOCK_ELEMENTS`) widened into reused buffers, so that every pass after the
    widening reads the level-2 cache instead of memory (2.7x the speed of whole-block passes)."""
    x_rows, y_rows = np.asarray(a).reshape(a.shape[0], -1), np.asarray(b).reshape(b.shape[0], -1)
    rows, width = x_rows.shape
    out = np.empty((rows, 8))
    step = max(1, NUMPY_BLOCK_ELEMENTS // max(width, 1))
    x, y, diff, rel = (np.empty((min(step, rows), width)) for _ in range(4))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for start in range(0, rows, step):
            n = min(step, rows - start)
            xs, ys, ds, rs, sums = x[:n], y[:n], diff[:n], rel[:n], out[start:start + n]
            xs[...], ys[...] = _widened(x_rows[start:start + n]), _widened(y_rows[start:start + n])
            np.abs(np.subtract(xs, ys, out=ds), out=ds)
            np.divide(ds, np.add(np.abs(xs, out=rs), REL_EPS, out=rs), out=rs)
            sums[:, SUM_ABS], sums[:, SUM_REL] = ds.sum(axis=1), rs.sum(axis=1)
            sums[:, THOUSANDTHS] = np.count_nonzero(rs <= THOUSANDTH, axis=1)
            sums[:, DOT], sums[:, SQ_A] = np.einsum("ij,ij->i", xs, ys), np.einsum("ij,ij->i", xs, xs)
            sums[:, SQ_B], sums[:, SQ_DIFF] = np.einsum("ij,ij->i", ys, ys), np.einsum("ij,ij->i", ds, ds)
            sums[:, MAX_ABS] = ds.max(axis=1, initial=0.0)
    return out


@cache
def _row_sums_function() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The compiled kernel where numba imports (first use compiles, or loads numba's cache).

    Numpy stands in where numba is missing or does not support this numpy (ImportError), and
    where numba finds no writable cache directory (RuntimeError when the kernel is defined: a
    read-only installation whose user has no writable home), where every process would spend
    over a second compiling the kernel again."""
    try:
        from ptrace.compare.kernel import row_sums
    except (ImportError, RuntimeError):
        return _numpy_row_sums

    def compiled(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty((a.shape[0], 8))
        row_sums(_kernel_input(a), _kernel_input(b), out, REL_EPS, THOUSANDTH)
        return out
    return compiled


def row_sums(a: np.ndarray, b: np.ndarray, *, compiled: bool = True) -> np.ndarray:
    """Per row of ``b`` against reference ``a``, in float64, the columns ``SUM_ABS`` ...
    ``MAX_ABS``: sums of |a - b|, of |a - b| / (|a| + REL_EPS), the count of those at most
    ``THOUSANDTH``, sums of a*b, a^2, b^2, (a - b)^2, and the max |a - b| (NaN if any is).
    Rows of dtype ``uint16`` are bfloat16 bits (:data:`BFLOAT16_BITS`).
    ``compiled=False``: numpy's passes, without loading the kernel (a small comparison)."""
    if a.shape != b.shape:
        raise ComparisonError(f"cannot compare rows of shapes {a.shape} and {b.shape}",
                              hint="both runs must use the same model architecture")
    return (_row_sums_function() if compiled else _numpy_row_sums)(a, b)


@dataclass(frozen=True)
class RowErrors:
    """Per-row errors of ``b`` against reference ``a``: arrays of shape ``[rows]``."""

    max_abs: np.ndarray
    mean_abs: np.ndarray
    mean_rel: np.ndarray
    cos: np.ndarray
    #: msprobe's "one-thousandth" ratio: share of elements with relative error <= 1e-3.
    thousandth: np.ndarray
    #: normwise relative error ``||a - b|| / ||a||``: scale-free, so one floor fits every tensor
    #: (0 where both rows are 0, inf where only ``a`` is)
    rel: np.ndarray
    # sums kept so that blocks fold into exact whole-tensor numbers
    dot: np.ndarray
    sq_a: np.ndarray
    sq_b: np.ndarray
    sq_diff: np.ndarray
    size: int


def row_errors(a: np.ndarray, b: np.ndarray, *, compiled: bool = True) -> RowErrors:
    """Every per-row metric, from the per-row sums of one pass (:func:`row_sums`)."""
    sums = row_sums(a, b, compiled=compiled)
    size = int(np.prod(a.shape[1:], dtype=np.int64))
    dot, sq_a, sq_b, sq_diff = sums[:, DOT], sums[:, SQ_A], sums[:, SQ_B], sums[:, SQ_DIFF]
    with np.errstate(invalid="ignore", divide="ignore"):
        return RowErrors(max_abs=sums[:, MAX_ABS], mean_abs=sums[:, SUM_ABS] / size,
                         mean_rel=sums[:, SUM_REL] / size, cos=_cosine(dot, sq_a, sq_b),
                         thousandth=sums[:, THOUSANDTHS] / size, rel=normwise(np.sqrt(sq_diff), np.sqrt(sq_a)),
                         dot=dot, sq_a=sq_a, sq_b=sq_b, sq_diff=sq_diff, size=size)


def normwise(norm_diff: np.ndarray, norm_a: np.ndarray) -> np.ndarray:
    """``||a - b|| / ||a||``, with 0/0 = 0 (both zero) and x/0 = inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm_diff == 0, 0.0, norm_diff / norm_a)


def _cosine(dot: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray) -> np.ndarray:
    """Cosine similarity from the sums of a*b, a^2 and b^2; two all-zero rows are identical
    (1.0), one zero row is orthogonal (0.0).

    The denominator is sqrt(sum a^2 * sum b^2), not the product of the two norms: the root of a
    rounded square is exact, so a row compared with itself has a cosine of exactly 1. Where the
    product over- or underflows, the product of the norms stands in."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        denominator = np.sqrt(sq_a * sq_b)
        denominator = np.where((denominator == 0) | np.isinf(denominator), np.sqrt(sq_a) * np.sqrt(sq_b),
                               denominator)
    cos = np.divide(dot, denominator, out=np.zeros_like(dot), where=denominator > 0)
    both_zero = (sq_a == 0) & (sq_b == 0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


@dataclass
class RunningTotals:
    """Whole-tensor metrics folded block by block (streaming)."""

    rows: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_rel: float = 0.0
    sum_thousandth: float = 0.0
    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    sq_diff: float = 0.0
    size: int = 0
    #: The per-row metrics a result reports, block by block; the rest of each block's
    #: :class:`RowErrors` is folded into the sums above and dropped (memory grows by these only).
    per_row: dict[str, list[np.ndarray]] = field(default_factory=lambda: {m: [] for m in PER_ROW})

    def add(self, errors: RowErrors) -> None:
        n = errors.max_abs.shape[0]
        if not n:
            return
        self.rows += n
        self.size = errors.size
        self.max_abs = max(self.max_abs, float(np.nanmax(errors.max_abs)))
        self.sum_abs += float(errors.mean_abs.sum())
        self.sum_rel += float(errors.mean_rel.sum())
        self.sum_thousandth += float(errors.thousandth.sum())
        self.dot += float(errors.dot.sum())
        self.sq_a += float(errors.sq_a.sum())
        self.sq_b += float(errors.sq_b.sum())
        self.sq_diff += float(errors.sq_diff.sum())
        for metric, parts in self.per_row.items():
            parts.append(getattr(errors, metric))

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.rows if self.rows else float("nan")

    @property
    def mean_rel(self) -> float:
        return self.sum_rel / self.rows if self.rows else float("nan")

    @property
    def thousandth(self) -> float:
        return self.sum_thousandth / self.rows if self.rows else float("nan")

    @property
    def rel(self) -> float:
        """Normwise relative error of the whole tensor (every compared row)."""
        if not self.rows:
            return float("nan")
        return float(normwise(np.array([np.sqrt(self.sq_diff)]), np.array([np.sqrt(self.sq_a)]))[0])

    @property
    def cos(self) -> float:
        return float(_cosine(np.array([self.dot]), np.array([self.sq_a]), np.array([self.sq_b]))[0])

    def rows_of(self, metric: str) -> np.ndarray:
        """One per-row metric (of ``PER_ROW``) over every row seen so far."""
        parts = self.per_row[metric]
        return np.concatenate(parts) if parts else np.zeros(0)


def kl_full(logits_a: np.ndarray, logits_b: np.ndarray) -> np.ndarray:
    """KL(P_a || P_b) per row from full logits (natural log)."""
    lp_a, lp_b = log_softmax(_flat64(logits_a)), log_softmax(_flat64(logits_b))
    with np.errstate(invalid="ignore"):
        return np.maximum((np.exp(lp_a) * (lp_a - lp_b)).sum(axis=1), 0.0)


def kl_topk(ids_a: np.ndarray, lp_a: np.ndarray, ids_b: np.ndarray, lp_b: np.ndarray) -> np.ndarray:
    """KL(P_a || P_b) per row when only top-k logprobs were recorded.

    Both distributions are reduced to A's top-k tokens plus one *tail* bucket holding the rest of
    the mass (1 - sum of the listed probabilities). A token of A's top-k missing from B's top-k
    gets B's smallest recorded logprob: an upper bound on its real probability, so the estimate
    errs towards a smaller KL, never inventing divergence. B's tail is what remains of B's mass.
    With k = vocabulary size this is the exact KL.
    """
    rows = ids_a.shape[0]
    result = np.zeros(rows)
    for row in range(rows):
        p_a = np.exp(lp_a[row].astype(np.float64))
        b_lookup = dict(zip(ids_b[row].tolist(), lp_b[row].astype(np.float64).tolist()))
        floor = float(np.min(lp_b[row])) if lp_b.shape[1] else -np.inf
        p_b = np.exp(np.array([b_lookup.get(int(t), floor) for t in ids_a[row]]))
        tail_a = max(1.0 - p_a.sum(), 0.0)
        tail_b = max(1.0 - p_b.sum(), 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p_a > 0, p_a * (np.log(p_a) - np.log(np.maximum(p_b, 1e-300))), 0.0)
        result[row] = max(float(terms.sum()) + (tail_a * np.log(tail_a / tail_b) if tail_a > 0 else 0.0), 0.0)
    return result
