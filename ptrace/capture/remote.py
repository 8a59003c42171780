"""Run captures in an engine's own environment, and read back what it did.

The parent starts ``<engine python> -m ptrace.capture.remote`` with the capture configs as
JSON on stdin. The child runs them with the engine installed there and reports over a pipe of
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
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptrace import errors
from ptrace.backends.environments import CHILD_MARKER
from ptrace.bundle_spec import schema
from ptrace.bundle_spec.schema import Document
from ptrace.capture.session import CaptureConfig, Progress, capture_runs

log = logging.getLogger("ptrace.capture")
_CHANNEL = "PTRACE_REMOTE_FD"


def run_in_environment(python: Path, configs: Sequence[CaptureConfig],
                       documents: Sequence[Sequence[Document]], progress: Progress | None) -> list[Path]:
    request = {"configs": [c.to_dict() for c in configs],
               "documents": [[[type(d).__name__, d.to_dict()] for d in docs] for docs in documents]}
    verbose = logging.getLogger("ptrace").getEffectiveLevel() <= logging.DEBUG
    log.info("running %s in %s", configs[0].backend, python)
    read_end, write_end = os.pipe()
    with tempfile.NamedTemporaryFile("w+b", prefix="ptrace-engine-", suffix=".log", delete=False) as engine_log:
        sink = None if verbose else engine_log
        child = subprocess.Popen(
            [str(python), "-m", "ptrace.capture.remote"], stdin=subprocess.PIPE, stdout=sink,
            stderr=sink, pass_fds=(write_end,),
            env={**os.environ, CHILD_MARKER: configs[0].backend, _CHANNEL: str(write_end),
                 "PTRACE_LOG_LEVEL": "DEBUG" if verbose else "INFO"})
        os.close(write_end)
        child.stdin.write(json.dumps(request).encode())
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
                                       "message": f"the {configs[0].backend} engine process exited with code {code}"}
    cls = getattr(errors, failure["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, errors.PtraceError)):
        cls = errors.BackendError
    where = "" if verbose or not log_path.exists() else f" (engine log: {log_path})"
    raise cls(failure["message"] + where, hint=failure.get("hint"))


def _serve() -> int:
    """The child: run the captures on stdin, report on the channel."""
    channel = os.fdopen(int(os.environ[_CHANNEL]), "w", buffering=1)

    def send(**message: Any) -> None:
        channel.write(json.dumps(message) + "\n")

    logging.basicConfig(level=os.environ.get("PTRACE_LOG_LEVEL", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        request = json.loads(sys.stdin.read())
        configs = [CaptureConfig.from_dict(c) for c in request["configs"]]
        documents = [[getattr(schema, kind).from_dict(data) for kind, data in docs]
                     for docs in request["documents"]]
        paths = capture_runs(configs, documents=documents,
                             progress=lambda done, total, stage=None: send(progress=[done, total, stage]))
        send(done=[str(p) for p in paths])
        return 0
    except errors.PtraceError as exc:
        log.debug("capture failed", exc_info=True)
        send(error={"type": type(exc).__name__, "message": exc.args[0] if exc.args else str(exc), "hint": exc.hint})
        return 1
    except Exception as exc:  # the engine's own failure: its traceback is in the engine log
        log.exception("capture failed")
        send(error={"type": "BackendError", "message": f"{type(exc).__name__}: {exc}", "hint": None})
        return 1
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(_serve())
