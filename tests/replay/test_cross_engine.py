"""Captures on one engine replayed on another, with the real engines in their own environments.

These run from the main environment: vLLM and MindSpore run in ``.venvs/vllm`` and ``.venvs/ms``
(``make setup`` creates them), through ptrace's delegation. Without those environments the tests
skip, unless ``PTRACE_REQUIRE_ENGINES=1`` (``make test`` sets it), where they fail instead.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from ptrace.backends.environments import python_of
from ptrace.bundle_spec import open_bundle
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.replay.plan import ReplayConfig
from ptrace.replay.session import replay
from ptrace.reports.html import write_report
from tests.conftest import needs_fp8_kv_cache
from tests.replay.agreement import assert_compare_agrees


def _needs(environment: str):
    missing = python_of(environment) is None
    if missing and os.environ.get("PTRACE_REQUIRE_ENGINES") == "1":
        pytest.fail(f"engine environment {environment!r} is missing (make setup creates it)")
    return pytest.mark.skipif(missing, reason=f"no {environment} environment (make setup creates it)")


vllm_env = _needs("vllm")
ms_env = _needs("ms")

#: Four prompts of different lengths in one batch.
BATCH = ("The capital of France is", "Hello, how are you today? I hope", "Write a short poem about the sea and the sky, please:",
         "Q: What is 2 + 2?\nA:")


def assert_fp32_agreement(source, replayed_with, tmp_path, **options):
    result = replay(ReplayConfig(bundle=source, backend=replayed_with, output=tmp_path / "r", **options))
    c = result.primary
    assert c.verdict == "pass", c.summary
    assert c.token_match_rate == 1.0 and c.first_divergent_step is None
    with open_bundle(source) as bundle:
        assert {t.name for t in c.tensors} == set(bundle.tensor_names)
    for tensor in c.tensors:
        assert tensor.min_cos_sim > 0.99999, (tensor.name, tensor.min_cos_sim)
    assert_compare_agrees(result)
    return result


@pytest.fixture(scope="module")
def vllm_batch(tmp_path_factory, example_model):
    """Four prompts of different lengths captured on vLLM in one engine call, every tensor."""
    out = tmp_path_factory.mktemp("vllm") / "batch.zarr"
    return capture(CaptureConfig(backend="vllm", model=example_model, output=out, prompts=BATCH, command=("test",), sampling=SamplingParams(max_new_tokens=6, seed=1), settings=CaptureSettings(tensors=("*",))))


@vllm_env
def test_torch_capture_replays_on_vllm_in_float32(fp32_bundle, tmp_path):
    assert_fp32_agreement(fp32_bundle, "vllm", tmp_path)


@vllm_env
def test_vllm_capture_replays_on_torch_and_lines_up_per_request(vllm_batch, tmp_path):
    result = assert_fp32_agreement(vllm_batch, "torch", tmp_path)
    with open_bundle(vllm_batch) as source, open_bundle(result.bundles["teacher-forced"]) as replayed:
        assert source.run.backend == "vllm" and source.num_requests == 4
        lengths = {source.prompt_ids(r).shape[0] for r in range(4)}
        assert len(lengths) == 4, "the prompts have different lengths"
        for r in range(4):
            positions = source.positions(r)
            assert positions.tolist() == list(range(source.prompt_ids(r).shape[0] + 5))
            assert replayed.positions(r).tolist() == positions.tolist()
            a, b = source.tensor(r, "layers.3.out"), replayed.tensor(r, "layers.3.out")
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    assert [r.token_match_rate for r in result.primary.requests] == [1.0] * 4


@vllm_env
def test_vllm_chunked_prefill_replay_agrees(vllm_batch, tmp_path):
    """The same batch with 8-token prefill chunks: rows reassemble into the same positions."""
    assert_fp32_agreement(vllm_batch, "vllm", tmp_path, engine_options={"max_num_batched_tokens": "8"})


@vllm_env
def test_vllm_bfloat16_replay_gives_a_sensible_report_and_compare_agrees(fp32_bundle, tmp_path):
    result = replay(ReplayConfig(bundle=fp32_bundle, backend="vllm", dtype="bfloat16", output=tmp_path / "r"))
    c = result.primary
    assert c.token_match_rate > 0.5, "bfloat16 keeps most greedy tokens of a peaked model"
    assert c.calibration is not None and c.calibration.backend == "torch" and c.calibration.dtype == "bfloat16"
    assert c.calibration.within and "is what bfloat16 explains" in c.summary, c.summary
    assert all(t.ratio_max >= t.ratio_mean for t in c.calibration.tensors)
    assert c.first_divergent_tensor is None
    assert_compare_agrees(result)
    errors = {t.name: t.mean_abs_err for t in c.tensors}
    assert errors["layers.3.out"] > errors["layers.0.out"] > 0, "errors grow through the layers"
    report = write_report(c, tmp_path / "report.html")
    html = report.read_text()
    assert "vllm" in html and "bfloat16" in html and "is what bfloat16 explains" in html


@ms_env
def test_ms_capture_replays_on_torch_in_float32(tmp_path, example_model):
    source = capture(CaptureConfig(backend="ms", model=example_model, output=tmp_path / "ms.zarr", random_input_ids=32, num_requests=2, command=("test",), sampling=SamplingParams(seed=42, max_new_tokens=6), settings=CaptureSettings(tensors=("*",))))
    with open_bundle(source) as bundle:
        assert bundle.run.backend == "ms" and bundle.run.engine["mode"] == "PYNATIVE_MODE"
    assert_fp32_agreement(source, "torch", tmp_path)


@ms_env
def test_torch_capture_replays_on_ms_in_float32(fp32_bundle, tmp_path):
    assert_fp32_agreement(fp32_bundle, "ms", tmp_path)


@ms_env
def test_ms_float16_replay_differs_measurably_and_locally(fp32_bundle, tmp_path):
    c = replay(ReplayConfig(bundle=fp32_bundle, backend="ms", dtype="float16", output=tmp_path / "r",
                            calibrate=False)).primary
    assert c.first_divergent_tensor is None, "float16 rounding is no divergence: " + c.summary
    outs = [t for t in c.tensors if t.name.endswith(".out")]
    assert all(1e-7 < t.mean_abs_err and 0.999 < t.min_cos_sim < 1 for t in outs), "measurable, not broken"
    errors = {t.name: t.mean_abs_err for t in c.tensors}
    assert errors["layers.3.out"] > errors["layers.0.out"], "errors grow through the layers"


@vllm_env
@needs_fp8_kv_cache
def test_fp8_kv_cache_replay_is_recorded_and_localized_to_attention(fp32_bundle, tmp_path):
    """A common cause of long-sequence drift: an fp8 KV cache leaves k as computed (it is
    captured before it is stored) and first shows in the attention output that reads the cache."""
    result = replay(ReplayConfig(bundle=fp32_bundle, backend="vllm", output=tmp_path / "r",
                                 engine_options={"kv_cache_dtype": "fp8"}, modes=("teacher-forced",)))
    with open_bundle(result.bundles["teacher-forced"]) as replayed:
        assert replayed.run.engine["kv_cache_dtype"] == "fp8"
        assert replayed.run.engine_options == {"kv_cache_dtype": "fp8"}
    tensors = {t.name: t for t in result.primary.tensors}
    assert tensors["layers.0.k"].verdict == "pass" and tensors["layers.0.v"].verdict == "pass"
    assert tensors["layers.0.attn"].min_cos_sim < 0.9999 < tensors["layers.0.k"].min_cos_sim
    assert result.primary.first_divergent_tensor == "layers.0.attn", result.primary.summary
