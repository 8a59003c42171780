"""Pass / warn / fail limits and their overrides."""

from __future__ import annotations

import json

import pytest

from ptrace.compare.thresholds import Thresholds, load_overrides, thresholds_for
from ptrace.errors import UsageError


@pytest.mark.parametrize(("mean_abs", "cos", "expected"), [(1e-5, 0.9999, "pass"), (1e-3, 0.9999, "warn"),
                                                           (1e-5, 0.995, "warn"), (0.5, 0.5, "fail")])
def test_thresholds(mean_abs, cos, expected):
    assert Thresholds(1e-4, 0.999, 1e-2, 0.99).verdict(mean_abs, cos) == expected


def test_overrides_from_a_file_and_flags_and_unknown_names_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"pass_cos": 0.9, "tie_margin": 0.5}))
    overrides = load_overrides(path, {"pass_cos": 0.95, "pass_mean_abs": None})
    assert overrides == {"pass_cos": 0.95, "tie_margin": 0.5}
    assert thresholds_for("bfloat16", overrides).pass_cos == 0.95
    path.write_text(json.dumps({"pass_cosine": 0.9}))
    with pytest.raises(UsageError, match="unknown threshold.*pass_cosine"):
        load_overrides(path, {})
    with pytest.raises(UsageError, match="unknown threshold.*pass_cosine"):
        thresholds_for("float32", {"pass_cosine": 0.9})
    path.write_text(json.dumps({"pass_cos": "high"}))
    with pytest.raises(UsageError, match="numbers"):
        load_overrides(path, {})
