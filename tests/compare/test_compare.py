"""``compare`` reads two bundles and needs no engine at all."""

from __future__ import annotations

import json
import subprocess
import sys

from ptrace.bundle_spec import open_bundle
from ptrace.compare import combine, compare
from ptrace.testing.bundles import SyntheticRequest, write_bundle
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


def test_compare_runs_with_no_engine_installed_and_judges_a_replay_as_replay_did(fp32_bundle, tmp_path):
    """``compare`` on a bfloat16 replay and its source: no engine, and the replay's own verdict
    (its recorded calibration, or its "not independently calibrated" note, and limits)."""
    from ptrace.replay.plan import TEACHER, ReplayConfig
    from ptrace.replay.session import replay

    replayed = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", dtype="bfloat16", modes=(TEACHER,),
                                   output=tmp_path / "r"))
    out = tmp_path / "c.json"
    result = subprocess.run([sys.executable, "-c", BLOCK_ENGINES, "compare", str(fp32_bundle),
                             str(replayed.bundles[TEACHER]), "--json", str(out), "--report", str(tmp_path / "c.html")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["verdict"] == replayed.primary.verdict and data["summary"] == replayed.primary.summary, data["summary"]
    assert (data["calibration"] is None) == (replayed.primary.calibration is None)
    assert data["first_divergent_tensor"] is None, "bfloat16 rounding is no divergence"
    assert (tmp_path / "c.html").stat().st_size > 1000


def test_a_bfloat16_pair_without_calibration_is_judged_by_bfloat16_s_limits(fp32_bundle, tmp_path):
    """No calibration recorded or given: the limits follow the coarser dtype, and a verdict never
    fails what it calls rounding noise."""
    from ptrace.replay.plan import TEACHER, ReplayConfig
    from ptrace.replay.session import replay

    other = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", dtype="bfloat16", modes=(TEACHER,),
                                calibrate=False, output=tmp_path / "r")).bundles[TEACHER]
    with open_bundle(fp32_bundle) as a, open_bundle(other) as b:
        from ptrace.compare.judgment import judge

        c = judge(a, b)
    assert c.thresholds_dtype == "bfloat16" and c.thresholds["pass_mean_abs"] == 1e-2
    assert "not calibrated" in c.calibration_note and "bfloat16's noise floor and limits" in c.summary
    assert not (c.verdict == "fail" and "within rounding noise" in c.summary), c.summary


def test_compare_refuses_bundles_of_different_inputs(fp32_bundle, full_bundle):
    from tests.conftest import run_cli

    result = run_cli("compare", fp32_bundle, full_bundle)
    assert result.returncode == 2 and "cannot compare" in result.stderr and "Traceback" not in result.stderr


def test_stats_only_bundles_are_compared_by_their_statistics(example_model, tmp_path):
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
    from ptrace.replay.plan import ReplayConfig
    from ptrace.replay.session import replay

    source = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "s.zarr", random_input_ids=16, command=("t",), sampling=SamplingParams(max_new_tokens=4), settings=CaptureSettings(mode="stats")))
    same = replay(ReplayConfig(bundle=source, backend="torch", output=tmp_path / "same")).primary
    assert same.verdict == "pass" and all(t.stats_only for t in same.tensors)
    assert "bit-identical" not in same.summary and "statistics only" in same.summary, same.summary
    drift = replay(ReplayConfig(bundle=source, backend="torch", dtype="bfloat16", output=tmp_path / "bf16",
                                calibrate=False)).primary
    assert "bit-identical" not in drift.summary and "statistics only" in drift.summary, drift.summary
    assert drift.verdict == "pass" and "within rounding noise" in drift.summary, drift.summary
    assert all(0 < t.rel_err and max(t.position_rel) <= t.noise_floor for t in drift.tensors), "rounding, in units of the floor"
    assert all(r.kl_source.startswith("top-") for r in drift.requests)


def test_combine_takes_tensors_from_one_run_and_tokens_with_their_texts_from_the_other(tmp_path):
    prompt, outputs, flipped = (1, 2, 3), (4, 5, 6, 7), (4, 9, 9, 9)
    source = write_bundle(tmp_path / "a.zarr", [SyntheticRequest(prompt, outputs)])
    # fed the source's tokens, the teacher-forced run flips at step 1 only; the free run goes its own way
    forced = write_bundle(tmp_path / "t.zarr", [SyntheticRequest(prompt, (4, 9, 6, 7), fed=outputs[:-1])],
                          noise=0.01)
    free = write_bundle(tmp_path / "f.zarr", [SyntheticRequest(prompt, flipped)])
    with open_bundle(source) as a, open_bundle(forced) as t, open_bundle(free) as f:
        tensors, tokens = compare(a, t), compare(a, f)
    c = combine(tensors=tensors, tokens=tokens)
    assert c.tensors == tensors.tensors
    assert [(r.tokens_b, r.first_divergent_step) for r in c.requests] == \
        [(r.tokens_b, r.first_divergent_step) for r in tokens.requests]
    assert [r.first_divergent_tensor for r in c.requests] == [r.first_divergent_tensor for r in tensors.requests]
    assert c.b["path"] == str(forced) and c.b["token_run_path"] == str(free)
    assert c.b["output_tokens"] == [["t4", "t9", "t9", "t9"]] == tokens.b["output_tokens"]
    assert c.first_divergent_step == 1 and c.summary.startswith(c.verdict.upper())
