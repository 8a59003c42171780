"""Results are plain, strict JSON data, and come back from it unchanged."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.compare import Comparison, compare
from ptrace.errors import ComparisonError
from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.conftest import run_cli


def _strict_json(text: str):
    """Parse as a reader outside Python would: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON output")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def stats_only(tmp_path) -> Comparison:
    """A comparison with NaN metrics (a stats-only tensor has no cosine), and an overflow planted."""
    requests = [SyntheticRequest((1, 2, 3), (4, 5, 6)), SyntheticRequest((3, 2), (1, 5, 6))]
    flipped = [requests[0], SyntheticRequest((3, 2), (1, 7, 7))]
    with (open_bundle(write_bundle(tmp_path / "a.zarr", requests, mode="stats")) as a,
          open_bundle(write_bundle(tmp_path / "b.zarr", flipped, mode="stats", noise=0.2)) as b):
        c = compare(a, b)
    assert math.isnan(c.tensors[0].cos_sim) and c.requests[1].divergence is not None
    overflowed = replace(c.tensors[0], max_abs_err=math.inf, position_mean_abs=[1.0, -math.inf, math.nan])
    return replace(c, tensors=[overflowed, *c.tensors[1:]])


def test_to_dict_is_strict_json_and_from_dict_reads_it_back(stats_only):
    data = _strict_json(json.dumps(stats_only.to_dict()))
    tensor = data["tensors"][0]
    assert tensor["cos_sim"] is None and tensor["max_abs_err"] is None
    assert tensor["position_mean_abs"] == [1.0, None, None]
    back = Comparison.from_dict(data)
    assert math.isnan(back.tensors[0].cos_sim) and math.isnan(back.tensors[0].max_abs_err)
    assert back.tensors[0].position_mean_abs[0] == 1.0 and math.isnan(back.tensors[0].position_mean_abs[1])
    # per-position results are arrays in memory, whether computed, given as lists or read back
    for tensor in (stats_only.tensors[0], back.tensors[0]):
        assert tensor.position_mean_abs.dtype == np.float64 and tensor.position_index.dtype == np.int64
    assert back.requests[1].divergence == stats_only.requests[1].divergence
    assert back.to_dict() == data
    # everything but the non-finite floats (NaN != NaN) compares equal
    assert back.requests == stats_only.requests and back.a == stats_only.a and back.b == stats_only.b


def test_cli_json_is_strict_and_loads_back(tmp_path):
    requests = [SyntheticRequest((1, 2, 3), (4, 5, 6))]
    a = write_bundle(tmp_path / "a.zarr", requests, mode="stats")
    b = write_bundle(tmp_path / "b.zarr", requests, mode="stats", noise=0.3)
    result = run_cli("compare", a, b, "--json", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "c.json").read_text()
    data = _strict_json(text)
    assert data["tensors"][0]["cos_sim"] is None
    assert Comparison.from_dict(json.loads(text)).to_dict() == data
    stdout = run_cli("compare", a, b, "--json", "-").stdout  # the JSON alone (the verdict: stderr)
    assert _strict_json(stdout) == data


def test_from_dict_says_what_is_wrong(stats_only):
    data = stats_only.to_dict()
    del data["tensors"][0]["verdict"]
    with pytest.raises(ComparisonError, match=r"Comparison.tensors\[0\] lacks the key 'verdict'"):
        Comparison.from_dict(data)
    data = stats_only.to_dict()
    data["requests"][0]["tokens_a"] = [1, "2"]
    with pytest.raises(ComparisonError, match=r"Comparison.requests\[0\].tokens_a\[1\] is str '2', expected int"):
        Comparison.from_dict(data)
    data["requests"][0]["tokens_a"] = [1, 2]
    data["tensors"][0]["position_cos"] = ["0.5"]
    with pytest.raises(ComparisonError, match=r"Comparison.tensors\[0\].position_cos is not a list of numbers"):
        Comparison.from_dict(data)
    with pytest.raises(ComparisonError, match=r"Comparison is list \[1, 2\], expected a map"):
        Comparison.from_dict([1, 2])
