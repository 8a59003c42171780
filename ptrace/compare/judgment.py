"""One judgment per pair of runs: ``ptrace compare A B`` judges B exactly as ``ptrace replay``
judged it.

A replay records in its ``meta/replay`` what it was judged against: the calibration bundle of
the same mode (``compare.calibration``) or why there is none, and the limits applied. Comparing
it with its source again uses the same, so the same pair gets the same verdict whichever command
asks. A pair of runs in different dtypes or on different devices with no calibration is judged
against the coarser dtype's noise floor and limits, and the verdict says it was not calibrated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.reader import Bundle
from ptrace.compare.bundles import compare
from ptrace.compare.calibration import calibrate
from ptrace.compare.noise import coarser
from ptrace.compare.results import Comparison
from ptrace.compare.summary import with_summary


def not_calibrated(dtype_a: str, dtype_b: str, why: str) -> str:
    """The verdict's clause for a dtype or device change judged without a calibration run."""
    return f"{why}: judged against {coarser(dtype_a, dtype_b)}'s noise floor and limits"


def with_note(comparison: Comparison, note: str | None) -> Comparison:
    """``comparison`` saying why it was not calibrated (``note``; None: nothing to say)."""
    return with_summary(replace(comparison, calibration_note=note or None))


def recorded(a: Bundle, b: Bundle) -> dict[str, Any]:
    """What B's replay was judged against, if B is a replay of A (else empty)."""
    info = b.replay_info()
    return info if info and info.get("source_bundle_id") == a.manifest.bundle_id else {}


def calibration_bundle(b: Bundle, info: dict[str, Any]) -> Path | None:
    """The calibration bundle a replay recorded, next to it; None when it recorded none."""
    name = info.get("calibration_path") or ""
    return Path(b.path).parent / Path(name).name if name else None


def judge(a: Bundle, b: Bundle, *, calibration: Path | None = None,
          threshold_overrides: dict[str, float] | None = None,
          progress: Callable[[int, int], None] | None = None) -> Comparison:
    """B against reference A, judged as its replay was: against ``calibration`` if given, else
    against the calibration B recorded (a replay of A), else against the noise floor (saying so
    when the dtypes or devices differ). Limits: ``threshold_overrides``, else those B recorded."""
    info = recorded(a, b)
    overrides = threshold_overrides or dict(info.get("thresholds") or {}) or None
    comparison = compare(a, b, threshold_overrides=overrides, progress=progress)
    calibration = calibration or calibration_bundle(b, info)
    if calibration is not None:
        if not calibration.exists():
            return with_note(comparison, not_calibrated(
                a.run.dtype, b.run.dtype, f"not calibrated: the calibration bundle {calibration} is missing"))
        with open_bundle(calibration) as c:
            return calibrate(comparison, compare(a, c, threshold_overrides=overrides))
    if info.get("calibration_note"):
        return with_note(comparison, info["calibration_note"])
    if (a.run.dtype, a.run.device) != (b.run.dtype, b.run.device):
        return with_note(comparison, not_calibrated(a.run.dtype, b.run.dtype, "not calibrated"))
    return comparison
