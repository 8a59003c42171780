"""Where the divergence starts: the first failing tensor, the tensor that adds the most error,
and the first NaN or Inf. Everything is ordered by the forward pass (canonical names)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ptrace.bundle_spec.names import forward_key, layer_index
from ptrace.bundle_spec.reader import Bundle
from ptrace.compare.results import TensorResult


def first_divergent(tensors: list[TensorResult]) -> dict[int, tuple[str, int]]:
    """Per request: the earliest tensor in forward order whose normwise relative error rises
    above its noise floor at some position, and the earliest such position.

    Forward order first, position second: an error made in layer k is inherited by every later
    tensor, and amplified it may cross the floor at an earlier position there than in layer k;
    the tensor where it *starts* is what the user hunts. Requests are never pooled: each prompt
    is its own run."""
    found: dict[int, tuple[str, int]] = {}
    for tensor in sorted(tensors, key=lambda t: forward_key(t.name)):
        rel = np.asarray(tensor.position_rel, dtype=np.float64)
        above = ~(rel <= tensor.noise_floor)  # NaN counts as divergent
        if not above.any():
            continue
        requests = np.asarray(tensor.position_request, dtype=np.int64)[above]
        positions = np.asarray(tensor.position_index, dtype=np.int64)[above]
        for request in np.unique(requests):
            if int(request) not in found:
                found[int(request)] = (tensor.name, int(positions[requests == request].min()))
    return found


def earliest(per_request: dict[int, tuple[str, int]]) -> tuple[int, str, int] | None:
    """Across requests: (request, tensor, position) of the divergence earliest in forward order
    (then position, then request)."""
    if not per_request:
        return None
    request, (name, position) = min(per_request.items(),
                                    key=lambda item: (forward_key(item[1][0]), item[1][1], item[0]))
    return request, name, position


def largest_local_error(results: list[TensorResult]) -> str | None:
    """The attention or MLP branch whose error grows most over its layer's input error (the
    previous layer's output, or ``embed``): the error made there, not inherited. A heuristic,
    used when no ``--localize`` replay measured local errors; branches within the noise floor
    make no error worth naming."""
    by_name = {t.name: t for t in results if not t.stats_only and np.isfinite(t.rel_err)}
    best, best_growth = None, 1.0
    for result in by_name.values():
        layer = layer_index(result.name)
        if layer is None or not result.name.endswith((".attn", ".mlp")) or not result.rel_err > result.noise_floor:
            continue
        source = by_name.get("embed" if layer == 0 else f"layers.{layer - 1}.out")
        inherited = max(source.rel_err, source.noise_floor) if source is not None else result.noise_floor
        growth = result.rel_err / inherited if inherited > 0 else np.inf
        if growth > best_growth:
            best, best_growth = result.name, growth
    return best


def first_nonfinite(bundle: Bundle, label: str, names: list[str]) -> dict[str, Any] | None:
    """The first tensor in forward order (then position) holding a NaN or Inf."""
    found = None
    for name in names:
        for request, stats in bundle.stats_by_request(name).items():
            bad = np.flatnonzero(stats[:, 5] + stats[:, 6] > 0)
            if bad.size:
                position = int(bundle.tensor_positions(request, name)[bad[0]])
                key = (forward_key(name), position, request)
                if found is None or key < found[0]:
                    found = (key, {"bundle": label, "request": request, "tensor": name, "position": position})
    return found[1] if found else None
