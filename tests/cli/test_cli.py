"""The CLI as users meet it: teaching help, one-line errors, no tracebacks, fast start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ptrace.backends.base import Backend
from ptrace.backends.registry import _registered, register_backend
from ptrace.cli import main
from tests.conftest import ROOT, one_line_error, run_cli


def test_help_teaches_and_starts_without_engines():
    result = run_cli("capture", "--help")
    assert result.returncode == 0
    for option in ("--backend", "--random-input-ids", "--tensors", "--steps", "--mode"):
        assert option in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, ptrace.cli; "
                            "print(sorted(m for m in ('torch', 'transformers', 'zarr') if m in sys.modules))"],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == "[]", "the CLI must not import engines or zarr at start-up"


def test_missing_model(tmp_path):
    line = one_line_error(run_cli("capture", "-b", "torch", "-m", tmp_path / "nope",
                                   "--random-input-ids", "4", "-o", tmp_path / "b.zarr"))
    assert "does not exist" in line


def test_malformed_model_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    line = one_line_error(run_cli("capture", "-b", "torch", "-m", tmp_path / "m",
                                   "--random-input-ids", "4", "-o", tmp_path / "b.zarr"))
    assert "not valid JSON" in line
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    line = one_line_error(run_cli("capture", "-b", "torch", "-m", tmp_path / "m",
                                   "--random-input-ids", "4", "-o", tmp_path / "b.zarr"))
    assert "no weight files" in line


def test_unknown_backend_lists_known_ones(tmp_path, example_model):
    line = one_line_error(run_cli("capture", "-b", "tensorrt", "-m", example_model,
                                   "--random-input-ids", "4", "-o", tmp_path / "b.zarr"))
    assert "unknown backend 'tensorrt'" in line and "torch" in line


def test_existing_output_needs_overwrite(tmp_path, example_model, full_bundle):
    line = one_line_error(run_cli("capture", "-b", "torch", "-m", example_model,
                                   "--random-input-ids", "4", "-o", full_bundle))
    assert "already exists" in line and "--overwrite" in line


class _NotInstalled(Backend):
    name = "not-installed-engine"
    requires = ("ptrace_engine_that_is_not_installed",)

    @classmethod
    def install_hint(cls) -> str:
        return "install it with: pip install 'ptrace-llm[imaginary]'"


@pytest.fixture
def not_installed_backend():
    register_backend(_NotInstalled)
    yield _NotInstalled.name
    _registered.pop(_NotInstalled.name)


def test_engine_not_installed_says_how_to_install(tmp_path, example_model, not_installed_backend, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["capture", "-b", not_installed_backend, "-m", str(example_model),
              "--random-input-ids", "4", "-o", str(tmp_path / "b.zarr")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "not installed" in err and "pip install 'ptrace-llm[imaginary]'" in err
    main_backends = run_cli("backends", "--json")
    assert any(row["name"] == "torch" and row["available"] for row in json.loads(main_backends.stdout))


def test_inspect_shows_the_run(full_bundle):
    result = run_cli("inspect", full_bundle)
    assert result.returncode == 0, result.stderr
    for expected in ("Qwen2ForCausalLM", "torch", "float32", "layers.3.out", "logits", "The capital"):
        assert expected in result.stdout
    info = json.loads(run_cli("inspect", full_bundle, "--json").stdout)
    assert info["run"]["backend"] == "torch" and len(info["requests"]) == 2
    assert {t["name"] for t in info["tensors"]} >= {"embed", "layers.0.q", "logits"}


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path / "missing.zarr")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_usage_error_exits_2_with_usage():
    result = run_cli("capture")
    assert result.returncode == 2 and "Missing option '--backend'" in result.stderr
    assert "Traceback" not in result.stderr
