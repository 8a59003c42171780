"""What the machine and its software were: the part of a run that nobody remembers to report.

Only variables that change numerics are recorded, and anything that looks like a secret is
redacted, by name and by value, everywhere in the bundle's metadata (SPEC.md section 8): a
bundle must be safe to attach to a public bug report.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ptrace import DISTRIBUTION, hardware
from ptrace.backends.registry import recorded_packages
from ptrace.bundle_spec.schema import EnvironmentInfo

#: ptrace's own distributions whose versions decide what a bundle holds; each backend declares
#: its engine's (``Backend.packages``). Absent ones are recorded as None.
CORE_PACKAGES = (DISTRIBUTION, "numpy", "zarr", "ml_dtypes")
ENV_PREFIXES = (
    "VLLM_", "MS_", "MINDSPORE_", "CUDA_", "CUBLAS_", "CUDNN_", "NCCL_", "ASCEND_", "HCCL_",
    "OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH_", "PYTORCH_", "HF_", "TRANSFORMERS_",
    "TOKENIZERS_", "GLOG_", "LD_PRELOAD",
)
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.I)
_SECRET_OPTION = re.compile(r"^--?[\w-]*(token|key|secret|passw|credential|auth)[\w-]*(=.*)?$", re.I)
REDACTED = "<redacted>"
#: Values shorter than this are not scrubbed by value (they would match everywhere).
_MIN_SECRET_LEN = 6


class Redactor:
    """Replaces every known secret value in strings of a nested structure."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], argv: Sequence[str]) -> Redactor:
        secrets = [value for name, value in environ.items() if _SECRET_NAME.search(name)]
        for i, arg in enumerate(argv):
            if _SECRET_OPTION.match(arg):
                if "=" in arg:
                    secrets.append(arg.split("=", 1)[1])
                elif i + 1 < len(argv):
                    secrets.append(argv[i + 1])
        return cls(secrets)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, bytes):
            for secret in self.secrets:
                value = value.replace(secret.encode(), REDACTED.encode())
            return value
        if isinstance(value, Mapping):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.scrub(v) for v in value)
        return value


def numerics_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that can change numerics, secrets redacted by name."""
    return {
        name: (REDACTED if _SECRET_NAME.search(name) else value)
        for name, value in sorted(environ.items())
        if name.startswith(ENV_PREFIXES)
    }


def package_versions(names: Sequence[str] | None = None) -> dict[str, str | None]:
    """Versions of ptrace's packages and of every registered engine's (all of them, so that two
    bundles from different engines list the same names)."""
    if names is None:
        names = tuple(dict.fromkeys((*CORE_PACKAGES, *recorded_packages())))
    return {name: _installed_version(name) for name in names}


@functools.cache
def _installed_version(name: str) -> str | None:
    """Looked up once a process: each look-up parses the distribution's whole METADATA (a few ms
    for torch's), and the modules this process imported are those of the first look-up anyway."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect_environment(environ: Mapping[str, str] | None = None) -> EnvironmentInfo:
    environ = os.environ if environ is None else environ
    return EnvironmentInfo(
        python={"version": platform.python_version(), "implementation": platform.python_implementation(),
                "executable": sys.executable},
        os={"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "platform": platform.platform()},
        hardware={"cpu": hardware.cpu_model(), "cpu_count": os.cpu_count(),
                  "memory_bytes": hardware.memory_bytes(), "accelerators": hardware.accelerators()},
        packages=package_versions(),
        env=numerics_env(environ),
    )
