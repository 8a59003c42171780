"""The child side of running captures in an engine's own environment
(``<engine python> -m ptrace.capture.remote``; the parent and the protocol are
``ptrace.capture.engine_process``): run the capture plan read from stdin with the engine
installed here, and report on the channel the parent passed. The plan was checked by the parent:
this side only executes it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from ptrace import errors
from ptrace.capture.engine_process import CHANNEL
from ptrace.capture.plan import CapturePlan
from ptrace.capture.session import execute

log = logging.getLogger("ptrace.capture")


def _serve() -> int:
    """The child: run the plan on stdin, report on the channel."""
    channel = os.fdopen(int(os.environ[CHANNEL]), "w", buffering=1)

    def send(**message: Any) -> None:
        channel.write(json.dumps(message) + "\n")

    logging.basicConfig(level=os.environ.get("PTRACE_LOG_LEVEL", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = CapturePlan.from_bytes(sys.stdin.buffer.read())
        paths = execute(plan, progress=lambda done, total, stage=None: send(progress=[done, total, stage]))
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
