"""An engine is one module and one entry point: everything else reads its declarations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from ptrace.backends.base import Backend
from ptrace.backends.registry import (
    BackendEntry,
    _registered,
    entries,
    register_backend,
)
from tests.conftest import one_line_error, run_cli

FAKE_ENGINE = '''
from ptrace.backends.base import Backend, Capabilities, EngineOption


class FakeBackend(Backend):
    name = "fake"
    description = "an engine that lives outside ptrace"
    packages = ("fake-engine-runtime",)
    options = (EngineOption("depth", int, "how deep to think", default=3, minimum=1),
               EngineOption("fast", bool, "skip the slow path"))
    capabilities = Capabilities(tensors=False, replace=False, devices=("cpu", "tpu"), dtypes=("float32",))

    def _load(self, options):
        raise RuntimeError(f"loaded with {dict(options.engine_options)}")

    def _generate(self, *args):
        raise NotImplementedError

    def set_seed(self, seed):
        return {}

    vocab_size = num_layers = 0

    def version(self):
        return "0"
'''


def _install_fake_engine(root):
    """One module and one entry point, as an out-of-tree package would install them."""
    (root / "fake_engine.py").write_text(textwrap.dedent(FAKE_ENGINE))
    info = root / "fake_engine-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-engine\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ptrace.backends]\nfake = fake_engine:FakeBackend\n")
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def test_a_fake_engine_appears_with_its_options_and_capabilities(tmp_path):
    env = _install_fake_engine(tmp_path)
    result = run_cli("backends", "--json", env=env)
    assert result.returncode == 0, result.stderr
    fake = {row["name"]: row for row in json.loads(result.stdout)}["fake"]
    assert fake["available"] and fake["runs_in"] == "this environment"
    assert [o["name"] for o in fake["options"]] == ["depth", "fast"]
    assert fake["options"][0] == {"name": "depth", "type": "int", "help": "how deep to think", "default": 3,
                                  "choices": [], "minimum": 1}
    assert fake["capabilities"]["devices"] == ["cpu", "tpu"] and not fake["capabilities"]["tensors"]
    helped = run_cli("capture", "--help", env={**env, "COLUMNS": "400"})
    assert "fake: depth (int, default 3), fast (bool)" in " ".join(helped.stdout.split())


def test_a_fake_engines_options_are_validated_from_its_schema(tmp_path, example_model):
    env = _install_fake_engine(tmp_path)
    common = ("capture", "-b", "fake", "-m", example_model, "--prompt", "hi", "--tensors", "none",
              "-o", tmp_path / "b.zarr")
    assert "backend fake has no engine option bogus" in one_line_error(run_cli(*common, "-E", "bogus=1", env=env))
    assert "depth=deep: backend fake expects int" in one_line_error(run_cli(*common, "-E", "depth=deep", env=env))
    assert "depth=0: backend fake needs at least 1" in one_line_error(run_cli(*common, "-E", "depth=0", env=env))
    assert "does not support dtype bfloat16" in one_line_error(run_cli(*common, "--dtype", "bfloat16", env=env))
    # Valid options reach the engine typed, with the declared defaults filled in.
    line = one_line_error(run_cli(*common, "-E", "fast=yes", env=env))
    assert "loaded with {'fast': True, 'depth': 3}" in line or "loaded with {'depth': 3, 'fast': True}" in line


def test_recorded_packages_come_from_the_backends(tmp_path):
    env = _install_fake_engine(tmp_path)
    code = "from ptrace.capture.environment import package_versions; print(sorted(package_versions()))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, **env}, check=True).stdout
    assert "fake-engine-runtime" in names and "vllm-cpu" in names and "mindformers" in names


def test_every_declared_entry_point_names_its_backend_class():
    """pyproject.toml's entry points (what an install registers) import and name their engines."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["ptrace.backends"]
    assert {"torch", "vllm", "vllm-ms", "ms"} <= set(declared)
    for name, target in declared.items():
        cls = BackendEntry(name, target).load()
        assert issubclass(cls, Backend) and cls.name == name, target


def test_entries_read_once_still_follow_registered_classes():
    """The installed entry points are read once a process; classes registered later still count."""
    class Late(Backend):
        name = "registered-late"

    before = entries()
    register_backend(Late)
    try:
        assert entries() == dict(sorted({**before, Late.name: BackendEntry(Late.name, f"{__name__}:{Late.__qualname__}")}.items()))
    finally:
        _registered.pop(Late.name)
    assert entries() == before
