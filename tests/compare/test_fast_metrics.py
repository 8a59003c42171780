"""The fused compare gives the metrics of a plain float64 numpy implementation.

The reference below is written the obvious way, row by row, so that it can be read against the
definitions; compare streams two bundles chunked differently (one float32, one bfloat16, as a
precision replay is) through the compiled kernel, and through its numpy fallback, and must agree
with it within float64 rounding, NaN and infinity included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ptrace
from ptrace.bundle_spec import open_bundle, writer
from ptrace.compare import compare, metrics, tensors
from tests.bundle_spec.test_roundtrip import write_minimal

ROWS, WIDTH = 23, 48
RTOL = 1e-12


def plain_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, object]:
    """Every metric of one tensor, in float64, one row at a time."""
    per_row = {"mean_abs": [], "cos": [], "rel": []}
    max_abs, sum_abs, sum_rel, agree, dot, sq_a, sq_b, sq_diff = [], 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0
    with np.errstate(all="ignore"):
        for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
            d = np.abs(x - y)
            rel = d / (np.abs(x) + 1e-8)
            norm_x, norm_y, norm_d = np.sqrt(np.sum(x * x)), np.sqrt(np.sum(y * y)), np.sqrt(np.sum(d * d))
            per_row["mean_abs"].append(np.mean(d))
            per_row["cos"].append(cosine(np.sum(x * y), norm_x, norm_y))
            per_row["rel"].append(0.0 if norm_d == 0 else norm_d / norm_x)
            max_abs.append(np.max(d))
            sum_abs, sum_rel, agree = sum_abs + np.sum(d), sum_rel + np.sum(rel), agree + np.sum(rel <= 1e-3)
            dot, sq_a, sq_b = dot + np.sum(x * y), sq_a + np.sum(x * x), sq_b + np.sum(y * y)
            sq_diff += np.sum(d * d)
        size = a.size
        return {"max_abs_err": np.nanmax(max_abs), "mean_abs_err": sum_abs / size, "mean_rel_err": sum_rel / size,
                "thousandth_ratio": agree / size, "cos_sim": cosine(dot, np.sqrt(sq_a), np.sqrt(sq_b)),
                "rel_err": 0.0 if sq_diff == 0 else np.sqrt(sq_diff) / np.sqrt(sq_a),
                "min_cos_sim": np.min(per_row["cos"]), "position_mean_abs": per_row["mean_abs"],
                "position_cos": per_row["cos"], "position_rel": per_row["rel"]}


def cosine(dot: float, norm_x: float, norm_y: float) -> float:
    """Two zero rows are identical, one zero row is orthogonal; a NaN norm gives 0, as compare's."""
    if norm_x == 0 and norm_y == 0:
        return 1.0
    denominator = norm_x * norm_y
    return float(np.clip(dot / denominator, -1, 1)) if denominator > 0 else 0.0


def awkward_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A float32 reference and its bfloat16 replay: noise, zero rows, NaN, infinities, tiny values."""
    a = rng.standard_normal((ROWS, WIDTH)).astype(np.float32) * np.float32(3)
    a[2] = 0  # a zero row against a zero row: cosine 1
    a[5, :4] = 1e-30  # relative errors near the 1e-8 guard
    a[7, 3] = np.inf
    a[11, 0] = np.nan
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * np.float32(1e-2)).astype(ml_dtypes.bfloat16)
    b[2] = 0
    b[9] = 0  # a zero row against a non-zero one: cosine 0
    b[13, 6] = -np.inf
    b[17] = a[17].astype(ml_dtypes.bfloat16)  # rows that agree to the last bit of bfloat16
    return a, b


@pytest.fixture(params=["compiled", "numpy"])
def kernel(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(metrics, "_row_sums_function", lambda: metrics._numpy_row_sums)
        monkeypatch.setattr(metrics, "NUMPY_BLOCK_ELEMENTS", 2 * WIDTH)  # a piece of 3 rows: blocks of 2 and 1
    else:
        pytest.importorskip("numba")
        monkeypatch.setattr(tensors, "KERNEL_MIN_ELEMENTS", 0)  # these tensors are small: numpy's otherwise
    return request.param


@pytest.mark.parametrize("finite", [True, False], ids=["finite", "nan-inf"])
def test_compare_matches_a_plain_float64_implementation(tmp_path, monkeypatch, kernel, finite):
    rng = np.random.default_rng(7)
    a, b = awkward_pair(rng)
    if finite:
        a, b = np.nan_to_num(a, posinf=5, neginf=-5), np.nan_to_num(b, posinf=5, neginf=-5)
    # Small chunks and blocks: float32 rows come 3 to a chunk, bfloat16 rows 6, blocks of 4 rows,
    # so the two bundles' blocks never line up and every path of the streaming is taken.
    monkeypatch.setattr(writer, "CHUNK_BYTES", 3 * WIDTH * 4)
    monkeypatch.setattr(tensors, "BLOCK_BYTES", 4 * WIDTH * 8)
    write_minimal(tmp_path / "a.zarr", {"layers.0.out": a})
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": b})
    with open_bundle(tmp_path / "a.zarr") as bundle_a, open_bundle(tmp_path / "b.zarr") as bundle_b:
        assert bundle_b._node("tensors/layers.0.out").chunks[0] == 6
        result = compare(bundle_a, bundle_b).tensors[0]
    expected = plain_metrics(a, b)
    for key, value in expected.items():
        np.testing.assert_allclose(getattr(result, key), value, rtol=RTOL, atol=0, err_msg=key)
    assert result.positions == ROWS and result.position_index.tolist() == list(range(ROWS))
    if not finite:
        assert np.isnan(result.mean_abs_err) and np.isnan(result.position_mean_abs[11])


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_a_float8_replay_is_compared_by_its_values(tmp_path, kernel, dtype):
    """Compare reads float8 (like bfloat16) as its stored bits and decodes them itself."""
    a, _ = awkward_pair(np.random.default_rng(5))
    a = np.nan_to_num(a, posinf=5, neginf=-5)
    b = a.astype(getattr(ml_dtypes, dtype))
    write_minimal(tmp_path / "a.zarr", {"layers.0.out": a})
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": b})
    with open_bundle(tmp_path / "a.zarr") as bundle_a, open_bundle(tmp_path / "b.zarr") as bundle_b:
        result = compare(bundle_a, bundle_b).tensors[0]
    for key, value in plain_metrics(a, b).items():
        np.testing.assert_allclose(getattr(result, key), value, rtol=RTOL, atol=0, err_msg=key)
    assert result.mean_abs_err > 0


def test_bfloat16_as_its_bits_sums_as_bfloat16(kernel):
    a, b = awkward_pair(np.random.default_rng(11))
    np.testing.assert_array_equal(metrics.row_sums(a, b.view(np.uint16)), metrics.row_sums(a, b))


def test_row_sums_keep_nan_in_the_max_and_count_agreement_exactly(kernel):
    a = np.array([[1.0, 2.0, 3.0], [1.0, np.nan, 3.0], [np.inf, 0.0, 1.0]], np.float32)
    b = np.array([[1.0, 2.002, 3.0], [1.0, 2.0, 3.5], [np.inf, 0.0, 1.0]], np.float32)
    sums = metrics.row_sums(a, b)
    assert sums[0, metrics.THOUSANDTHS] == 2  # float32's 2.002 is 1.00004e-3 off 2: just past the limit
    assert np.isnan(sums[1, metrics.MAX_ABS]) and np.isnan(sums[2, metrics.MAX_ABS])  # inf - inf is NaN
    np.testing.assert_allclose(sums[0, metrics.MAX_ABS], np.float64(np.float32(2.002)) - 2, rtol=RTOL)


@pytest.mark.parametrize("enough", [False, True], ids=["small", "worth-compiling"])
def test_the_kernel_is_loaded_only_where_the_comparison_pays_for_it(tmp_path, monkeypatch, enough):
    """Loading numba costs ~0.3 s: a comparison of fewer elements than that buys is numpy's."""
    pytest.importorskip("numba")
    loads = []
    monkeypatch.setattr(metrics, "_row_sums_function", lambda: loads.append(1) or metrics._numpy_row_sums)
    monkeypatch.setattr(tensors, "KERNEL_MIN_ELEMENTS", ROWS * WIDTH if enough else ROWS * WIDTH + 1)
    a, b = awkward_pair(np.random.default_rng(3))
    write_minimal(tmp_path / "a.zarr", {"layers.0.out": a})
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": b})
    with open_bundle(tmp_path / "a.zarr") as bundle_a, open_bundle(tmp_path / "b.zarr") as bundle_b:
        compare(bundle_a, bundle_b)
    assert bool(loads) == enough


def test_numpy_stands_in_where_numba_has_no_writable_cache(tmp_path):
    """A read-only installation run by a user without a writable home: numba refuses to define
    the cached kernel (RuntimeError), and compare sums with numpy instead of failing."""
    pytest.importorskip("numba")
    site = tmp_path / "site"
    shutil.copytree(Path(ptrace.__file__).parent, site / "ptrace", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "ptrace" / "compare" / "__pycache__").write_text("")  # no cache directory can be made beside it
    not_a_directory = tmp_path / "home"
    not_a_directory.write_text("")
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(not_a_directory),
           "XDG_CACHE_HOME": str(not_a_directory / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    code = "from ptrace.compare import metrics; print(metrics._row_sums_function() is metrics._numpy_row_sums)"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]



def test_an_integer_tensor_is_compared_by_its_values_not_as_bfloat16_bits(tmp_path):
    a = np.arange(ROWS * WIDTH, dtype=np.uint16).reshape(ROWS, WIDTH) + 1
    write_minimal(tmp_path / "a.zarr", {"layers.0.out": a})
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": a + 2})
    with open_bundle(tmp_path / "a.zarr") as bundle_a, open_bundle(tmp_path / "b.zarr") as bundle_b:
        result = compare(bundle_a, bundle_b).tensors[0]
    assert result.max_abs_err == 2 and result.mean_abs_err == 2
