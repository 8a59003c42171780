"""HF transformers tensor-parallel (``--backend torch -E tensor_parallel_size=N``): ptrace's own
process is rank 0, and N-1 helper processes are the other ranks.

Every rank loads the model with transformers' own plan (``DistributedConfig(tp_plan="auto")``:
q/k/v and the MLP's first projections split by columns, ``o_proj`` and ``down_proj`` by rows and
all-reduced, the LM head's vocabulary gathered) in one ``torch.distributed`` job: gloo on the
CPU, NCCL on CUDA. The helpers mirror rank 0 in lockstep (SPMD): rank 0 sends each ``generate``
call's arguments (:meth:`Ranks.generate`) and each step's next token (:meth:`Ranks.agree`) over
a gloo group of their own, and every rank runs the same decode loop, whose hooks run the same
collectives in the same order. In each hook every rank keeps its rows
(:class:`~ptrace.backends.rank_gather.RankKeeper`: what-ifs act there, on the rank's own shard,
with the same seeded draw on every rank) and rank 0 gathers them
(:meth:`Ranks.gather`) and unshards them for the capture's recorder
(:class:`~ptrace.backends.rank_gather.RankGather`), as vLLM's tensor-parallel capture does.

A helper that fails writes its error (one line) where rank 0 reads it: rank 0's next collective
fails (gloo notices the closed connection) and the capture ends with that line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

from ptrace import hardware
from ptrace.backends import sharding
from ptrace.backends.base import LoadOptions
from ptrace.errors import BackendError, BackendUnavailableError, PtraceError, UsageError

#: The engine option, as vLLM spells it.
TP_SIZE = "tensor_parallel_size"
#: How long a rank waits for the others inside one forward pass or the model's load.
RANK_TIMEOUT = timedelta(minutes=10)
#: How long a helper waits for rank 0's next call (the capture may write a bundle in between).
IDLE_TIMEOUT = timedelta(days=1)
#: How long rank 0 waits for a helper to report why it failed, or to exit when closed.
EXIT_WAIT_S = 10.0


def check(size: int, model_dir: Path, model_config: Mapping[str, Any], device: str) -> None:
    """Refuse, before any engine starts, a size transformers cannot split this model by (it
    shards q and k/v by heads and cannot replicate KV heads), more ranks than usable CPUs or
    GPUs, the CPU on a machine with a GPU (transformers' plan takes the accelerator), and a
    missing accelerate (transformers needs it for any tensor-parallel plan)."""
    if size < 2:
        return
    where, config_file = f"{TP_SIZE}={size}", model_dir / "config.json"
    heads = int(model_config.get("num_attention_heads", 0))
    kv_heads = int(model_config.get("num_key_value_heads") or heads)
    for count, what in ((heads, "attention heads"), (kv_heads, "KV heads")):
        if count % size:
            raise UsageError(f"{where} does not divide the model's {count} {what} ({config_file}): "
                             "transformers splits both by heads",
                             hint=f"choose a {TP_SIZE} that divides {heads} and {kv_heads}")
    if importlib.util.find_spec("accelerate") is None:
        raise BackendUnavailableError(f"{where}: transformers needs accelerate for tensor parallelism",
                                      hint="install it with: pip install 'ptrace-llm[torch]' (or: pip install accelerate)")
    if device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if size > gpus:
            raise UsageError(f"{where} needs {size} GPUs (one per rank) and torch sees {gpus}",
                             hint=f"use {TP_SIZE} <= {gpus}")
        return
    if hardware.cuda_available():
        raise BackendUnavailableError(f"{where} on the CPU: transformers places a split model on the machine's "
                                      "GPU whatever the device asked for",
                                      hint="use --device cuda, or a tensor_parallel_size of 1 on the CPU")
    sharding.check_cpu_ranks(size)


def process_group_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class Ranks:
    """Rank 0's side of the job: starts the helpers and joins them; every method is a
    collective the helpers run too (:func:`_serve`), in the same order."""

    def __init__(self, size: int, options: LoadOptions, backend: type) -> None:
        """Start ranks 1 to ``size - 1``, each running ``backend(rank=r)`` (the engine's class).

        Each is a fresh interpreter (no forked threads; unlike multiprocessing's spawn it never
        imports the caller's main script), which finds ptrace where this process does, writes
        nothing to stdout (a ``--json`` answer stays alone there) and ends when this one does."""
        self.size = size
        self._errors = Path(tempfile.mkdtemp(prefix="ptrace-ranks-"))
        port = _free_port()
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self._helpers = []
        for rank in range(1, size):
            arguments = self._errors / f"rank{rank}.pickle"
            arguments.write_bytes(pickle.dumps((backend, rank, size, port, options, self._errors, os.getpid())))
            self._helpers.append(subprocess.Popen(
                [sys.executable, "-c", f"from {__name__} import serve; serve({str(arguments)!r})"],
                env=environment, stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else subprocess.DEVNULL))
        with self.failures():
            self._commands, self._rows = join(0, size, port, options.device)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Turn an error that a helper's failure caused (a collective it left) into that
        helper's own error, one line."""
        try:
            yield
        except PtraceError:  # rank 0's own refusal: the helpers did nothing wrong
            raise
        except Exception as exc:
            reason = self._helper_error()
            if reason is None:
                raise
            raise BackendError(f"the tensor-parallel run ({self.size} ranks) failed: {reason}",
                               hint="rerun with --debug for the rank's traceback in its log") from exc

    def _helper_error(self) -> str | None:
        for helper in self._helpers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(EXIT_WAIT_S)
        for rank, helper in enumerate(self._helpers, start=1):
            written = self._errors / f"rank{rank}.txt"
            if written.is_file():
                return f"rank {rank}: {written.read_text().strip()}"
            if helper.returncode is not None:
                return f"rank {rank} exited with code {helper.returncode}"
        return None

    def generate(self, call: dict[str, Any]) -> None:
        """Start the helpers' mirror of one ``generate`` (its arguments, pickled)."""
        _broadcast(("generate", call), self._commands)

    def agree(self, token: int | None) -> int | None:
        """Rank 0's next token, on every rank (None: the request is done)."""
        return _broadcast(token, self._rows)

    def gather(self, kept: list[tuple]) -> list[list[tuple]] | None:
        """Every rank's kept rows, on rank 0 (rank order); None on the helpers."""
        return _gather(kept, self._rows, 0)

    def close(self) -> None:
        import torch.distributed as dist

        with contextlib.suppress(Exception):  # a helper that failed has left already
            _broadcast(("close", None), self._commands)
        for helper in self._helpers:
            try:
                helper.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._errors, ignore_errors=True)


def join(rank: int, size: int, port: int, device: str) -> tuple[Any, Any]:
    """Join the job as ``rank``: the default group (the model's collectives), and two gloo
    groups of ptrace's own: one for rank 0's calls (the helpers wait on it between calls), one
    for the rows and tokens of a running call."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(process_group_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=RANK_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT), dist.new_group(backend="gloo")


def rank_environment(rank: int, size: int) -> contextlib.AbstractContextManager:
    """The variables a launcher (torchrun) sets, which transformers reads while it loads a
    model under a tensor-parallel plan; the environment as it was afterwards."""
    return mock.patch.dict(os.environ, {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size)})


def threads_per_rank(size: int) -> int:
    """Each rank's share of the usable CPUs (the ranks run side by side)."""
    return max(1, len(hardware.usable_cpus()) // size)


def _broadcast(value: Any, group: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(value: Any, group: Any, dst: int) -> list[Any] | None:
    import torch.distributed as dist

    rank = dist.get_rank()
    found: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(value, found, dst=dst, group=group)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def serve(arguments: str) -> None:
    """A helper rank's life (its process's only call): join, load the model as rank 0 does,
    then mirror each of rank 0's ``generate`` calls until it closes. An error ends the helper,
    its line left for rank 0; so does rank 0's process ending."""
    import torch.distributed as dist

    backend_class, rank, size, port, options, errors, parent = pickle.loads(Path(arguments).read_bytes())
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    try:
        backend = backend_class(rank=rank)
        backend.ranks = _HelperRanks(size, *join(rank, size, port, options.device))
        backend.load(options)
        while (call := backend.ranks.next_call()) is not None:
            backend.mirror(**call)
    except BaseException as exc:  # noqa: BLE001 (whatever it is, rank 0 must learn of it)
        (errors / f"rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}".splitlines()[0])
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _end_with(parent: int) -> None:
    """End this helper when its rank 0's process has ended (it is then an orphan)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


class _HelperRanks(Ranks):
    """A helper's side of the same collectives (it starts no one)."""

    def __init__(self, size: int, commands: Any, rows: Any) -> None:
        self.size, self._commands, self._rows, self._helpers = size, commands, rows, []

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        """Nothing to end: :func:`_serve` leaves the job when rank 0 closes it."""

    def next_call(self) -> dict[str, Any] | None:
        """Rank 0's next ``generate`` call's arguments; None when it closes the run."""
        command, call = _broadcast(None, self._commands)
        return call if command == "generate" else None
