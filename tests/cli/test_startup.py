"""``ptrace --help`` and ``ptrace compare`` start fast because they import only what they use.

Start-up time itself is measured by the benchmark (``benchmarks/bench_msprobe.py`` prints it):
a timed test would be flaky on a loaded machine. What makes the time, and what a test can check
exactly, is which modules the real command loads: no engine ever, for help not even the
array stack (numpy, zarr) or the report's (jinja2, matplotlib), and for compare of ptrace's own
bundles not zarr (they are read without it) nor ml_dtypes (up to a second to import; bfloat16
is decoded with numpy). ``benchmarks/bench_startup.py`` holds each import to a time budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.conftest import ROOT

#: Engines, and the backend modules that wrap them: compare and help never need one.
ENGINES = ("torch", "transformers", "vllm", "mindspore", "mindformers",
           "ptrace.backends.torch_hf", "ptrace.backends.vllm", "ptrace.backends.mindformers")
#: The array stack and the report's stack: help needs neither.
ARRAYS = ("numpy", "zarr", "numcodecs", "ml_dtypes")
REPORT = ("jinja2", "matplotlib", "ptrace.reports")
#: The compiled compare kernel: ~0.3 s to load, paid only by a comparison big enough to gain it.
KERNEL = ("numba", "llvmlite", "ptrace.compare.kernel")

# Runs the real command (``python -m ptrace ARGS``) and writes the modules it loaded to a file:
# stdout belongs to the command.
_PROBE = """
import json, runpy, sys
out, sys.argv = sys.argv[1], ["ptrace", *sys.argv[2:]]
try:
    runpy.run_module("ptrace", run_name="__main__")
except SystemExit as exit:
    code = exit.code
open(out, "w").write(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded(tmp_path: Path, *args: str) -> set[str]:
    out = tmp_path / "modules.json"
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(out), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(out.read_text())
    assert result["code"] in (0, None), probe.stdout + probe.stderr
    return set(result["modules"])


def _among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == name or m.startswith(name + ".") for name in names))


@pytest.mark.parametrize("args", [("--help",), ("compare", "--help")])
def test_help_loads_no_engine_and_no_array_or_report_stack(tmp_path, args):
    loaded = _loaded(tmp_path, *args)
    assert "typer" in loaded  # the probe did run the command
    assert _among(loaded, ENGINES + ARRAYS + REPORT + KERNEL) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compare_of_small_bundles_loads_no_engine_no_report_stack_no_kernel_and_no_ml_dtypes(tmp_path, dtype):
    request = [SyntheticRequest(prompt=(1, 2, 3, 4), outputs=(5, 6, 7))]
    a = write_bundle(tmp_path / "a.zarr", request)
    b = write_bundle(tmp_path / "b.zarr", request, dtype=dtype, noise=0.01)
    loaded = _loaded(tmp_path, "compare", str(a), str(b), "--json", str(tmp_path / "c.json"))
    assert "ptrace.compare" in loaded and (tmp_path / "c.json").stat().st_size  # the comparison did run
    assert _among(loaded, ENGINES + REPORT + KERNEL + ("zarr", "ml_dtypes")) == []


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_inspect_and_validate_of_a_bfloat16_bundle_load_no_ml_dtypes(tmp_path, command):
    """They read sizes and checksums: the stored bits are all they need."""
    bundle = write_bundle(tmp_path / "b.zarr", [SyntheticRequest(prompt=(1, 2), outputs=(3, 4))], dtype="bfloat16")
    loaded = _loaded(tmp_path, command, str(bundle))
    assert "ptrace.bundle_spec.reader" in loaded
    assert _among(loaded, ENGINES + ("ml_dtypes",)) == []
