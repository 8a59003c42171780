"""Backend discovery: entry points in the ``ptrace.backends`` group, loaded only when chosen.

Listing backends and probing them imports no engine, so ``ptrace --help`` and ``ptrace
backends`` stay fast in an environment with no engine at all. A backend module that fails to
import reports its error instead of breaking the CLI.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from ptrace.backends import environments
from ptrace.backends.base import Backend
from ptrace.errors import BackendUnavailableError, UnknownBackendError

GROUP = "ptrace.backends"

#: Backends that ship with ptrace, so a source checkout works without installed entry points.
BUILTIN: dict[str, str] = {
    "torch": "ptrace.backends.torch_hf:TorchBackend",
    "vllm": "ptrace.backends.vllm_engine:VllmBackend",
    "vllm-ms": "ptrace.backends.vllm_engine:VllmMindSporeBackend",
    "ms": "ptrace.backends.mindformers:MindFormersBackend",
}

_registered: dict[str, type[Backend]] = {}


@dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str  # "module:Class"

    def load(self) -> type[Backend]:
        if self.name in _registered:
            return _registered[self.name]
        module_name, _, class_name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, class_name)
        except Exception as exc:  # a broken plugin must not break ptrace: say what broke
            raise BackendUnavailableError(
                f"backend {self.name!r} failed to load ({type(exc).__name__}: {exc})") from exc


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a backend class directly (tests, plugins that are not installed packages)."""
    _registered[cls.name] = cls
    return cls


def entries() -> dict[str, BackendEntry]:
    found = {name: BackendEntry(name, target) for name, target in BUILTIN.items()}
    for ep in entry_points(group=GROUP):
        found[ep.name] = BackendEntry(ep.name, ep.value)
    for name, cls in _registered.items():
        found[name] = BackendEntry(name, f"{cls.__module__}:{cls.__qualname__}")
    return dict(sorted(found.items()))


def _known_class(name: str) -> type[Backend]:
    known = entries()
    if name not in known:
        raise UnknownBackendError(f"unknown backend {name!r}",
                                  hint=f"known backends: {', '.join(known)}")
    return known[name].load()


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``, checked runnable here; raises with what to do if it is not."""
    cls = _known_class(name)
    reason = cls.probe()
    if reason:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}",
                                      hint=cls.install_hint or None)
    return cls


def engine_python(name: str) -> Path | None:
    """Where backend ``name`` runs: None for this process, or the Python of its engine environment.

    Raises with what to do when it can run nowhere (no engine here, no environment made)."""
    cls = _known_class(name)
    reason = cls.probe()
    if reason is None:
        return None
    if cls.environment is not None and not os.environ.get(environments.CHILD_MARKER):
        python = environments.python_of(cls.environment)
        if python is not None:
            return python
        raise BackendUnavailableError(
            f"backend {name!r} needs its engine environment {cls.environment!r}, which does not exist "
            f"({environments.location(cls.environment)})", hint=cls.install_hint or None)
    raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}", hint=cls.install_hint or None)


def create_backend(name: str) -> Backend:
    return backend_class(name)()
