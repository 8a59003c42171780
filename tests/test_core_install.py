"""A core install (``pip install ptrace-llm``, no extras) runs the engine-free commands.

``compare`` on a laptop needs no engine: the core dependencies alone must start the CLI and
read, validate and compare bundles. This builds a fresh virtual environment from the package
index pip is configured with (about a minute), so an import of an undeclared dependency fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

from tests.conftest import GOLDEN, ROOT


def test_core_install_runs_help_inspect_validate_and_compare(tmp_path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.copytree(ROOT / "ptrace", source / "ptrace", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python, ptrace = venv / "bin" / "python", venv / "bin" / "ptrace"
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=900)
    assert install.returncode == 0, install.stderr
    probe = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                            "'zarr') if u.find_spec(m)])"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", "the core install must not bring an engine, nor Zarr (an optional extra)"
    # The distribution is ptrace-llm (``ptrace`` on the index is another project); the import name is ptrace.
    version = subprocess.run([python, "-c", "import ptrace; print(ptrace.__version__)"], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
    assert version.stdout.strip() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

    def run(*args):
        result = subprocess.run([ptrace, *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=300)
        assert result.returncode == 0, f"ptrace {' '.join(map(str, args))}: {result.stderr}"
        return result.stdout

    assert "capture" in run("--help")
    assert "Qwen2ForCausalLM" in run("inspect", GOLDEN / "torch.zarr.zip")
    assert "valid ptrace bundle" in run("validate", GOLDEN / "torch.zarr")
    assert "PASS" in run("compare", GOLDEN / "torch.zarr", GOLDEN / "torch.zarr.zip")
    run("compare", GOLDEN / "torch.zarr", GOLDEN / "replay.teacher.zarr", "--json", tmp_path / "c.json",
        "--metrics-file", tmp_path / "c.prom")
    assert (tmp_path / "c.json").stat().st_size > 0
    assert "ptrace_token_agreement_ratio" in (tmp_path / "c.prom").read_text()
