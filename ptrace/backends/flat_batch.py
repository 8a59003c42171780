"""Per-request rows of a flattened batch: what hooking a batched engine needs beyond the engine.

Batched engines (vLLM; SGLang works the same way) run every request of a forward pass on one
token axis: activations are ``[tokens, ...]`` with no batch axis, the requests' rows follow each
other in the scheduler's order, and a long prompt may be split over several passes (chunked
prefill). Interceptors see canonical tensors instead: one request's rows, one row per position
(SPEC.md section 6). An engine's hooks only describe each pass as its scheduler laid it out (how
many rows each request has, and the position of every row); :class:`FlatBatch` splits the rows
into :class:`Segment` s, shows each to the interceptors and writes replacements back into a copy
of the flat tensor, for the engine to use instead.

Nothing here imports an engine, or torch: any array that slices, reshapes and assigns slices as
NumPy arrays and torch tensors do will serve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ptrace.backends.base import TensorSite

#: Shows one request's rows to the interceptors (``site`` says whose, which step, which
#: positions); returns the replacement rows, same shape, or None to leave them alone.
Show = Callable[[TensorSite, Any], Any]


@dataclass(frozen=True)
class Segment:
    """The rows of one request in a flattened forward pass: ``count`` rows from row ``row``, at
    positions ``start`` onwards, all of step ``step`` of request ``request``."""

    request: int
    step: int
    row: int
    count: int
    start: int

    @property
    def rows(self) -> slice:
        return slice(self.row, self.row + self.count)

    def site(self, name: str) -> TensorSite:
        return TensorSite(name, self.request, self.step, self.start)


def split_rows(scheduled: Iterable[tuple[int | None, int]], positions: Sequence[int],
               prompt_lengths: Sequence[int]) -> list[Segment]:
    """The segments of one forward pass.

    ``scheduled`` lists each request of the pass in row order, with the rows (tokens) scheduled
    for it: ptrace's request index, or None for a request that is not ptrace's (its rows are
    skipped). ``positions`` holds every row's position. Rows before the end of their prompt belong
    to step 0 (the prefill, whole or in chunks); decode step ``s`` feeds position ``prompt + s - 1``.
    """
    segments, row = [], 0
    for request, count in scheduled:
        if request is not None and count:
            start = int(positions[row])
            prompt = prompt_lengths[request]
            segments.append(Segment(request, 0 if start < prompt else start - prompt + 1, row, count, start))
        row += count
    return segments


class FlatBatch:
    """The current forward pass of a batched engine, split by request.

    The engine's hooks call :meth:`begin` before each pass (or :meth:`clear` for a pass that is
    none of ptrace's), then :meth:`emit` with each flat tensor they observe.
    """

    def __init__(self, prompt_lengths: Sequence[int], show: Show) -> None:
        self.prompt_lengths = list(prompt_lengths)
        self.show = show
        self.segments: list[Segment] = []

    def begin(self, scheduled: Iterable[tuple[int | None, int]], positions: Sequence[int]) -> None:
        """A new forward pass laid out as ``scheduled`` at ``positions`` (see :func:`split_rows`)."""
        self.segments = split_rows(scheduled, positions, self.prompt_lengths)

    def clear(self) -> None:
        self.segments = []

    def __bool__(self) -> bool:
        """Whether the current pass holds rows of ptrace's requests."""
        return bool(self.segments)

    def emit(self, name: str, flat: Any, shape: tuple[int, ...] | None = None) -> Any:
        """Show each request's rows of ``flat`` to the interceptors, as ``[rows, *shape]`` when
        ``shape`` is given (e.g. ``[tokens, heads * head_dim]`` seen as ``[rows, heads, head_dim]``).

        Returns a copy of ``flat`` holding the replaced rows, or None when nothing was replaced
        (``flat`` itself is never written)."""
        replaced = None
        for segment in self.segments:
            rows = flat[segment.rows]
            if shape is not None:
                rows = rows.reshape(segment.count, *shape)
            new = self.show(segment.site(name), rows)
            if new is not None:
                if replaced is None:
                    replaced = _copy(flat)
                replaced[segment.rows] = new.reshape(segment.count, *flat.shape[1:])
        return replaced


def _copy(flat: Any) -> Any:
    """A copy the engine can use in place of ``flat``: same dtype and device (torch's ``clone``,
    NumPy's ``copy``)."""
    clone = getattr(flat, "clone", None)
    return clone() if clone is not None else flat.copy()
