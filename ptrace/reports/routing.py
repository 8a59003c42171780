"""The report's "Expert routing" panel (mixture-of-experts models): which expert choices differ
between the runs, per layer and position, how close a call each was, and what each what-if did to
the routing and to the MoE blocks' error. Only present where the comparison has a ``routing``."""

from __future__ import annotations

from typing import Any

from ptrace.compare.results import Comparison
from ptrace.compare.routing import per_layer_position


def _mlp_errors(propagation: list[Any]) -> dict[str, float]:
    return {p.tensor: p.error for p in propagation if p.tensor.endswith(".mlp")}


def section(c: Comparison) -> dict[str, Any] | None:
    """What the template shows, or None for a dense model (no routing in the runs or what-ifs)."""
    whatifs = [w for w in c.whatifs if w.routing]
    if not c.routing and not whatifs:
        return None
    grid = None
    if c.routing:
        cells = per_layer_position(c.routing)
        layers = sorted(int(layer) for layer in c.routing["flip_rate_per_layer"])
        positions = sorted({cell["position"] for cell in cells})
        found = {(cell["layer"], cell["position"]): cell for cell in cells}
        grid = {"layers": layers, "positions": positions,
                "rows": [{"layer": layer, "rate": c.routing["flip_rate_per_layer"][str(layer)],
                          "cells": [found.get((layer, position)) for position in positions]} for layer in layers]}
    mlp_names = sorted({name for w in whatifs for name in _mlp_errors(w.propagation)})
    return {
        "routing": c.routing, "grid": grid, "mlp_names": mlp_names,
        "whatifs": [{"label": w.label, "routing": w.routing,
                     "mlp": [_mlp_errors(w.propagation).get(name) for name in mlp_names]} for w in whatifs],
    }
