"""``replay`` with the real torch backend: same setup agrees, bfloat16 drifts, a planted
difference is found in its layer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.errors import ModelMismatchError
from ptrace.replay.plan import FREE, TEACHER, ReplayConfig
from ptrace.replay.session import replay
from tests.conftest import run_cli
from tests.replay.agreement import assert_compare_agrees


def test_same_engine_same_dtype_agrees_everywhere(fp32_bundle, tmp_path):
    result = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", output=tmp_path / "r"))
    assert set(result.bundles) == {TEACHER, FREE}
    for path in result.bundles.values():
        assert validate_bundle(path) == []
    c = result.primary
    assert c.verdict == "pass", c.summary
    assert c.token_match_rate == 1.0 and c.first_divergent_step is None
    assert c.first_divergent_tensor is None
    assert all(t.verdict == "pass" and t.cos_sim > 0.99999 for t in c.tensors)
    assert len(c.tensors) == len(open_bundle(fp32_bundle).tensor_names)
    with open_bundle(result.bundles[TEACHER]) as teacher:
        assert teacher.replay_info()["mode"] == TEACHER
        assert teacher.input_ids(0) is not None
    assert_compare_agrees(result)


def test_replay_records_the_sources_capture_settings_and_sampling_whole(example_model, tmp_path):
    """Every field of run.capture and run.sampling, set to a non-default value, comes back
    unchanged in the replay: a new setting cannot be forgotten on the way."""
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture

    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=11, max_new_tokens=3,
                              ignore_eos=True, logprobs=4, prompt_logprobs=True)
    settings = CaptureSettings(tensors=("layers.1.*", "logits"), steps="0-1", mode="stats", per_rank=True)
    defaults = (SamplingParams(), CaptureSettings())
    assert all(getattr(doc, f) != getattr(default, f) for doc, default in zip((sampling, settings), defaults)
               for f in type(doc).__dataclass_fields__ if f != "ignore_eos"), "every field must be non-default"
    source = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "s.zarr",
                                   random_input_ids=6, sampling=sampling, settings=settings, command=("t",)))
    result = replay(ReplayConfig(bundle=source, backend="torch", output=tmp_path / "r"))
    for path in result.bundles.values():
        with open_bundle(path) as replayed:
            assert replayed.run.capture == settings and replayed.run.sampling == sampling


def test_a_torch_bfloat16_replay_of_a_torch_capture_is_not_calibrated_against_itself(fp32_bundle, tmp_path):
    """The trusted engine would be the replay itself (torch, bfloat16, cpu): an independent
    engine calibrates it where one runs here (vLLM), else the verdict says it was not
    independently calibrated; never a ratio of 1 by construction."""
    result = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", dtype="bfloat16", output=tmp_path / "r"))
    c = result.primary
    if c.calibration is not None:
        assert c.calibration.backend != "torch" and c.calibration.dtype == "bfloat16", c.summary
        assert not all(t.ratio_mean == 1 for t in c.calibration.tensors if t.rel_err > 0)
        assert all(t.ratio_max >= t.ratio_mean for t in c.calibration.tensors)
        assert c.verdict in ("pass", "warn") and "is what bfloat16 explains" in c.summary, c.summary
    else:
        assert "not independently calibrated" in c.summary and "not independently calibrated" in c.calibration_note
        assert json.loads(json.dumps(c.to_dict()))["calibration_note"] == c.calibration_note
    assert_compare_agrees(result)
    with open_bundle(result.bundles[TEACHER]) as teacher:
        info = teacher.replay_info()
        assert bool(info["calibration_path"]) == (c.calibration is not None)
        assert info["thresholds"]["pass_mean_abs"] == 1e-2, "bfloat16's limits"


def test_bfloat16_replay_drifts_within_rounding_noise(fp32_bundle, tmp_path):
    c = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", dtype="bfloat16", output=tmp_path / "r",
                            calibrate=False)).primary
    # large for float32's limits, but within bfloat16's noise floor: rounding, every tensor passes
    # (a token flip between near-tied tokens may warn)
    assert c.thresholds_dtype == "bfloat16" and all(t.verdict == "pass" for t in c.tensors), c.summary
    assert c.verdict == "pass" or (c.verdict == "warn" and "near-tie" in c.summary), c.summary
    assert c.first_divergent_tensor is None, c.summary
    assert all(0 < max(t.position_rel) <= t.noise_floor for t in c.tensors), "every tensor rounds, none diverges"
    assert all(t.first_fail_position is None for t in c.tensors), "no failing row names a failing position"
    assert "within rounding noise" in c.summary and "not calibrated (--no-calibrate)" in c.summary, c.summary
    assert "bit-identical" not in c.summary
    errors = {t.name: t.mean_abs_err for t in c.tensors}
    assert errors["layers.3.out"] > errors["layers.0.out"] > 0, "errors grow through the layers"
    assert all(0 < t.cos_sim < 1 for t in c.tensors if t.name.endswith(".out"))
    assert all(r.kl and max(r.kl) > 0 for r in c.requests)


@pytest.fixture(scope="module")
def perturbed_model(tmp_path_factory, example_model):
    """A copy of the example model with one weight matrix of layer 2 perturbed."""
    target = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(example_model, target)
    weights = load_file(target / "model.safetensors")
    key = "model.layers.2.mlp.down_proj.weight"
    rng = np.random.default_rng(0)
    weights[key] = (weights[key] + rng.standard_normal(weights[key].shape) * 0.5 * np.abs(weights[key]).mean()
                    ).astype(weights[key].dtype)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_planted_difference_is_localized_to_its_layer(fp32_bundle, perturbed_model, tmp_path):
    with pytest.raises(ModelMismatchError, match="--allow-model-mismatch"):
        replay(ReplayConfig(bundle=fp32_bundle, backend="torch", model=perturbed_model, output=tmp_path / "x"))
    result = replay(ReplayConfig(bundle=fp32_bundle, backend="torch", model=perturbed_model,
                                 allow_model_mismatch=True, modes=(TEACHER,), output=tmp_path / "r"))
    c = result.primary
    assert c.first_divergent_tensor == "layers.2.mlp", c.summary
    assert c.largest_local_error == "layers.2.mlp"
    verdicts = {t.name: t.verdict for t in c.tensors}
    assert all(verdicts[f"layers.{i}.out"] == "pass" for i in (0, 1)) and verdicts["layers.2.out"] != "pass"
    with open_bundle(result.bundles[TEACHER]) as replayed:
        assert replayed.replay_info()["model_mismatch"] is True


def test_cli_replay_writes_report_and_json_and_gates(fp32_bundle, tmp_path):
    report, out = tmp_path / "report.html", tmp_path / "result.json"
    result = run_cli("replay", fp32_bundle, "-b", "torch", "--dtype", "bfloat16", "-o", tmp_path / "r",
                     "--report", report, "--json", out, "--fail-on", "fail", "--no-calibrate")
    data = json.loads(out.read_text())
    assert result.returncode == (1 if data["verdict"] == "fail" else 0), result.stderr
    assert data["verdict"] in ("pass", "warn") and 0 <= data["token_match_rate"] <= 1
    assert all(t["verdict"] == "pass" for t in data["tensors"]), "bfloat16 rounding, bfloat16's limits"
    assert data["first_divergent_step"] is None or isinstance(data["first_divergent_step"], int)
    assert data["first_divergent_tensor"] is None  # bfloat16 rounding is no divergence
    assert {"name", "verdict", "max_abs_err", "mean_abs_err", "cos_sim", "rel_err", "noise_floor"} <= set(data["tensors"][0])
    assert report.is_file() and "within rounding noise" in report.read_text()
