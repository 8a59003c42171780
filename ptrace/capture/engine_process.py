"""Run captures in an engine's own environment, and read back what it did: the parent's side
(the child's is ``ptrace.capture.remote``).

The parent starts ``<engine python> -m ptrace.capture.remote`` with the checked capture plan
on stdin (``CapturePlan.to_bytes``: msgpack, floats exact). The child runs them with the engine installed there and reports over a pipe of
its own (engines print freely on stdout and stderr), one JSON object per line:
``{"progress": [done, total, stage]}``, ``{"done": [paths]}`` or
``{"error": {"type": "BackendError", "message": ..., "hint": ...}}``. Errors keep their class, so
the CLI's one-line message and exit code are the same as if the engine ran here. The engine's
own output goes to a log file that the error names when it holds anything (or to the terminal
with ``--debug``).
"""


from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ptrace import errors
from ptrace.backends.environments import CHILD_MARKER
from ptrace.capture.plan import CapturePlan

log = logging.getLogger("ptrace.capture")
#: The variable that tells the child which file descriptor is its channel to the parent.
CHANNEL = "PTRACE_REMOTE_FD"


def run_in_environment(plan: CapturePlan, progress: Callable[..., None] | None) -> list[Path]:
    """Run the captures of ``plan`` with its engine environment's Python (``plan.python``); the
    bundle paths, or the child's error, raised with its class."""
    backend, python = plan.backend, plan.python
    verbose = logging.getLogger("ptrace").getEffectiveLevel() <= logging.DEBUG
    log.info("running %s in %s", backend, python)
    read_end, write_end = os.pipe()
    with tempfile.NamedTemporaryFile("w+b", prefix="ptrace-engine-", suffix=".log", delete=False) as engine_log:
        sink = None if verbose else engine_log
        child = subprocess.Popen(
            [str(python), "-m", "ptrace.capture.remote"], stdin=subprocess.PIPE, stdout=sink,
            stderr=sink, pass_fds=(write_end,),
            env={**os.environ, CHILD_MARKER: backend, CHANNEL: str(write_end),
                 "PTRACE_LOG_LEVEL": "DEBUG" if verbose else "INFO"})
        os.close(write_end)
        child.stdin.write(plan.to_bytes())
        child.stdin.close()
        outcome: dict[str, Any] = {}
        with os.fdopen(read_end, "r") as channel:
            for line in channel:
                message = json.loads(line)
                if "progress" in message and progress:
                    progress(*message["progress"])
                outcome.update({k: v for k, v in message.items() if k != "progress"})
        code = child.wait()
    log_path = Path(engine_log.name)
    if ("done" in outcome and code == 0) or (log_path.exists() and log_path.stat().st_size == 0):
        log_path.unlink(missing_ok=True)  # nothing to read there: never point at it
    if "done" in outcome and code == 0:
        return [Path(p) for p in outcome["done"]]
    failure = outcome.get("error") or {"type": "BackendError", "hint": None,
                                       "message": f"the {backend} engine process exited with code {code}"}
    cls = getattr(errors, failure["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, errors.PtraceError)):
        cls = errors.BackendError
    where = "" if verbose or not log_path.exists() else f" (engine log: {log_path})"
    raise cls(failure["message"] + where, hint=failure.get("hint"))
