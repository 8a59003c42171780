"""The per-row sums of :mod:`ptrace.compare.metrics` in one compiled pass (numba).

Imported only through ``metrics``, which falls back to numpy where numba does not import (an
engine environment may pin a numpy that numba does not support yet). Elements are widened to
float64 in registers, so the sums are those of a plain float64 implementation; numba may
reorder the additions ("reassoc", so that they vectorize) and fuse multiply-adds ("contract"),
which changes results only within float64 rounding. NaN and infinity keep IEEE semantics (no
"nnan"/"ninf"): a NaN anywhere in a row makes its sums NaN, as numpy's would. Division follows
numpy's error model (x/0 is inf, not an exception): Python's check would stop vectorization.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import overload

_FAST = {"reassoc", "contract"}


def as_float(row: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``row`` as floats: bfloat16 arrives as its uint16 bit pattern (SPEC.md section 4)."""
    raise NotImplementedError("only callable from compiled code")


@overload(as_float, jit_options={"fastmath": _FAST})
def _as_float(row, scratch):
    if row.dtype == numba.types.uint16:
        def widen_bfloat16(row, scratch):
            # bfloat16 is the high half of a float32: shift its bits into place.
            for j in range(row.shape[0]):
                scratch[j] = np.uint32(row[j]) << np.uint32(16)
            return scratch.view(np.float32)
        return widen_bfloat16
    return lambda row, scratch: row


@numba.njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def row_sums(x: np.ndarray, y: np.ndarray, out: np.ndarray, rel_eps: float, thousandth: float) -> None:
    """Into ``out[i]``: sum |d|, sum |d| / (|a| + eps), count of those <= thousandth, sum a*b,
    sum a^2, sum b^2, sum d^2 and max |d|, where d = a - b, for every row i of ``x`` (a) and
    ``y`` (b). The max is NaN where the row holds a NaN difference, like numpy's max.

    The max is taken over the bit patterns of |d| as integers: for non-negative floats their
    order is the numbers' order, with NaN above infinity, so the max propagates NaN exactly
    and still vectorizes (a float max that keeps NaN does not)."""
    n = x.shape[1]
    scratch_x = np.empty(n, np.uint32)
    scratch_y = np.empty(n, np.uint32)
    differences = np.empty(max(n, 1), np.float64)
    bits = differences.view(np.int64)
    for i in range(x.shape[0]):
        a_row = as_float(x[i], scratch_x)
        b_row = as_float(y[i], scratch_y)
        sum_abs = sum_rel = dot = sq_a = sq_b = sq_diff = 0.0
        agree = 0
        for j in range(n):
            a = np.float64(a_row[j])
            b = np.float64(b_row[j])
            d = abs(a - b)
            r = d / (abs(a) + rel_eps)
            sum_abs += d
            sum_rel += r
            agree += r <= thousandth
            dot += a * b
            sq_a += a * a
            sq_b += b * b
            sq_diff += d * d
            differences[j] = d
        worst = 0
        for j in range(n):
            worst = max(worst, bits[j])
        bits[0] = worst
        out[i, 0] = sum_abs
        out[i, 1] = sum_rel
        out[i, 2] = agree
        out[i, 3] = dot
        out[i, 4] = sq_a
        out[i, 5] = sq_b
        out[i, 6] = sq_diff
        out[i, 7] = differences[0]
