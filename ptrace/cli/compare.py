"""``ptrace compare``: two existing bundles, no engine needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import verdicts as v
from ptrace.cli.console import console


def compare(
    reference: Annotated[Path, typer.Argument(help="Bundle A, the reference.")],
    other: Annotated[Path, typer.Argument(help="Bundle B, compared against A.")],
    report: v.Report = None,
    json_out: v.JsonOut = None,
    metrics_file: v.MetricsFile = None,
    fail_on: v.FailOn = None,
    thresholds: v.ThresholdsFile = None,
    pass_cos: v.PassCos = None,
    pass_mean_abs: v.PassMeanAbs = None,
) -> None:
    """Compare two bundles of the same inputs (say, a colleague's NPU capture against yours).

    Works with no engine installed: it only reads the bundles.
    """
    from ptrace.bundle_spec import open_bundle
    from ptrace.compare import compare as run_compare

    v.check_fail_on(fail_on)
    overrides = v.threshold_overrides(thresholds, pass_cos, pass_mean_abs)
    with open_bundle(reference) as a, open_bundle(other) as b, console.progress("comparing tensors") as update:
        comparison = run_compare(a, b, threshold_overrides=overrides, progress=update)
    v.emit(comparison, report=report, json_out=json_out, metrics_file=metrics_file, fail_on=fail_on)
