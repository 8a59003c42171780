"""Backend discovery: entry points in the ``ptrace.backends`` group, loaded only when asked for.

An engine is one module and one entry point: the module's :class:`~ptrace.backends.base.Backend`
subclass declares everything else (environment, options, capabilities, packages), and this
module is the only place that enumerates engines. Backend modules import no engine at module
level, so loading a class to read its declarations is cheap; a module that fails to import
reports its error instead of breaking the CLI.
"""

from __future__ import annotations

import functools
import importlib
import os
import tomllib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from ptrace import DISTRIBUTION
from ptrace.backends import environments
from ptrace.backends.base import Backend
from ptrace.backends.environments import EngineEnvironment
from ptrace.errors import BackendUnavailableError, UnknownBackendError

GROUP = "ptrace.backends"

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
    """Every backend: ptrace's own entry points, other distributions' (out-of-tree engines), and
    classes registered directly."""
    found = dict(_installed())
    for name, cls in _registered.items():
        found[name] = BackendEntry(name, f"{cls.__module__}:{cls.__qualname__}")
    return dict(sorted(found.items()))


@functools.cache
def _installed() -> dict[str, BackendEntry]:
    """The entry points, read once a process: reading them scans every installed distribution,
    and a capture looks its backend up several times (and every backend's packages once).

    ptrace's own come from the code being run: in a source checkout from its ``pyproject.toml``
    (which may be newer than what an editable install recorded, or never installed at all),
    else from the installed distribution's metadata."""
    checkout = environments.source_checkout()
    own: dict[str, str] = {}
    if checkout is not None:
        project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
        own = dict(project.get("entry-points", {}).get(GROUP, {}))
    found = {name: BackendEntry(name, target) for name, target in own.items()}
    for ep in entry_points(group=GROUP):
        # Metadata may spell the name with "_" (``ptrace_llm``): compare normalized names.
        is_ptrace = ep.dist is not None and ep.dist.name.lower().replace("_", "-") == DISTRIBUTION
        if not (is_ptrace and checkout is not None):
            found.setdefault(ep.name, BackendEntry(ep.name, ep.value))
    return found


def loadable() -> dict[str, type[Backend]]:
    """Every backend class that imports (broken plugins are left out: ``ptrace backends`` says why)."""
    classes = {}
    for name, entry in entries().items():
        try:
            classes[name] = entry.load()
        except BackendUnavailableError:
            continue
    return classes


def engine_environments() -> dict[str, EngineEnvironment]:
    """The engine environments the backends declare, by name."""
    return {cls.environment.name: cls.environment for cls in loadable().values() if cls.environment}


def engine_environment(name: str) -> EngineEnvironment:
    known = engine_environments()
    if name not in known:
        raise UnknownBackendError(f"unknown engine environment {name!r}", hint=f"known: {', '.join(known)}")
    return known[name]


def recorded_packages() -> tuple[str, ...]:
    """Distributions every backend declares as deciding its numerics, once each."""
    return tuple(dict.fromkeys(p for cls in loadable().values() for p in cls.packages))


def declared_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (its declarations), wherever it runs; refused at once when
    this machine lacks the hardware it needs."""
    known = entries()
    if name not in known:
        raise UnknownBackendError(f"unknown backend {name!r}",
                                  hint=f"known backends: {', '.join(known)}")
    cls = known[name].load()
    hardware = cls.missing_hardware()
    if hardware:  # no environment can help: refuse before anything starts
        raise BackendUnavailableError(f"backend {name!r} cannot run on this machine: {hardware}")
    return cls


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``, checked runnable here; raises with what to do if it is not."""
    cls = declared_class(name)
    reason = cls.probe()
    if reason:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}", hint=cls.install_hint())
    return cls


def engine_python(name: str) -> Path | None:
    """Where backend ``name`` runs: None for this process, or the Python of its engine environment.

    Raises with what to do when it can run nowhere (no engine here, no environment made)."""
    cls = declared_class(name)
    reason = cls.probe()
    if reason is None:
        return None
    if cls.environment is not None and not os.environ.get(environments.CHILD_MARKER):
        python = environments.python_of(cls.environment.name)
        if python is not None:
            return python
        raise BackendUnavailableError(
            f"backend {name!r} needs its engine environment {cls.environment.name!r}, which does not exist "
            f"({environments.location(cls.environment.name)})", hint=cls.install_hint())
    raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}", hint=cls.install_hint())


def create_backend(name: str) -> Backend:
    return backend_class(name)()
