"""MindSpore Transformers (MindFormers): Huawei's engine (``--backend ms``).

On CPU the model is MindFormers' legacy ``LlamaForCausalLM`` (:mod:`.cpu_model`), run in
PyNative mode: cell forward hooks fire there and are silently ignored in GRAPH mode, so GRAPH
mode is refused. MindFormers has no KV cache on CPU; the backend keeps one and decodes
incrementally, so that a step computes (and interceptors see) only its new positions and what-ifs
persist as in a KV-cache engine.

On an Ascend NPU (``--device npu``, ``npu:N`` or ``ascend``, where ``/dev/davinci*`` exists and
MindSpore has its Ascend backend) the model is MindFormers' own ``InferenceQwen2ForCausalLM`` /
``InferenceQwen3ForCausalLM`` with a real paged KV cache (:mod:`.ascend_model`), UNTESTED ON
HARDWARE. Without an Ascend device, ``--device npu`` is refused with one line.

Either model sits behind one protocol (:mod:`.model`), converted from the HF checkpoint by
:mod:`.convert`; the decode loop is ptrace's own, one request at a time, with no padding
(:mod:`ptrace.backends.sequential`). Nothing here imports MindSpore until a model loads.
"""

from ptrace.backends.mindformers.backend import MindFormersBackend

__all__ = ["MindFormersBackend"]
