"""The vLLM backend passes the conformance suite, batched, and agrees with the torch backend.

Runs in the vLLM environment (``.venvs/vllm``, made by ``make setup``): the main environment
skips it, and ``make test`` runs it there.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.backends.conformance import BackendTests  # noqa: E402


class TestVllmBackend(BackendTests):
    backend = "vllm"
