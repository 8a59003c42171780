"""An engine process that fails: its error names the engine's log only when the log holds
something to read."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from ptrace.capture import CaptureConfig
from ptrace.capture.engine_process import run_in_environment
from ptrace.capture.plan import plan_captures
from ptrace.errors import BackendError


def _engine_python(tmp_path: Path, body: str) -> Path:
    """A stand-in for an engine environment's python: a script that ignores its arguments."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("prints", [False, True])
def test_the_engine_log_is_named_only_when_it_holds_something(tmp_path, example_model, prints):
    python = _engine_python(tmp_path, ("echo 'engine: out of memory' >&2\n" if prints else "") + "exit 3")
    plan = plan_captures([CaptureConfig(backend="torch", model=example_model, output=tmp_path / "b.zarr",
                                        random_input_ids=4)])
    with pytest.raises(BackendError, match="exited with code 3") as error:
        run_in_environment(replace(plan, python=python), None)
    named = re.search(r"\(engine log: (\S+)\)", str(error.value))
    if prints:
        assert named and "engine: out of memory" in Path(named.group(1)).read_text()
        Path(named.group(1)).unlink()
    else:
        assert named is None, str(error.value)
