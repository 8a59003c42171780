"""The interceptor that writes what the engine computes into the bundle."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ptrace.backends.base import EngineTensor, Interceptor, TensorSite
from ptrace.bundle_spec.layout import stats_array, tensor_array
from ptrace.bundle_spec.names import LOGITS
from ptrace.bundle_spec.writer import BundleWriter
from ptrace.errors import BackendError, UsageError

_ITEM = re.compile(r"^(\d+)(?:-(\d*))?$")


@dataclass(frozen=True)
class StepSelection:
    """Which steps to capture, like msprobe's token_range: ``0``, ``0-4``, ``10-``, ``0,5-7``.

    Step 0 is the prefill (every prompt position); step s >= 1 is the decode of generated token s.
    """

    ranges: tuple[tuple[int, int | None], ...] = ()  # inclusive; None = open end; () = all

    @classmethod
    def parse(cls, text: str | None) -> StepSelection:
        if text is None or text.strip() in ("", "all"):
            return cls()
        ranges = []
        for item in text.replace(" ", "").split(","):
            match = _ITEM.match(item)
            if not match:
                raise UsageError(f"--steps: cannot read {item!r}",
                                 hint="use step numbers and ranges, e.g. 0 or 0-4 or 10- or 0,5-7")
            first = int(match.group(1))
            last = first if match.group(2) is None else (int(match.group(2)) if match.group(2) else None)
            if last is not None and last < first:
                raise UsageError(f"--steps: range {item!r} ends before it starts")
            ranges.append((first, last))
        return cls(tuple(ranges))

    def __contains__(self, step: int) -> bool:
        if not self.ranges:
            return True
        return any(first <= step and (last is None or step <= last) for first, last in self.ranges)


class _Spans:
    """Which positions of each request were recorded, kept as merged runs so that what is held
    does not grow with the steps of a long run.

    A step MAY arrive in several spans (vLLM's chunked prefill). Rows are appended in the order
    they arrive, so spans must arrive in (step, position) order for ``positions`` to describe them.
    """

    def __init__(self) -> None:
        # request -> (step, first position, rows) of the latest span: every tensor of one span
        # has that many rows.
        self.latest: dict[int, tuple[int, int, int]] = {}
        # request -> [first, stop) runs of the positions recorded, contiguous spans merged.
        self.runs: dict[int, list[list[int]]] = defaultdict(list)

    def note(self, site: TensorSite, rows: int) -> None:
        """Note a new span of ``site.request``'s positions; check that a known one keeps its rows."""
        latest = self.latest.get(site.request)
        if latest is not None and latest[:2] == (site.step, site.start):
            if latest[2] != rows:
                raise BackendError(f"{site.name}: step {site.step} of request {site.request} covers "
                                   f"positions {site.start}+{rows}, other tensors {site.start}+{latest[2]}")
            return
        if latest is not None and latest[:2] > (site.step, site.start):
            raise BackendError(f"{site.name}: step {site.step} of request {site.request} (position "
                               f"{site.start}) arrived after step {latest[0]} (position {latest[1]})")
        self.latest[site.request] = (site.step, site.start, rows)
        runs = self.runs[site.request]
        if runs and runs[-1][1] == site.start:
            runs[-1][1] += rows
        else:
            runs.append([site.start, site.start + rows])

    def positions(self, request: int) -> np.ndarray:
        runs = self.runs.get(request, [])
        if not runs:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(first, stop, dtype=np.int64) for first, stop in runs])


class TensorRecorder(Interceptor):
    """Records stats (always) and full tensors (``mode == "full"``) of the selected steps."""

    def __init__(self, writer: BundleWriter, names: list[str], mode: str, steps: StepSelection) -> None:
        self.writer = writer
        self.names = set(names)
        self.full = mode == "full"
        self.steps = steps
        self.seen: set[str] = set()
        # The logits keep their own spans: without prompt logprobs the prefill's are its last row.
        self._spans, self._logit_spans = _Spans(), _Spans()

    def wants(self, name: str) -> bool:
        return name in self.names

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> None:
        if site.step not in self.steps:
            return None
        (self._logit_spans if site.name == LOGITS else self._spans).note(site, tensor.shape[0])
        self.writer.append(stats_array(site.name), site.request, tensor.row_stats())
        if self.full:
            self.writer.append(tensor_array(site.name), site.request, tensor.numpy())
        self.seen.add(site.name)
        return None

    @property
    def captured_any(self) -> bool:
        return bool(self._spans.latest or self._logit_spans.latest)

    def positions(self, request: int) -> np.ndarray:
        """Absolute positions of the rows recorded for ``request``, in order: those of every
        tensor but the logits, whose rows are these or their suffix from the last prompt position
        (SPEC.md section 6); the logits' own when nothing else was captured."""
        spans = self._spans if request in self._spans.runs else self._logit_spans
        return spans.positions(request)
