"""Engine environments: one Python environment per engine, because their pins exclude each other.

MindSpore needs ``numpy<2`` and transformers 4.57.1; vLLM needs numpy 2 and transformers 5.x
(no one set of packages satisfies both engines). ptrace installs itself into
each engine's environment, so ``ptrace capture --backend ms`` from any environment runs the
engine side where the engine is installed (``ptrace.capture.remote``) and reads back the bundle.

Where an environment lives, first match wins:

1. ``PTRACE_ENV_<NAME>`` (``PTRACE_ENV_VLLM``, ``PTRACE_ENV_MS``, ``PTRACE_ENV_VLLM_MS``): an
   environment directory or its Python executable, for environments you manage yourself;
2. ``<root>/<name>``, where root is ``PTRACE_ENVS_DIR``, else ``.venvs`` of a ptrace source
   checkout, else ``~/.local/share/ptrace/envs``; ``ptrace envs create NAME`` makes it there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ptrace.errors import BackendError

#: Set in an engine environment's process that ptrace started, so it never delegates again.
CHILD_MARKER = "PTRACE_ENGINE_ENV"
#: The torch build every environment shares (the CPU wheel where no GPU build is wanted).
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class EngineEnvironment:
    """How to build one engine's environment: what pip installs, in one resolve with ptrace."""

    name: str
    requirements: tuple[str, ...]
    #: Installed first, alone, so that later requirements find it satisfied (torch's CPU wheel).
    first: tuple[str, ...] = ()
    #: Uninstalled afterwards (packages the engine pulls in but that break it here).
    remove: tuple[str, ...] = ()
    note: str = ""
    #: Made by ``ptrace envs create --all`` (and so by ``make setup``); False for environments
    #: whose engine needs hardware that ordinary machines lack.
    default: bool = True

    @property
    def variable(self) -> str:
        return variable(self.name)

    def to_dict(self) -> dict:
        return {"name": self.name, "requirements": list(self.requirements), "note": self.note,
                "default": self.default, "variable": self.variable}


def variable(name: str) -> str:
    """The environment variable that points ptrace at environment ``name`` you manage yourself."""
    return "PTRACE_ENV_" + name.upper().replace("-", "_")


def source_checkout() -> Path | None:
    """The repository root when ptrace runs from a source checkout (editable install)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "ptrace").is_dir() else None


def envs_root() -> Path:
    if os.environ.get("PTRACE_ENVS_DIR"):
        return Path(os.environ["PTRACE_ENVS_DIR"])
    checkout = source_checkout()
    if checkout is not None:
        return checkout / ".venvs"
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "ptrace" / "envs"


def location(name: str) -> Path:
    """Where environment ``name`` is (or would be created): a directory or a Python executable."""
    override = os.environ.get(variable(name))
    return Path(override) if override else envs_root() / name


def python_of(name: str) -> Path | None:
    """The Python executable of environment ``name``, or None if it does not exist."""
    path = location(name)
    python = path if path.is_file() else path / "bin" / "python"
    return python if python.is_file() else None


def create(spec: EngineEnvironment, *, python: str = sys.executable, requirements: tuple[str, ...] = (),
           also: tuple[str, ...] = (), quiet: bool = True) -> Path:
    """Create (or update) an engine environment; returns its Python. Runs venv and pip: minutes.

    ``requirements`` replace the declared pins (a CUDA build, say); ``also`` adds packages
    (pytest for the engine's own conformance tests)."""
    name = spec.name
    target = location(name)
    if target.is_file():
        raise BackendError(f"{spec.variable} points at {target}, an environment ptrace did not create",
                           hint=f"unset {spec.variable} to let ptrace create one under {envs_root()}")
    pip_flags = ["--disable-pip-version-check", *(["--quiet"] if quiet else [])]
    env_python = target / "bin" / "python"
    steps = [] if env_python.is_file() else [[python, "-m", "venv", str(target)]]
    if spec.first:
        steps.append([str(env_python), "-m", "pip", "install", *pip_flags, *spec.first])
    # One resolve for the engine and ptrace: ptrace's own needs (numpy, numcodecs) must bend to the
    # engine's pins, not the other way round.
    steps.append([str(env_python), "-m", "pip", "install", *pip_flags, *(requirements or spec.requirements),
                  *also, *_ptrace_requirement()])
    if spec.remove:
        steps.append([str(env_python), "-m", "pip", "uninstall", "-y", *pip_flags, *spec.remove])
    for step in steps:
        result = subprocess.run(step, check=False)
        if result.returncode != 0:
            raise BackendError(f"creating environment {name} failed at: {' '.join(step)}",
                               hint="see pip's output above; fix and run `ptrace envs create` again")
    return env_python


def _ptrace_requirement() -> list[str]:
    checkout = source_checkout()
    if checkout is not None:
        return ["-e", str(checkout)]
    from ptrace import DISTRIBUTION, __version__

    return [f"{DISTRIBUTION}=={__version__}"]
