"""The torch backend on the mixture-of-experts example (``examples/tiny-qwen3-moe``): the
conformance suite, routing tensors included; the ms backend refuses MoE models."""

from __future__ import annotations

from ptrace.testing.conformance import BackendTests
from tests.conftest import ROOT, run_cli
from tests.replay.test_cross_engine import ms_env

MOE_MODEL = ROOT / "examples" / "tiny-qwen3-moe"


class TestTorchMoe(BackendTests):
    backend = "torch"
    model_path = MOE_MODEL


@ms_env
def test_ms_refuses_a_mixture_of_experts_model_in_one_line(tmp_path):
    """MindFormers' MoE layers need an Ascend NPU: the ms backend says so, and where to go."""
    result = run_cli("capture", "-b", "ms", "-m", MOE_MODEL, "--random-input-ids", "8", "--max-new-tokens", "1",
                     "--tensors", "layers.*.router", "-o", tmp_path / "ms.zarr", timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not run mixture-of-experts models" in result.stderr and "--backend torch or vllm" in result.stderr
