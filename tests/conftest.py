"""Shared fixtures: the shipped example model, and bundles captured from it with the real
torch backend (once per session: torch is slow to start, the captures are small)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from ptrace import hardware

ROOT = Path(__file__).resolve().parents[1]
#: The committed bundles of the current spec version (tests/data/make_golden.py), and of each
#: older version beside them.
GOLDEN_ROOT = ROOT / "tests" / "data" / "golden"
GOLDEN = GOLDEN_ROOT / "v2"
#: Any Qwen2/Llama-family HF directory can stand in for the example model.
EXAMPLE_MODEL = Path(os.environ.get("PTRACE_TEST_MODEL", ROOT / "examples" / "tiny-qwen2"))

# Skips on the same probes the backends refuse on (ptrace.hardware), with the same reasons: the
# suite passes on any x86-64 machine, and says what it could not check there.
NO_FP8_KV_CACHE = hardware.missing_fp8_kv_cache()
needs_fp8_kv_cache = pytest.mark.skipif(NO_FP8_KV_CACHE is not None, reason=NO_FP8_KV_CACHE or "")
lacks_fp8_kv_cache = pytest.mark.skipif(NO_FP8_KV_CACHE is None, reason="this CPU has an fp8 KV cache")
without_ascend_npu = pytest.mark.skipif(hardware.missing_ascend_npu() is None, reason="an Ascend NPU is present")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``ptrace`` command in a fresh interpreter (exit codes, stderr as users see them)."""
    return subprocess.run([sys.executable, "-m", "ptrace", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


#: A progress line on stderr without a terminal (``ptrace.cli.console``): "[  12.3 s] phase".
PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d s\] ")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error of a command that failed as users should see it fail: a non-zero exit, no
    traceback or warning, and one line on stderr besides the progress lines of work done."""
    assert result.returncode != 0, result.stdout
    for noise in ("Traceback", "Task exception", "Warning", "RecursionError"):
        assert noise not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_sharegpt(path: Path, words: Sequence[int], seed: int = 0) -> Path:
    """A ShareGPT JSON file of one two-turn conversation per entry of ``words`` (its words, about
    2.7 tokens each with the example tokenizer), plus an empty record as real ShareGPT has."""
    rng = random.Random(seed)
    vocabulary = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
    records = [{"id": f"r{i}_0", "conversations": [
        {"from": "human", "value": " ".join(rng.choice(vocabulary) for _ in range(n // 2))},
        {"from": "gpt", "value": " ".join(rng.choice(vocabulary) for _ in range(n - n // 2))}]}
        for i, n in enumerate(words)]
    records.insert(3, {"id": "empty", "conversations": []})
    path.write_text(json.dumps(records, indent=2))
    return path


@pytest.fixture(scope="session")
def example_model() -> Path:
    assert (EXAMPLE_MODEL / "model.safetensors").is_file(), "examples/tiny-qwen2 is missing"
    return EXAMPLE_MODEL


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory: pytest.TempPathFactory, example_model: Path) -> Path:
    """Every canonical tensor of two random prompts of different lengths, float32, greedy."""
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture

    out = tmp_path_factory.mktemp("bundles") / "full.zarr"
    return capture(CaptureConfig(backend="torch", model=example_model, output=out, prompts=("The capital of France is", "Hello, how are you today? I"), command=("test",), sampling=SamplingParams(max_new_tokens=6, seed=42), settings=CaptureSettings(tensors=("*",))))


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, example_model: Path) -> Path:
    """128 random token ids (seed 42) on the reference engine, every canonical tensor."""
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture

    out = tmp_path_factory.mktemp("replays") / "fp32.zarr"
    return capture(CaptureConfig(backend="torch", model=example_model, output=out, random_input_ids=48, num_requests=2, command=("test",), sampling=SamplingParams(seed=42, max_new_tokens=8), settings=CaptureSettings(tensors=("*",))))
