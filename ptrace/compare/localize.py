"""Where the divergence starts: the first failing tensor, the tensor that adds the most error,
and the first NaN or Inf. Everything is ordered by the forward pass (canonical names)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ptrace.bundle_spec.names import forward_key
from ptrace.bundle_spec.reader import Bundle
from ptrace.compare.results import TensorResult


def first_divergent(tensors: list[TensorResult]) -> tuple[str | None, int | None]:
    """The earliest failing tensor in forward order at the earliest failing position."""
    failing = [t for t in tensors if t.first_fail_position is not None]
    if not failing:
        return None, None
    position = min(t.first_fail_position for t in failing)
    first = min((t for t in failing if t.first_fail_position == position), key=lambda t: forward_key(t.name))
    return first.name, position


def largest_local_error(results: list[TensorResult]) -> str | None:
    """The tensor whose error grows most over the tensor before it in forward order: the error
    made there, not inherited from earlier layers."""
    best, best_growth, previous = None, 1.0, 0.0
    for result in results:
        if result.stats_only or not np.isfinite(result.cos_sim):
            continue
        error = max(1.0 - result.cos_sim, 0.0)
        growth = error / max(previous, 1e-12)
        if error > 1e-9 and growth > best_growth:
            best, best_growth = result.name, growth
        previous = error
    return best


def first_nonfinite(bundle: Bundle, label: str, names: list[str]) -> dict[str, Any] | None:
    """The first tensor in forward order (then position) holding a NaN or Inf."""
    found = None
    for request in range(bundle.num_requests):
        for name in names:
            stats = bundle.stats(request, name)
            bad = np.flatnonzero(stats[:, 5] + stats[:, 6] > 0)
            if bad.size:
                position = int(bundle.positions(request)[bad[0]])
                key = (forward_key(name), position)
                if found is None or key < found[0]:
                    found = (key, {"bundle": label, "request": request, "tensor": name, "position": position})
                break
    return found[1] if found else None
