"""The torch backend on the mixture-of-experts example (``examples/tiny-qwen3-moe``): the
conformance suite, routing tensors included."""

from __future__ import annotations

from ptrace.testing.conformance import BackendTests
from tests.conftest import ROOT

MOE_MODEL = ROOT / "examples" / "tiny-qwen3-moe"


class TestTorchMoe(BackendTests):
    backend = "torch"
    model_path = MOE_MODEL
