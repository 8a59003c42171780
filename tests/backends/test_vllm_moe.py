"""The vLLM backend on the mixture-of-experts example: the conformance suite, routing tensors
(the fused MoE layer's gate and router) included. Runs in the vLLM environment."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.backend("vllm")

from ptrace.testing.conformance import BackendTests  # noqa: E402
from tests.backends.test_moe import MOE_MODEL  # noqa: E402


class TestVllmMoe(BackendTests):
    backend = "vllm"
    model_path = MOE_MODEL
