"""Numerical agreement of two tensors, row by row (rows are positions), vectorized in numpy.

Every function takes blocks of aligned rows ``a`` and ``b`` (any float dtype, bfloat16
included) and works in float64, so a comparison's own rounding never shows up as divergence.
Per-row results are what the report plots; :class:`RunningTotals` folds blocks into whole-tensor
numbers without keeping the tensor, so bundles larger than memory stream through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ptrace.backends.decoding import log_softmax
from ptrace.errors import ComparisonError

#: Denominator guard for relative errors (the seed document's ``|h1| + 1e-8``).
REL_EPS = 1e-8


def _flat(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.asarray(block).reshape(block.shape[0], -1).astype(dtype, copy=False)


def _flat64(block: np.ndarray) -> np.ndarray:
    return _flat(block, np.dtype(np.float64))


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
    norm_a: np.ndarray
    norm_b: np.ndarray
    norm_diff: np.ndarray
    size: int


def row_errors(a: np.ndarray, b: np.ndarray) -> RowErrors:
    """Elementwise work in float32 for inputs of 32 bits or less (bf16 and fp16 widen exactly;
    the difference of two float32 values is rounded once, far below any threshold), every sum
    accumulated in float64. float64 inputs stay float64."""
    if a.shape != b.shape:
        raise ComparisonError(f"cannot compare rows of shapes {a.shape} and {b.shape}",
                              hint="both runs must use the same model architecture")
    work = np.dtype(np.float64 if max(a.dtype.itemsize, b.dtype.itemsize) > 4 else np.float32)
    x, y = _flat(a, work), _flat(b, work)
    size = x.shape[1]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = x - y
        np.abs(diff, out=diff)
        rel = np.abs(x)
        rel += REL_EPS
        np.divide(diff, rel, out=rel)
        dot = np.einsum("ij,ij->i", x, y, dtype=np.float64)
        norm_a = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        norm_b = np.sqrt(np.einsum("ij,ij->i", y, y, dtype=np.float64))
        cos = _cosine(dot, norm_a, norm_b)
        # |a - b| is rounded once in the work dtype (relative 6e-8 in float32) and squared in
        # float64, so errors near a dtype's unit roundoff neither vanish nor underflow.
        norm_diff = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
        return RowErrors(max_abs=diff.max(axis=1, initial=0.0).astype(np.float64),
                         mean_abs=diff.sum(axis=1, dtype=np.float64) / size,
                         mean_rel=rel.sum(axis=1, dtype=np.float64) / size, cos=cos,
                         thousandth=np.count_nonzero(rel <= 1e-3, axis=1) / size,
                         rel=normwise(norm_diff, norm_a), dot=dot, norm_a=norm_a, norm_b=norm_b,
                         norm_diff=norm_diff, size=size)


def normwise(norm_diff: np.ndarray, norm_a: np.ndarray) -> np.ndarray:
    """``||a - b|| / ||a||``, with 0/0 = 0 (both zero) and x/0 = inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm_diff == 0, 0.0, norm_diff / norm_a)


def _cosine(dot: np.ndarray, norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """Cosine similarity; two all-zero rows are identical (1.0), one zero row is orthogonal (0.0)."""
    denominator = norm_a * norm_b
    cos = np.divide(dot, denominator, out=np.zeros_like(dot), where=denominator > 0)
    both_zero = (norm_a == 0) & (norm_b == 0)
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
    per_row: list[RowErrors] = field(default_factory=list)

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
        self.sq_a += float((errors.norm_a**2).sum())
        self.sq_b += float((errors.norm_b**2).sum())
        self.sq_diff += float((errors.norm_diff**2).sum())
        self.per_row.append(errors)

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
        return float(_cosine(np.array([self.dot]), np.array([np.sqrt(self.sq_a)]),
                             np.array([np.sqrt(self.sq_b)]))[0])

    def rows_of(self, metric: str) -> np.ndarray:
        """One per-row metric over every row seen so far."""
        parts = [getattr(e, metric) for e in self.per_row]
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
