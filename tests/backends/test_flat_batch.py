"""Splitting a batched engine's flattened tensors into requests, with plain arrays (no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from ptrace.backends.flat_batch import FlatBatch, Segment, split_rows

torch = pytest.importorskip("torch")

PROMPTS = [5, 9, 3, 6]  # prompt lengths of requests 0..3
#: One pass as a scheduler lays it out: request 1's third decode step, 3 rows of a request that is
#: not ptrace's, request 0's first prefill chunk, request 2 idle, request 3's last prefill chunk.
SCHEDULED = [(1, 1), (None, 3), (0, 4), (2, 0), (3, 2)]
POSITIONS = [11, 0, 1, 2, 0, 1, 2, 3, 4, 5]
SEGMENTS = [Segment(request=1, step=3, row=0, count=1, start=11),
            Segment(request=0, step=0, row=4, count=4, start=0),
            Segment(request=3, step=0, row=8, count=2, start=4)]


def test_rows_are_split_by_request_step_and_position():
    assert split_rows(SCHEDULED, POSITIONS, PROMPTS) == SEGMENTS


def test_the_first_decode_step_starts_at_the_prompts_end():
    assert split_rows([(0, 1)], [5], PROMPTS) == [Segment(0, 1, 0, 1, 5)]  # feeds position 5 = prompt
    assert split_rows([(0, 1)], [4], PROMPTS) == [Segment(0, 0, 0, 1, 4)]  # the prefill's last row


class Shown:
    """Keeps what each request was shown; replaces one request's rows with a function of them."""

    def __init__(self, replace: int | None = None, fn=None) -> None:
        self.replace, self.fn = replace, fn
        self.sites: list = []
        self.rows: dict[int, object] = {}

    def __call__(self, site, rows):
        self.sites.append(site)
        self.rows[site.request] = rows
        return self.fn(rows) if site.request == self.replace else None


def _flat(kind: str, shape=(10, 6)):
    flat = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return flat if kind == "numpy" else torch.from_numpy(flat)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_each_request_sees_its_own_rows_and_nothing_is_copied_unless_replaced(kind):
    shown = Shown()
    batch = FlatBatch(PROMPTS, shown)
    batch.begin(SCHEDULED, POSITIONS)
    flat = _flat(kind)
    assert batch.emit("layers.0.q", flat, (2, 3)) is None
    assert [(s.name, s.request, s.step, s.start) for s in shown.sites] == [
        ("layers.0.q", 1, 3, 11), ("layers.0.q", 0, 0, 0), ("layers.0.q", 3, 0, 4)]
    expected = np.arange(60, dtype=np.float32).reshape(10, 2, 3)
    for segment in SEGMENTS:
        np.testing.assert_array_equal(np.asarray(shown.rows[segment.request]), expected[segment.rows])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_replacement_lands_in_a_copy_at_the_requests_rows(kind):
    batch = FlatBatch(PROMPTS, Shown(replace=0, fn=lambda rows: -rows))
    batch.begin(SCHEDULED, POSITIONS)
    flat = _flat(kind)
    replaced = batch.emit("layers.0.k", flat, (2, 3))
    assert type(replaced) is type(flat) and tuple(replaced.shape) == (10, 6)
    expected = np.arange(60, dtype=np.float32).reshape(10, 6)
    np.testing.assert_array_equal(np.asarray(flat), expected)  # the engine's own tensor is untouched
    expected[4:8] *= -1
    np.testing.assert_array_equal(np.asarray(replaced), expected)


def test_a_pass_with_none_of_ptraces_rows_shows_nothing():
    shown = Shown(replace=0, fn=lambda rows: rows)
    batch = FlatBatch(PROMPTS, shown)
    batch.begin([(None, 4)], [0, 1, 2, 3])
    assert not batch and batch.emit("embed", _flat("numpy", (4, 6))) is None
    batch.begin(SCHEDULED, POSITIONS)
    batch.clear()
    assert not batch and batch.emit("embed", _flat("numpy")) is None and not shown.sites
