"""The noise floor: how much two runs may differ by rounding alone, per tensor.

Two runs of the same model differ by floating-point rounding whenever anything about the
arithmetic differs (engine, kernel, batch, thread count). Rounding makes a *relative* error of
a few unit roundoffs ``u`` of the compute dtype per operation, accumulated through the
layers. So a difference is **divergence** only where a tensor's normwise relative error
``||b - a|| / ||a||`` rises above

    floor(tensor) = FLOOR_ULPS[dtype] * u * (1 + depth(tensor))

where ``dtype`` is the less precise of the two runs' dtypes and ``u`` its unit roundoff
(float32 2^-24, float16 2^-11, bfloat16 2^-8), and ``depth`` counts the decoder layers the
tensor comes after (0 for ``embed``, ``i + 1`` inside layer ``i``, ``L + 1`` for ``final_norm``
and ``logits``): the growth allowance for error that layers accumulate and pass on.

``FLOOR_ULPS`` is one layer's rounding allowance. 32- and 64-bit engines differ by the order of
their sums (a dot product of K terms rounds to about sqrt(K) u): 64 covers K up to 4096. 16-bit
engines accumulate in float32, so what differs is the rounding of each op's output and inputs:
a few u per layer, 8 allowed. Measured on the example model (November 2026), the largest
per-position error stayed at 0.17x the floor for vLLM and MindFormers against HF transformers
in float32, and at 0.25x for HF transformers in bfloat16 against itself in float32. A
bit-identical pair of runs has no error, so nothing is above any floor.

The floor is relative, never absolute: activations range from 1e-3 to 1e4 between models and
layers, and the same floor serves all of them. Pass/warn/fail (``thresholds``) judges the *size*
of what rises above it: a tensor whose every position stays within its floor passes, however
large its absolute error (rounding of the coarser dtype explains it), so a verdict never fails
a difference it calls rounding noise.
"""

from __future__ import annotations

from ptrace.bundle_spec.names import forward_key

#: Unit roundoff (half the gap between 1 and the next number) of each compute dtype.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: Rounding allowance of one layer, in unit roundoffs of the dtype (module docstring).
FLOOR_ULPS = {"float64": 64, "float32": 64, "float16": 8, "bfloat16": 8}


def unit_roundoff(dtype: str) -> float:
    return UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["float32"])


def depth(name: str, num_layers: int) -> int:
    """How many decoder layers' worth of accumulated error a tensor may carry."""
    group, layer, _ = forward_key(name)
    if group == 0:
        return 0
    if group == 1:
        return layer + 1
    return num_layers + 1


def coarser(dtype_a: str, dtype_b: str) -> str:
    """The less precise of two dtypes: it decides how much two runs may differ by rounding (the
    floor here, the pass/warn/fail limits in ``thresholds``)."""
    return max(dtype_a, dtype_b, key=unit_roundoff)


def floor(name: str, dtype_a: str, dtype_b: str, num_layers: int) -> float:
    """The noise floor of tensor ``name`` between runs in ``dtype_a`` and ``dtype_b``."""
    coarser_dtype = coarser(dtype_a, dtype_b)
    return (FLOOR_ULPS.get(coarser_dtype, FLOOR_ULPS["float32"]) * unit_roundoff(coarser_dtype)
            * (1 + depth(name, num_layers)))
