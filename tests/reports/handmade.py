"""Results no command produces yet (a calibration replay, measured local errors, a bisection) and
situations a real run makes only by chance (one request diverging at a chosen tensor and
position, a NaN), added to a real comparison through ``from_dict``: the way a report reads
them back from ``--json``."""

from __future__ import annotations

import math
from dataclasses import replace

from ptrace.bundle_spec.names import forward_key, layer_index
from ptrace.compare import Comparison
from ptrace.compare.calibration import limits
from ptrace.compare.results import Bisection, Calibration, LocalError, TensorResult


def calibrated(c: Comparison, *, label: str = "torch", sentence: str | None = None,
               outside: str | None = None) -> Comparison:
    """A calibration run whose error is 80% of the replay's everywhere, except ``outside`` (a
    tensor name) where the replay's error is 9x the calibration's."""
    tensors = []
    for t in c.tensors:
        ratio = 9.0 if t.name == outside else 1.25
        tensors.append({"name": t.name, "rel_err": t.rel_err / ratio if math.isfinite(t.rel_err) else None,
                        "position_rel": [r / ratio for r in t.position_rel], "ratio_mean": ratio,
                        "ratio_max": ratio * 1.5, "p_value": 1e-9 if t.name == outside else 0.5,
                        "within": t.name != outside})
    return replace(c, calibration=Calibration.from_dict({
        "backend": label, "dtype": c.b["dtype"], "device": "cpu", "path": "/tmp/calibration.zarr",
        "limits": limits(), "tensors": tensors, "within": outside is None,
        "sentence": sentence or (f"pass: within {c.b['dtype']} noise (largest ratio 1.9)" if outside is None
                                 else f"{c.b['backend']} adds 9x the error of {label} at {outside}")}))


def localized(c: Comparison, source: str = "measured", *, name_prefix: str = "") -> Comparison:
    """Each layer's own error: a tenth of what its output shows, except layer 2 which makes it all."""
    outs = [t for t in c.tensors if t.name.endswith(".out") and layer_index(t.name) is not None]
    errors = [LocalError.from_dict({
        "tensor": name_prefix + t.name, "local_error": t.rel_err * (0.9 if layer_index(t.name) == 2 else 0.1),
        "propagated_error": t.rel_err, "amplification": 1 / (0.9 if layer_index(t.name) == 2 else 0.1)})
        for t in outs]
    return replace(c, local_errors=errors, local_error_source=source)


def bisected(c: Comparison, sentence: str = "restoring layers 2 and 3 to the reference's output fixes 2/2 requests",
             tried: list | None = None) -> Comparison:
    return replace(c, bisection=Bisection.from_dict({
        "layers": [2, 3], "restored_requests": 2, "total_requests": 2, "sentence": sentence,
        "tried": tried if tried is not None else [{"layers": [2], "restored": 1}, {"layers": [2, 3], "restored": 2}]}))


def diverging(c: Comparison, request: int, tensor: str, position: int, *, factor: float = 300.0,
              nan_at: int | None = None) -> Comparison:
    """Request ``request`` parts at ``tensor`` from ``position`` on: every tensor from it in
    forward order gets ``factor`` x its noise floor there (and a NaN at ``nan_at`` in the last)."""
    start = forward_key(tensor)
    last = max(c.tensors, key=lambda t: forward_key(t.name)).name

    def bent(t: TensorResult) -> TensorResult:
        if forward_key(t.name) < start:
            return t
        rel = [t.noise_floor * factor * (1 + forward_key(t.name)[1]) if q == request and p >= position else r
               for q, p, r in zip(t.position_request, t.position_index, t.position_rel)]
        if t.name == last and nan_at is not None:
            rel = [math.nan if q == request and p == nan_at else r
                   for q, p, r in zip(t.position_request, t.position_index, rel)]
        return replace(t, position_rel=rel, rel_err=max((r for r in rel if r == r), default=0.0))

    requests = [replace(r, first_divergent_tensor=tensor, first_divergent_position=position)
                if r.index == request else r for r in c.requests]
    return replace(c, tensors=[bent(t) for t in c.tensors], requests=requests, first_divergent_tensor=tensor,
                   first_divergent_position=position, first_divergent_request=request)
