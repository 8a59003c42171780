"""Engine environments: where they are, what a missing one says, and errors crossing back intact."""

from __future__ import annotations

import json

import pytest

import ptrace
from ptrace.backends import environments
from ptrace.backends.registry import engine_environment, engine_environments
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams
from ptrace.errors import UnknownBackendError
from tests.conftest import one_line_error, run_cli


def test_location_follows_the_documented_order(tmp_path, monkeypatch):
    monkeypatch.delenv("PTRACE_ENV_VLLM", raising=False)
    monkeypatch.setenv("PTRACE_ENVS_DIR", str(tmp_path))
    assert environments.location("vllm") == tmp_path / "vllm"
    assert environments.python_of("vllm") is None
    (tmp_path / "own" / "bin").mkdir(parents=True)
    (tmp_path / "own" / "bin" / "python").write_text("")
    monkeypatch.setenv("PTRACE_ENV_VLLM", str(tmp_path / "own"))
    assert environments.python_of("vllm") == tmp_path / "own" / "bin" / "python"
    with pytest.raises(UnknownBackendError):
        engine_environment("tensorrt")


def test_missing_environment_says_how_to_create_it(tmp_path, example_model):
    result = run_cli("capture", "-b", "vllm", "-m", example_model, "--random-input-ids", "4",
                     "-o", tmp_path / "b.zarr", env={"PTRACE_ENVS_DIR": str(tmp_path / "none")})
    line = one_line_error(result)
    assert "ptrace envs create vllm" in line and str(tmp_path / "none" / "vllm") in line
    assert not (tmp_path / "b.zarr").exists()


def test_envs_list_reports_each_environment(tmp_path):
    result = run_cli("envs", "list", "--json", env={"PTRACE_ENVS_DIR": str(tmp_path)})
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(engine_environments()) == {"vllm", "ms", "vllm-ms"}
    assert all(row["python"] is None and row["path"].startswith(str(tmp_path)) for row in rows.values())


def test_an_installed_ptrace_is_required_by_its_distribution_name(monkeypatch):
    """Outside a source checkout an engine environment gets ptrace from the package index, where
    the distribution is ptrace-llm (``ptrace`` there is an unrelated project)."""
    assert environments._ptrace_requirement() == ["-e", str(environments.source_checkout())]
    monkeypatch.setattr(environments, "source_checkout", lambda: None)
    assert environments._ptrace_requirement() == [f"ptrace-llm=={ptrace.__version__}"]


def test_capture_config_crosses_as_json():
    config = CaptureConfig(backend="vllm", model="m", output="o.zarr", prompt_token_ids=((1, 2), (3,)),
                           sampling=SamplingParams(temperature=0.5, seed=3),
                           settings=CaptureSettings(tensors=("layers.*.k",), steps="0-2", mode="stats"),
                           forced_tokens=((4,), (5,)), engine_options={"block_size": "16"}, command=("x",))
    assert CaptureConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.skipif(environments.python_of("vllm") is None, reason="no vllm environment (make setup)")
def test_an_engine_error_crosses_back_as_one_line(tmp_path, example_model):
    result = run_cli("capture", "-b", "vllm", "-m", example_model, "--random-input-ids", "4",
                     "--max-new-tokens", "1", "--steps", "5-", "-o", tmp_path / "b.zarr")
    assert result.returncode == 2  # a UsageError, raised after the run in the vllm environment, keeps its class
    assert "no step selected by --steps was run" in one_line_error(result)
    assert not (tmp_path / "b.zarr").exists()
