"""``capture`` with the real torch backend, read back through the bundle API."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.bundle_spec.names import all_names
from ptrace.bundle_spec.stats import row_stats
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.errors import BundleExistsError, BundleIncompleteError, UsageError
from ptrace.testing.conformance import Keep
from tests.conftest import ROOT


def test_full_capture_reads_back(full_bundle):
    assert validate_bundle(full_bundle) == []
    with open_bundle(full_bundle) as bundle:
        assert bundle.num_requests == 2
        assert list(bundle.tensor_names) == all_names(bundle.model.num_layers)
        for record in bundle.requests.requests:
            r = record.index
            rows = record.prompt_len + record.output_len - 1
            assert bundle.positions(r).tolist() == list(range(rows))
            assert bundle.tensor(r, "layers.0.out").shape == (rows, bundle.model.config["hidden_size"])
            # No prompt logprobs by default: the LM head ran on the last prompt position only.
            logit_positions = bundle.tensor_positions(r, "logits")
            assert logit_positions.tolist() == list(range(record.prompt_len - 1, rows))
            assert bundle.tensor(r, "logits").shape == (record.output_len, bundle.model.config["vocab_size"])
            assert "requests/prompt_logprobs" not in bundle.manifest.arrays
            np.testing.assert_allclose(bundle.stats(r, "logits"), row_stats(bundle.tensor(r, "logits")),
                                       rtol=1e-5, atol=1e-5)
            logits = bundle.tensor(r, "logits")
            assert bundle.output_ids(r).tolist() == logits.argmax(-1).tolist()
            assert record.output_text and record.prompt
        assert bundle.run.backend == "torch" and bundle.run.dtype == "float32"
        assert bundle.run.seeds == {"python": 42, "numpy": 42, "torch": 42}
        assert bundle.model.fingerprint and len(bundle.model.weights) == 1


def _assert_stats_match_the_float64_reference(stats: np.ndarray, tensor: np.ndarray, name: str) -> None:
    """Extremes and counts exactly; mean, std and mean |x| within float32 rounding of the row's
    scale (the engine computes them in float32, SPEC.md section 6)."""
    reference = row_stats(tensor)
    np.testing.assert_array_equal(stats[:, [0, 1, 5, 6]], reference[:, [0, 1, 5, 6]], err_msg=name)
    finite = np.where(np.isfinite(tensor), tensor, 0).astype(np.float64)
    scale = np.abs(finite.reshape(len(tensor), -1)).max(axis=1, keepdims=True)
    got, expected = stats[:, 2:5], reference[:, 2:5]
    assert ((np.abs(got - expected) <= 1e-6 * scale) | (np.isnan(got) & np.isnan(expected))).all(), name


def test_stats_are_the_float64_reference_within_rounding(full_bundle):
    """Every tensor of a real torch capture: the stats computed inside the engine are the
    SPEC's definition, evaluated in float64 by numpy on the stored tensor."""
    with open_bundle(full_bundle) as bundle:
        for name in bundle.tensor_names:
            _assert_stats_match_the_float64_reference(bundle.stats(0, name), bundle.tensor(0, name), name)


def test_stats_of_finite_and_non_finite_torch_rows_are_the_float64_reference():
    """Both of the engine's paths: a tensor of finite rows, and one whose rows hold a NaN, an
    Inf, or nothing finite (counted, and left out of the other columns, as the reference does)."""
    import torch

    from ptrace.backends.torch_tensor import TorchTensor

    rows = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    _assert_stats_match_the_float64_reference(TorchTensor(rows).row_stats(), rows.numpy(), "finite")
    rows[1, 3], rows[2, 5], rows[4] = float("nan"), float("-inf"), float("inf")
    _assert_stats_match_the_float64_reference(TorchTensor(rows).row_stats(), rows.numpy(), "non-finite")


def test_prompt_logprobs_only_when_asked(tmp_path, example_model, full_bundle):
    """Asked for, prompt logprobs come with the logits of every prompt position, and those
    logits agree with the default capture's where both have them."""
    path = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "p.zarr",
                                 prompts=("The capital of France is", "Hello, how are you today? I"),
                                 sampling=SamplingParams(max_new_tokens=6, seed=42, prompt_logprobs=True),
                                 settings=CaptureSettings(tensors=("layers.0.out", "logits"))))
    assert validate_bundle(path) == []
    with open_bundle(path) as asked, open_bundle(full_bundle) as default:
        prompt_len = asked.requests.requests[0].prompt_len
        assert asked.run.sampling.prompt_logprobs and not default.run.sampling.prompt_logprobs
        assert asked.tensor_positions(0, "logits").tolist() == asked.positions(0).tolist()
        assert "requests/prompt_logprobs" in asked.manifest.arrays
        assert "requests/prompt_logprobs" not in default.manifest.arrays
        np.testing.assert_allclose(asked.tensor(0, "logits")[prompt_len - 1:], default.tensor(0, "logits"),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_engine_tensors_are_stored_bit_exact(tmp_path, example_model, dtype):
    """What the engine produced (seen by an interceptor) is what the bundle gives back."""
    keep = Keep({"layers.1.out", "layers.1.k", "logits"})
    path = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "b.zarr", dtype=dtype, random_input_ids=9, sampling=SamplingParams(max_new_tokens=3), settings=CaptureSettings(tensors=("layers.1.out", "layers.1.k", "logits"))), interceptors=[keep])
    with open_bundle(path) as bundle:
        for name in ("layers.1.out", "layers.1.k", "logits"):
            stored = bundle.tensor(0, name)
            assert stored.dtype.name == dtype
            assert stored.tobytes() == keep.rows(name, 0).tobytes(), name


def test_seed_document_random_input(tmp_path, example_model):
    path = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "b.zarr", random_input_ids=128, sampling=SamplingParams(seed=42, max_new_tokens=2), settings=CaptureSettings(mode="stats")))
    np.random.seed(42)
    expected = np.random.randint(100, 2000, size=(1, 128))
    with open_bundle(path) as bundle:
        assert bundle.prompt_ids(0).tolist() == expected[0].tolist()
        assert bundle.requests.requests[0].prompt is None


def test_stats_mode_and_step_selection(tmp_path, example_model, full_bundle):
    path = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "s.zarr", prompts=("The capital of France is", "Hello, how are you today? I"), sampling=SamplingParams(max_new_tokens=6, seed=42), settings=CaptureSettings(mode="stats", steps="0,3-4")))
    assert validate_bundle(path) == []
    with open_bundle(path) as stats, open_bundle(full_bundle) as full:
        prompt_len = stats.requests.requests[0].prompt_len
        positions = stats.positions(0)
        assert positions.tolist() == [*range(prompt_len), prompt_len + 2, prompt_len + 3]
        assert not stats.has_tensor(0, "logits")
        reference = row_stats(full.tensor(0, "layers.2.out")[positions])
        np.testing.assert_allclose(stats.stats(0, "layers.2.out"), reference, rtol=1e-4, atol=1e-5)
        assert stats.output_ids(0).tolist() == full.output_ids(0).tolist()


def test_capture_refuses_existing_output_before_running(tmp_path, example_model, full_bundle):
    config = CaptureConfig(backend="torch", model=example_model, output=full_bundle, random_input_ids=4)
    with pytest.raises(BundleExistsError):
        capture(config)


def test_bad_options_are_usage_errors(tmp_path, example_model):
    base = dict(backend="torch", model=example_model, output=tmp_path / "x.zarr")
    with pytest.raises(UsageError, match="matches no canonical tensor"):
        capture(CaptureConfig(**base, random_input_ids=4, settings=CaptureSettings(tensors=("layers.*.nonsense",))))
    with pytest.raises(UsageError, match="exactly one input source"):
        capture(CaptureConfig(**base, random_input_ids=4, prompts=("hi",)))
    with pytest.raises(UsageError, match="--steps"):
        capture(CaptureConfig(**base, random_input_ids=4, settings=CaptureSettings(steps="3-1")))
    with pytest.raises(UsageError, match="no step selected"):
        capture(CaptureConfig(**base, random_input_ids=4, sampling=SamplingParams(max_new_tokens=2), settings=CaptureSettings(steps="5-")))
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def test_killed_capture_never_reads_as_complete(tmp_path, example_model):
    out = tmp_path / "killed.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "ptrace", "capture", "-b", "torch", "-m", str(example_model),
         "--random-input-ids", "64", "--max-new-tokens", "100000", "-t", "*", "-o", str(out)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed.zarr.partial"
    deadline = time.monotonic() + 120
    while not (partial / "stats").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # well into writing tensors
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (partial / "stats").exists(), "the capture never started writing"
    assert not out.exists()
    with pytest.raises(BundleIncompleteError):
        open_bundle(partial)
    from tests.conftest import run_cli

    result = run_cli("validate", partial)
    assert result.returncode != 0 and "incomplete" in result.stderr
