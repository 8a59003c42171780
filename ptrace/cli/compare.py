"""``ptrace compare``: two existing bundles, no engine needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import verdicts as v
from ptrace.cli.console import console


def compare(
    reference: Annotated[Path, typer.Argument(metavar="A", help="Bundle A, the reference.")],
    other: Annotated[Path, typer.Argument(metavar="B", help="Bundle B, compared against A.")],
    report: v.Report = None,
    json_out: v.JsonOut = None,
    metrics_file: v.MetricsFile = None,
    fail_on: v.FailOn = None,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", rich_help_panel=v.VERDICT, metavar="BUNDLE",
        help="A trusted engine's run of A's inputs at B's dtype: test whether B's error is more than "
             "the dtype explains, as replay --calibrate does (default: the calibration a replay recorded).")] = None,
    require_same_model: Annotated[bool, typer.Option(
        "--require-same-model", rich_help_panel=v.VERDICT,
        help="Refuse bundles of different weights (fingerprints) instead of only saying so: for CI.")] = False,
    thresholds: v.ThresholdsFile = None,
    pass_cos: v.PassCos = None,
    pass_mean_abs: v.PassMeanAbs = None,
) -> None:
    """Compare two bundles of the same inputs (say, a colleague's NPU capture against yours).

    Works with no engine installed: it only reads the bundles. With --calibration C (a trusted
    engine's bfloat16 run of A, say), B is judged by how its error compares with C's; a replay of
    A is judged as `ptrace replay` judged it (the calibration and limits it recorded).
    """
    from ptrace.bundle_spec import open_bundle
    from ptrace.compare.judgment import judge
    from ptrace.errors import ModelMismatchError

    v.check_fail_on(fail_on)
    overrides = v.threshold_overrides(thresholds, pass_cos, pass_mean_abs)
    with console.data_on_stdout(str(json_out) == "-"):
        with open_bundle(reference) as a, open_bundle(other) as b, console.progress("comparing tensors") as update:
            if require_same_model and a.model.fingerprint != b.model.fingerprint:
                raise ModelMismatchError(f"{other} was captured with other weights than {reference} (fingerprint "
                                         f"{b.model.fingerprint[:12]} != {a.model.fingerprint[:12]})",
                                         hint="compare runs of the same checkpoint, or drop --require-same-model")
            comparison = judge(a, b, calibration=calibration, threshold_overrides=overrides, progress=update)
        v.emit(comparison, report=report, json_out=json_out, metrics_file=metrics_file, fail_on=fail_on)
