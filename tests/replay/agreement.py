"""One judgment per pair: ``compare`` on a replay bundle and its source says what ``replay`` said."""

from __future__ import annotations

from ptrace.bundle_spec import open_bundle
from ptrace.compare.judgment import judge
from ptrace.replay.plan import TEACHER
from ptrace.replay.session import ReplayResult


def assert_compare_agrees(result: ReplayResult) -> None:
    """``ptrace compare SOURCE TEACHER_FORCED_REPLAY`` gives the replay's verdict, for the same
    reasons: everything after the tokens clause (which counts the free-running run's tokens in
    a replay of both modes) is the same sentence."""
    with open_bundle(result.source) as a, open_bundle(result.bundles[TEACHER]) as b:
        again = judge(a, b)
    replayed = result.primary
    assert again.verdict == replayed.verdict, (again.summary, replayed.summary)
    assert again.summary.split("; ", 1)[1] == replayed.summary.split("; ", 1)[1], (again.summary, replayed.summary)
    assert (again.calibration is None) == (replayed.calibration is None)
    assert again.calibration_note == replayed.calibration_note
