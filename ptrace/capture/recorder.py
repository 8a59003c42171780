"""The interceptor that writes what the engine computes into the bundle."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ptrace.backends.base import EngineTensor, Interceptor, TensorSite
from ptrace.bundle_spec.layout import stats_array, tensor_array
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


class TensorRecorder(Interceptor):
    """Records stats (always) and full tensors (``mode == "full"``) of the selected steps."""

    def __init__(self, writer: BundleWriter, names: list[str], mode: str, steps: StepSelection) -> None:
        self.writer = writer
        self.names = set(names)
        self.full = mode == "full"
        self.steps = steps
        self.seen: set[str] = set()
        # request -> (step, first position, rows) of the latest span it was shown: every tensor of
        # one span has that many rows. A step MAY arrive in several spans (vLLM's chunked prefill).
        self._latest: dict[int, tuple[int, int, int]] = {}
        # request -> [first, stop) runs of the positions captured, contiguous spans merged, so
        # that what is kept does not grow with the steps of a long run.
        self._runs: dict[int, list[list[int]]] = defaultdict(list)

    def wants(self, name: str) -> bool:
        return name in self.names

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> None:
        if site.step not in self.steps:
            return None
        self._check_span(site, tensor.shape[0])
        self.writer.append_rows(stats_array(site.request, site.name), tensor.row_stats())
        if self.full:
            self.writer.append_rows(tensor_array(site.request, site.name), tensor.numpy())
        self.seen.add(site.name)
        return None

    def _check_span(self, site: TensorSite, rows: int) -> None:
        """Note a new span of ``site.request``'s positions; check that a known one keeps its rows.

        Rows are appended in the order they arrive, so spans must arrive in (step, position)
        order for ``positions`` to describe them.
        """
        latest = self._latest.get(site.request)
        if latest is not None and latest[:2] == (site.step, site.start):
            if latest[2] != rows:
                raise BackendError(f"{site.name}: step {site.step} of request {site.request} covers "
                                   f"positions {site.start}+{rows}, other tensors {site.start}+{latest[2]}")
            return
        if latest is not None and latest[:2] > (site.step, site.start):
            raise BackendError(f"{site.name}: step {site.step} of request {site.request} (position "
                               f"{site.start}) arrived after step {latest[0]} (position {latest[1]})")
        self._latest[site.request] = (site.step, site.start, rows)
        runs = self._runs[site.request]
        if runs and runs[-1][1] == site.start:
            runs[-1][1] += rows
        else:
            runs.append([site.start, site.start + rows])

    @property
    def captured_any(self) -> bool:
        return bool(self._latest)

    def positions(self, request: int) -> np.ndarray:
        """Absolute positions of the rows recorded for ``request``, in order."""
        runs = self._runs.get(request, [])
        return np.concatenate([np.arange(first, stop, dtype=np.int64) for first, stop in runs]) if runs \
            else np.zeros(0, dtype=np.int64)
