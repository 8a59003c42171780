"""vLLM with the vLLM-MindSpore plugin (``--backend vllm-ms``): vLLM's driver over MindSpore models."""

from __future__ import annotations

from ptrace import hardware
from ptrace.backends.base import Capabilities, LoadOptions
from ptrace.backends.environments import EngineEnvironment
from ptrace.backends.vllm.engine import VllmBackend
from ptrace.errors import BackendUnavailableError


class VllmMindSporeBackend(VllmBackend):
    """vLLM with the vLLM-MindSpore plugin: MindSpore model implementations on Ascend NPUs.

    The plugin must be imported before vLLM (its documentation's rule); it replaces vLLM's
    models with MindSpore networks, which ptrace's torch hooks cannot see, so this backend
    captures tokens and logprobs only (``--tensors none``). Untested on hardware: nothing here
    has an Ascend NPU.
    """

    name = "vllm-ms"
    description = "vLLM with the vLLM-MindSpore plugin (Ascend NPU only; tokens and logprobs)"
    requires = ("vllm_mindspore", "vllm")
    environment = EngineEnvironment(
        "vllm-ms", requirements=("vllm-mindspore==0.5.1", "numpy<2"), default=False,
        note="vLLM-MindSpore plugin: installs anywhere, runs only on Ascend NPUs")
    packages = ("vllm-mindspore", "vllm", "mindspore", "mindformers")
    # MindSpore graphs that torch hooks cannot see: tokens and logprobs only.
    capabilities = Capabilities(tensors=False, replace=False, batched=True, devices=("npu", "ascend"),
                                dtypes=("float16", "bfloat16", "float32"))

    @classmethod
    def missing_hardware(cls) -> str | None:
        reason = hardware.missing_ascend_npu()
        if reason is None:
            return None
        return f"vllm-ms needs an Ascend NPU: {reason}; compare with --backend vllm or --backend ms instead"

    def _load(self, options: LoadOptions) -> None:
        reason = self.missing_hardware()
        if reason:
            raise BackendUnavailableError(reason)
        import vllm_mindspore  # noqa: F401  (must precede the first vllm import)

        super()._load(options)

    def _activate_platform(self, device: str) -> None:
        return None  # the plugin's platform is the NPU whatever torch calls it
