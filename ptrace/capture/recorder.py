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


class TensorRecorder(Interceptor):
    """Records stats (always) and full tensors (``mode == "full"``) of the selected steps."""

    def __init__(self, writer: BundleWriter, names: list[str], mode: str, steps: StepSelection) -> None:
        self.writer = writer
        self.names = set(names)
        self.full = mode == "full"
        self.steps = steps
        self.seen: set[str] = set()
        # request -> (step, first position) -> rows: the positions actually captured. A step MAY
        # arrive in several chunks (vLLM's chunked prefill), each a span of its own. The logits
        # keep their own spans: without prompt logprobs the prefill's are its last row alone.
        self._rows: dict[int, dict[tuple[int, int], int]] = defaultdict(dict)
        self._logit_rows: dict[int, dict[tuple[int, int], int]] = defaultdict(dict)

    def wants(self, name: str) -> bool:
        return name in self.names

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> None:
        if site.step not in self.steps:
            return None
        rows = tensor.shape[0]
        spans = self._logit_rows if site.name == LOGITS else self._rows
        known = spans[site.request].setdefault((site.step, site.start), rows)
        if known != rows:
            raise BackendError(f"{site.name}: step {site.step} of request {site.request} covers "
                               f"positions {site.start}+{rows}, other tensors {site.start}+{known}")
        self.writer.append_rows(stats_array(site.request, site.name), tensor.row_stats())
        if self.full:
            self.writer.append_rows(tensor_array(site.request, site.name), tensor.numpy())
        self.seen.add(site.name)
        return None

    @property
    def captured_any(self) -> bool:
        return bool(self._rows or self._logit_rows)

    def positions(self, request: int) -> np.ndarray:
        """Absolute positions of the rows recorded for ``request``, in order: those of every
        tensor but the logits, whose rows are these or their suffix from the last prompt position
        (SPEC.md section 6); the logits' own when nothing else was captured."""
        spans = sorted((self._rows.get(request) or self._logit_rows.get(request, {})).items())
        if not spans:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(start, start + rows) for (_, start), rows in spans]).astype(np.int64)
