"""Pass / warn / fail: how close is close enough, per dtype.

Defaults follow common production limits for float32 (mean abs error < 1e-4 and
cosine similarity > 0.999) and scale with the unit roundoff of lower precisions. The *coarser*
of the two runs' dtypes picks the row (``noise.coarser``), as it picks the noise floor: a
bfloat16 replay of a float32 capture cannot be closer to it than bfloat16 rounding allows, and
float32's limits would fail it for being bfloat16. These limits judge only what rises above the
noise floor (``tensors.size_verdict``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from ptrace.bundle_spec.records import plain
from ptrace.errors import UsageError

PASS, WARN, FAIL = "pass", "warn", "fail"
_ORDER = {PASS: 0, WARN: 1, FAIL: 2}


@dataclass(frozen=True)
class Thresholds:
    pass_mean_abs: float
    pass_cos: float
    warn_mean_abs: float
    warn_cos: float
    #: Logprob margin (nats) under which a token flip counts as a near-tie, not a bug.
    tie_margin: float = 0.1

    def verdict(self, mean_abs: float, cos: float) -> str:
        if mean_abs < self.pass_mean_abs and cos > self.pass_cos:
            return PASS
        if mean_abs < self.warn_mean_abs and cos > self.warn_cos:
            return WARN
        return FAIL

    def passing(self, mean_abs: np.ndarray, cos: np.ndarray) -> np.ndarray:
        """Element-wise over per-row arrays: where :meth:`verdict` is PASS."""
        return (mean_abs < self.pass_mean_abs) & (cos > self.pass_cos)

    def failing(self, mean_abs: np.ndarray, cos: np.ndarray) -> np.ndarray:
        """Element-wise over per-row arrays: where :meth:`verdict` is FAIL (NaN fails, as there),
        without a Python call per row of a long tensor."""
        return ~(((mean_abs < self.pass_mean_abs) & (cos > self.pass_cos))
                 | ((mean_abs < self.warn_mean_abs) & (cos > self.warn_cos)))

    def tripped(self, mean_abs: float, cos: float) -> str:
        """Which limit a verdict other than pass broke, in words (``mean abs error 0.002 >= 1e-4``)."""
        level = self.verdict(mean_abs, cos)
        if level == PASS:
            return ""
        limit_abs, limit_cos = ((self.warn_mean_abs, self.warn_cos) if level == FAIL
                                else (self.pass_mean_abs, self.pass_cos))
        if not mean_abs < limit_abs:
            return f"mean abs error {mean_abs:.3g} >= {limit_abs:g}"
        return f"cosine {cos:.7g} <= {limit_cos:g}"

    def to_dict(self) -> dict[str, float]:
        return plain(self)


DEFAULTS: dict[str, Thresholds] = {
    "float64": Thresholds(1e-6, 0.99999, 1e-4, 0.999),
    "float32": Thresholds(1e-4, 0.999, 1e-2, 0.99),
    "float16": Thresholds(1e-3, 0.999, 1e-2, 0.99),
    "bfloat16": Thresholds(1e-2, 0.999, 5e-2, 0.99),
}


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=_ORDER.__getitem__, default=PASS)


def at_least(verdict: str, level: str) -> bool:
    """Whether ``verdict`` is as bad as ``level`` or worse (``--fail-on``)."""
    return _ORDER[verdict] >= _ORDER[level]


def _check_known(names: Iterable[str], where: str) -> None:
    known = {f.name for f in fields(Thresholds)}
    if unknown := set(names) - known:
        raise UsageError(f"{where}unknown threshold(s) {', '.join(sorted(unknown))}",
                         hint=f"known: {', '.join(sorted(known))}")


def thresholds_for(dtype: str, overrides: dict[str, float] | None = None) -> Thresholds:
    base = DEFAULTS.get(dtype, DEFAULTS["float32"])
    if not overrides:
        return base
    _check_known(overrides, "")
    return replace(base, **overrides)


def load_overrides(path: Path | None, flags: dict[str, float | None]) -> dict[str, float]:
    """Threshold overrides from a JSON config file and flags (flags win)."""
    overrides: dict[str, float] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read thresholds file {path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
            raise UsageError(f"{path}: expected a JSON object of numbers", hint='e.g. {"pass_cos": 0.9999}')
        _check_known(data, f"{path}: ")
        overrides.update({k: float(v) for k, v in data.items()})
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides
