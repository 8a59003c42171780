"""Backend tests run where their engine is installed.

The main environment runs every backend test whose engine imports there (the others skip, or
fail under ``PTRACE_REQUIRE_ENGINES=1``). ``make test`` then runs ``tests/backends`` inside each
engine environment with ``PTRACE_TEST_ENVIRONMENT=<name>``: there only the tests marked
``@pytest.mark.backend(name)`` of backends that live in that environment run.
"""

from __future__ import annotations

import os

import pytest

from ptrace.backends.registry import entries


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    environment = os.environ.get("PTRACE_TEST_ENVIRONMENT")
    if not environment:
        return
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("backend")
        cls = entries()[marker.args[0]].load() if marker else None
        lives_here = cls is not None and cls.environment is not None and cls.environment.name == environment
        (keep if lives_here else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
