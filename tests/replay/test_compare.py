"""``compare`` reads two bundles and needs no engine at all."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ptrace.replay.metrics import kl_full, kl_topk, log_softmax, row_errors
from ptrace.replay.thresholds import Thresholds
from tests.conftest import ROOT

BLOCK_ENGINES = """
import sys
class NoEngines:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'vllm', 'mindspore'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, NoEngines())
from ptrace.cli import main
main(sys.argv[1:])
"""


def test_compare_runs_with_no_engine_installed(fp32_bundle, tmp_path):
    from ptrace.replay.session import TEACHER, ReplayConfig, replay

    other = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", dtype="bfloat16", modes=(TEACHER,),
                                output=tmp_path / "r")).bundles[TEACHER]
    out = tmp_path / "c.json"
    result = subprocess.run([sys.executable, "-c", BLOCK_ENGINES, "compare", str(fp32_bundle), str(other),
                             "--json", str(out), "--report", str(tmp_path / "c.html")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["verdict"] in ("warn", "fail") and data["first_divergent_tensor"]
    assert (tmp_path / "c.html").stat().st_size > 1000


def test_compare_refuses_bundles_of_different_inputs(fp32_bundle, full_bundle):
    from tests.conftest import run_cli

    result = run_cli("compare", fp32_bundle, full_bundle)
    assert result.returncode != 0 and "cannot compare" in result.stderr and "Traceback" not in result.stderr


def test_row_errors_match_the_seed_documents_formulas():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 64))
    b = a + rng.standard_normal((3, 64)) * 1e-3
    errors = row_errors(a.astype(np.float32), b.astype(np.float32))
    x, y = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(errors.mean_abs, np.abs(x - y).mean(1))
    np.testing.assert_allclose(errors.mean_rel, (np.abs(x - y) / (np.abs(x) + 1e-8)).mean(1))
    np.testing.assert_allclose(errors.cos, (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
    assert (row_errors(a, a).cos == 1).all() and (row_errors(a, a).max_abs == 0).all()


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(1)
    la, lb = rng.standard_normal((4, 50)) * 3, rng.standard_normal((4, 50)) * 3
    exact = kl_full(la, lb)
    pa, pb = log_softmax(la), log_softmax(lb)
    order_a, order_b = np.argsort(-pa, 1), np.argsort(-pb, 1)
    full = kl_topk(order_a, np.take_along_axis(pa, order_a, 1), order_b, np.take_along_axis(pb, order_b, 1))
    np.testing.assert_allclose(full, exact, rtol=1e-9)
    k = 10
    approx = kl_topk(order_a[:, :k], np.take_along_axis(pa, order_a, 1)[:, :k],
                     order_b[:, :k], np.take_along_axis(pb, order_b, 1)[:, :k])
    assert (approx >= 0).all() and np.isfinite(approx).all()


@pytest.mark.parametrize(("mean_abs", "cos", "expected"), [(1e-5, 0.9999, "pass"), (1e-3, 0.9999, "warn"),
                                                           (1e-5, 0.995, "warn"), (0.5, 0.5, "fail")])
def test_thresholds(mean_abs, cos, expected):
    assert Thresholds(1e-4, 0.999, 1e-2, 0.99).verdict(mean_abs, cos) == expected


def test_stats_only_bundles_are_compared_by_their_statistics(example_model, tmp_path):
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
    from ptrace.replay.session import ReplayConfig, replay

    source = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "s.zarr", random_input_ids=16, command=("t",), sampling=SamplingParams(max_new_tokens=4), settings=CaptureSettings(mode="stats")))
    same = replay(ReplayConfig(bundle=source, backend="torch", output=tmp_path / "same")).primary
    assert same.verdict == "pass" and all(t.stats_only for t in same.tensors)
    drift = replay(ReplayConfig(bundle=source, backend="torch", dtype="bfloat16", output=tmp_path / "bf16")).primary
    assert drift.verdict != "pass" and any(t.verdict != "pass" for t in drift.tensors), drift.summary
    assert all(r.kl_source.startswith("top-") for r in drift.requests)
