"""Mixture-of-experts routing of two runs: which expert choices differ, by how close a call each
was, and whether a differing choice explains where the runs part ways.

A *flip* is a (request, MoE layer, position) whose chosen experts differ between the runs as
**sets**: the same two experts in another order route the token to the same experts (only their
combine weights differ, which ``layers.{i}.expert_weights``' own error measures). ``a`` and ``b``
list each run's ids in its engine's order (``layers.{i}.experts``, SPEC.md section 5).

The ``margin`` of a flip is, in run A's router logits at that row, the gap between the last
chosen and the first unchosen expert: how far A's choice was from going the other way. A flip
whose margin is below the noise floor of the router logits (``compare.noise``'s relative floor
of the coarser dtype at that depth, times the row's largest logit magnitude) is a *near-tie*:
rounding alone can explain it. Without A's router logits the margin is None.

Expert ids are categorical: they are compared here, not by the numeric metrics (a relative
error between ids 1 and 5 means nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ptrace.bundle_spec.names import layer_index
from ptrace.bundle_spec.reader import Bundle
from ptrace.compare.align import Alignment, read_rows
from ptrace.compare.noise import floor

#: At most this many flips are listed (all are counted): a router perturbed on purpose flips
#: thousands of choices, and the JSON must stay readable.
MAX_LISTED = 1000


def is_categorical(name: str) -> bool:
    """Whether a canonical tensor holds ids, compared by :func:`compare_routing` only."""
    return name.endswith(".experts")


def _layers(a: Bundle, b: Bundle) -> list[int]:
    both = set(a.tensor_names) & set(b.tensor_names)
    return sorted(layer_index(n) for n in both if is_categorical(n))


def margins(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Per row: the last chosen minus the first unchosen router logit."""
    ordered = -np.sort(-logits.astype(np.float64), axis=-1)
    return ordered[:, top_k - 1] - ordered[:, top_k]


def compare_routing(a: Bundle, b: Bundle, alignments: dict[int, Alignment]) -> dict[str, Any] | None:
    """The ``routing`` of a comparison (SPEC.md's comparison JSON), or None when the bundles do not
    both hold expert choices (a dense model, or routing not captured)."""
    layers = _layers(a, b)
    if not layers:
        return None
    flips: list[dict[str, Any]] = []
    counts = {layer: [0, 0] for layer in layers}  # layer -> [flips, choices compared]
    names = set(a.tensor_names)
    for request, alignment in sorted(alignments.items()):
        if not alignment.positions.size:
            continue
        for layer in layers:
            ids_a = read_rows(a, request, f"layers.{layer}.experts", alignment.rows_a)
            ids_b = read_rows(b, request, f"layers.{layer}.experts", alignment.rows_b)
            differs = np.flatnonzero((np.sort(ids_a, axis=-1) != np.sort(ids_b, axis=-1)).any(axis=-1))
            counts[layer][0] += differs.size
            counts[layer][1] += ids_a.shape[0]
            if not differs.size:
                continue
            router = f"layers.{layer}.router"
            gap = scale = None
            if router in names:
                logits = read_rows(a, request, router, alignment.rows_a)
                gap = margins(logits, ids_a.shape[-1])
                scale = np.abs(logits).max(axis=-1)
                noise = floor(router, a.run.dtype, b.run.dtype, a.model.num_layers)
            for row in differs:
                margin = None if gap is None else float(gap[row])
                flips.append({"request": request, "layer": layer, "position": int(alignment.positions[row]),
                              "a": ids_a[row].tolist(), "b": ids_b[row].tolist(), "margin": margin,
                              "near_tie": None if margin is None else bool(margin < noise * float(scale[row]))})
    flipped, compared = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    flips.sort(key=lambda f: (f["request"], f["position"], f["layer"]))
    return {
        "flips": flips[:MAX_LISTED], "flip_count": flipped, "choices": compared,
        "flip_rate": flipped / compared if compared else 0.0,
        "flip_rate_per_layer": {str(layer): (n / total if total else 0.0) for layer, (n, total) in counts.items()},
        "compared_as": "sets",
    }


def cause(routing: dict[str, Any] | None, request: int | None, tensor: str | None,
          position: int | None) -> dict[str, Any] | None:
    """The flip that explains where the runs part ways: at the first divergent position of the
    first divergent request, in the divergent tensor's layer or before it (the expert choice
    precedes that layer's MLP)."""
    if not routing or tensor is None or position is None:
        return None
    layer = layer_index(tensor)
    if layer is None:
        return None
    return next((f for f in routing["flips"] if f["request"] == request and f["position"] == position
                 and f["layer"] <= layer), None)


def describe_flip(flip: dict[str, Any]) -> str:
    """``expert choice differs at layers.3, position 17: experts [1, 5] vs [1, 2], margin 0.0002, a near-tie``"""
    text = f"expert choice differs at layers.{flip['layer']}, position {flip['position']}: experts {flip['a']} vs {flip['b']}"
    if flip["margin"] is not None:
        text += f", margin {flip['margin']:.2g}, {'a near-tie' if flip['near_tie'] else 'above the noise floor'}"
    return text


def sentence(routing: dict[str, Any] | None, request: int | None, tensor: str | None,
             position: int | None) -> str | None:
    """The summary's routing clause: the causing flip, else how many choices flipped."""
    if not routing:
        return None
    found = cause(routing, request, tensor, position)
    if found is not None:
        return describe_flip(found)
    if not routing["flip_count"]:
        return f"expert choices identical ({routing['choices']} compared)"
    ties = sum(bool(f["near_tie"]) for f in routing["flips"])
    return (f"{routing['flip_count']} of {routing['choices']} expert choices differ "
            f"({ties} of the {len(routing['flips'])} listed near-ties), first {describe_flip(routing['flips'][0])}")


def per_layer_position(routing: dict[str, Any]) -> list[dict[str, Any]]:
    """Flips counted per (layer, position) over requests, for the report's grid."""
    cells: dict[tuple[int, int], list[int]] = {}
    for flip in routing["flips"]:
        cell = cells.setdefault((flip["layer"], flip["position"]), [0, 0])
        cell[0] += 1
        cell[1] += bool(flip["near_tie"])
    return [{"layer": layer, "position": position, "flips": n, "near_ties": ties}
            for (layer, position), (n, ties) in sorted(cells.items())]


__all__: Sequence[str] = ("MAX_LISTED", "cause", "compare_routing", "describe_flip", "is_categorical",
                          "margins", "per_layer_position", "sentence")
