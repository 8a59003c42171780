"""Which positions of two runs are comparable, and which rows of each bundle hold them.

Rows are positions. Position ``p`` of two runs is comparable only while both were *fed the same
tokens* up to ``p`` (SPEC.md section 3.6): in a free-running replay that ends where the
generated tokens first differ, in a teacher-forced replay (both fed the reference's tokens)
never. Only positions captured by both runs count, since a capture may select steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptrace.bundle_spec.dtypes import to_float
from ptrace.bundle_spec.layout import tensor_array
from ptrace.bundle_spec.names import LOGITS
from ptrace.bundle_spec.reader import Bundle


def fed_tokens(bundle: Bundle, request: int) -> np.ndarray:
    """Tokens fed to the model at every position (SPEC: prompt, then generated tokens fed back)."""
    fed = bundle.input_ids(request)
    if fed is not None:
        return fed
    return np.concatenate([bundle.prompt_ids(request), bundle.output_ids(request)[:-1]])


def comparable_positions(a: Bundle, b: Bundle, request: int) -> np.ndarray:
    """Positions captured in both runs whose whole input prefix is identical."""
    fed_a, fed_b = fed_tokens(a, request), fed_tokens(b, request)
    n = min(len(fed_a), len(fed_b))
    differs = np.flatnonzero(fed_a[:n] != fed_b[:n])
    limit = int(differs[0]) if differs.size else n
    # Both are strictly increasing (the reader checks): no np.unique, which would import numpy.ma.
    common = np.intersect1d(a.positions(request), b.positions(request), assume_unique=True)
    return common[common < limit]


def row_indices(positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of a bundle (captured ``positions``, strictly increasing) that hold ``wanted``."""
    return np.searchsorted(positions, wanted)


def read_rows(bundle: Bundle, request: int, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted indices) of a tensor as numpy floats (bfloat16 and float8 as float32, decoded
    without ml_dtypes), reading one contiguous slice."""
    stored = bundle.tensor_rows(request, name, int(rows[0]), int(rows[-1]) + 1, stored=True)
    block = to_float(stored, bundle.array_dtype(tensor_array(name), request))
    contiguous = int(rows[-1]) - int(rows[0]) + 1 == rows.size
    return block if contiguous else block[rows - rows[0]]


@dataclass(frozen=True)
class Alignment:
    """Per request: the comparable positions, and where they sit in each bundle's rows."""

    positions: np.ndarray
    rows_a: np.ndarray
    rows_b: np.ndarray


def align(a: Bundle, b: Bundle, request: int) -> Alignment:
    wanted = comparable_positions(a, b, request)
    return Alignment(wanted, row_indices(a.positions(request), wanted),
                     row_indices(b.positions(request), wanted))


def align_tensor(a: Bundle, b: Bundle, name: str, alignments: dict[int, Alignment]) -> dict[int, Alignment]:
    """Each request's alignment restricted to the rows tensor ``name`` has: the same for every
    tensor but the logits, which MAY start at the last prompt position (SPEC.md section 6)."""
    if name != LOGITS:
        return alignments
    restricted = {}
    for request, aligned in alignments.items():
        pos_a, pos_b = a.tensor_positions(request, name), b.tensor_positions(request, name)
        wanted = aligned.positions[np.isin(aligned.positions, pos_a) & np.isin(aligned.positions, pos_b)]
        restricted[request] = Alignment(wanted, row_indices(pos_a, wanted), row_indices(pos_b, wanted))
    return restricted
