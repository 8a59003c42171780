"""``Result.to_json`` writes per-position arrays in bulk, and the text is exactly the one the plain
JSON encoder writes: byte for byte, strict (no NaN tokens), and read back to the same result."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np

from ptrace.bundle_spec import open_bundle
from ptrace.compare import Comparison, compare
from ptrace.compare.results import CalibratedTensor, Calibration
from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.conftest import run_cli


def _refuse(constant: str):
    raise AssertionError(f"{constant} in JSON output")


def _planted(tmp_path) -> Comparison:
    """A real comparison (two requests, per-position arrays on every tensor) with non-finite
    values, extreme floats, an empty array, a nested per-position array and awkward strings."""
    requests = [SyntheticRequest((1, 2, 3), (4, 5, 6)), SyntheticRequest((3, 2, 9, 9), (1, 5, 6, 2))]
    with (open_bundle(write_bundle(tmp_path / "a.zarr", requests)) as a,
          open_bundle(write_bundle(tmp_path / "b.zarr", requests, dtype="bfloat16")) as b):
        c = compare(a, b)
    assert all(t.position_cos.size for t in c.tensors)
    odd = np.array([1.0, -math.inf, math.nan, math.inf, 5e-324, 1e16, -0.0, 0.1, 1 / 3, 1e-5], np.float64)
    first = replace(c.tensors[0], position_mean_abs=odd, position_rel=np.zeros(0), max_abs_err=math.inf)
    calibration = Calibration(backend="torch", dtype="bfloat16", device="cpu", path='/a "b"\n\tc',
                              limits={"ratio": 2.0}, within=False, sentence="é ✓ \u2028 \\",
                              tensors=[CalibratedTensor(name="embed", rel_err=0.5, position_rel=odd[::-1])])
    return replace(c, tensors=[first, *c.tensors[1:]], calibration=calibration)


def test_to_json_is_the_plain_encoders_text_strict_and_reads_back(tmp_path):
    c = _planted(tmp_path)
    text = c.to_json()
    assert text == json.dumps(c.to_dict(), indent=2, allow_nan=False)
    data = json.loads(text, parse_constant=_refuse)
    assert data["tensors"][0]["position_mean_abs"][:4] == [1.0, None, None, None]
    assert data["tensors"][0]["position_rel"] == [] and data["calibration"]["tensors"][0]["position_rel"][-1] == 1.0
    back = Comparison.from_dict(data)
    assert back.to_json() == text
    np.testing.assert_array_equal(back.tensors[1].position_cos, c.tensors[1].position_cos)  # every bit
    assert back.tensors[1].position_index.dtype == np.int64


def test_cli_json_file_and_stdout_are_the_same_text(tmp_path):
    requests = [SyntheticRequest((1, 2, 3), (4, 5, 6))]
    a = write_bundle(tmp_path / "a.zarr", requests)
    b = write_bundle(tmp_path / "b.zarr", requests, noise=0.01)
    assert run_cli("compare", a, b, "--json", tmp_path / "c.json").returncode == 0
    text = (tmp_path / "c.json").read_text()
    with open_bundle(a) as bundle_a, open_bundle(b) as bundle_b:
        assert text == json.dumps(compare(bundle_a, bundle_b).to_dict(), indent=2, allow_nan=False)
    stdout = run_cli("compare", a, b, "--json", "-").stdout  # the verdict line, then the JSON
    assert stdout[stdout.index("\n{") + 1:] == text + "\n"
