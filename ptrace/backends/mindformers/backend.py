"""The MindFormers backend (``--backend ms``): what it declares, where it runs, and the model it
drives through ptrace's decode loop (:class:`SequentialBackend`); see the package docstring."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from contextlib import ExitStack, redirect_stdout
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ptrace import hardware
from ptrace.backends.base import Capabilities, EngineOption, LoadOptions
from ptrace.backends.environments import TORCH, EngineEnvironment
from ptrace.backends.mindformers.ascend_model import AscendModel
from ptrace.backends.mindformers.convert import ASCEND_MODEL_CLASSES, PRECISION_DTYPES, SUPPORTED_MODEL_TYPES
from ptrace.backends.mindformers.cpu_model import CpuModel
from ptrace.backends.mindformers.model import MindFormersModel
from ptrace.backends.mindformers.tensor import MindSporeTensor, dtype_name
from ptrace.backends.model_dir import read_config
from ptrace.backends.sequential import SequentialBackend
from ptrace.bundle_spec import moe
from ptrace.errors import BackendUnavailableError, ModelError, UsageError

log = logging.getLogger("ptrace.backends")

#: Dtypes of the Ascend path: its FlashAttentionScore and PagedAttention kernels take only these.
ASCEND_DTYPES = ("float16", "bfloat16")
#: Longest sequence (prompt + generated) the CPU model is built for unless ``seq_length`` says
#: otherwise: its causal mask is a [seq_length, seq_length] tensor.
DEFAULT_SEQ_LENGTH = 4096


def import_mindspore() -> Any:
    """Import MindSpore and MindFormers, keeping MindFormers' log files out of the cwd and its
    console log off stdout (which belongs to ptrace's own output)."""
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(Path(tempfile.gettempdir()) / "ptrace-mindformers"))
    with redirect_stdout(sys.stderr):  # MindFormers logs warnings while it imports
        import mindformers  # noqa: F401
        from mindformers.tools.logger import get_logger
    import mindspore

    for handler in get_logger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            handler.setStream(sys.stderr)
            handler.setLevel(logging.WARNING)  # its INFO lines stay in its log files
    return mindspore


class MindFormersBackend(SequentialBackend):
    name = "ms"
    description = "MindSpore Transformers (MindFormers)"
    requires = ("mindspore", "mindformers")
    environment = EngineEnvironment(
        "ms", requirements=("mindformers==1.9.0", "mindspore==2.9.0", TORCH, "numpy<2"),
        first=(TORCH,), note="MindSpore 2.9 + MindFormers 1.9 (CPU, or Ascend with its driver)")
    packages = ("mindspore", "mindformers", "mindstudio-probe", "transformers", "tokenizers")
    options = (
        EngineOption("mode", str, "MindSpore execution mode (GRAPH mode drops the hooks: refused)",
                     default="pynative", choices=("pynative", "graph")),
        EngineOption("seq_length", int, "longest sequence the model is built for", default=DEFAULT_SEQ_LENGTH,
                     minimum=1),
        EngineOption("compute_dtype", str, "MindFormers' compute_dtype: the matmuls' (default: --dtype)",
                     choices=PRECISION_DTYPES),
        EngineOption("param_init_type", str, "dtype the weights are held in (default: --dtype)",
                     choices=PRECISION_DTYPES),
        EngineOption("softmax_compute_type", str, "dtype of the attention softmax (default float32, as HF)",
                     choices=PRECISION_DTYPES),
        EngineOption("layernorm_compute_type", str, "dtype of the RMSNorms (default float32, as HF)",
                     choices=PRECISION_DTYPES),
        EngineOption("rotary_dtype", str, "dtype the rotary embedding is applied in (default: --dtype)",
                     choices=PRECISION_DTYPES),
    )
    capabilities = Capabilities(devices=("cpu", "npu", "ascend"))
    tensor_type = MindSporeTensor

    def _load(self, options: LoadOptions) -> None:
        if options.engine_options["mode"] == "graph":
            raise UsageError("backend ms cannot capture in MindSpore GRAPH mode: the graph compiler "
                             "silently drops the cell hooks that see the tensors",
                             hint="drop --engine-option mode=graph; ptrace runs MindSpore in PyNative mode")
        device_target, device_id = self._device_target(options.device)  # before the noisy imports
        ms = import_mindspore()
        ascend = device_target == "Ascend"
        if ascend and options.dtype not in ASCEND_DTYPES:
            raise UsageError(f"backend ms on an Ascend NPU does not run {options.dtype}: MindFormers' "
                             "FlashAttention and PagedAttention kernels take float16 or bfloat16 only",
                             hint="pass --dtype bfloat16 (or float16)")
        # Synchronous PyNative: the asynchronous executor hands every op to another thread, and
        # on a few CPU cores the hand-offs cost 14x the arithmetic (benchmarks/bench_ms_decode.py).
        # It also reports a failing op where it fails. Set before the device: later has no effect.
        ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=not ascend)
        ms.set_device(device_target, device_id)
        _check_dtype_runs(getattr(ms, options.dtype), device_target)
        self.hf_config = read_config(options.model_dir)
        model_type = self.hf_config.get("model_type")
        if moe.moe_layers(self.hf_config):
            raise ModelError(f"backend ms does not run mixture-of-experts models ({model_type}): MindFormers' "
                             "MoE layers need an Ascend NPU, and ptrace maps only its dense Qwen2/Qwen3/Llama layers",
                             hint="capture MoE models, and their routing (layers.*.router, .experts, "
                                  ".expert_weights), with --backend torch or vllm")
        supported = ASCEND_MODEL_CLASSES if ascend else SUPPORTED_MODEL_TYPES
        if model_type not in supported:
            raise ModelError(f"backend ms does not support model_type {model_type!r} on {device_target}",
                             hint=f"it runs {', '.join(supported)} models there "
                                  f"({', '.join(ASCEND_MODEL_CLASSES)} on an Ascend NPU)")
        self.eos_ids = _eos_ids(options.model_dir, self.hf_config)
        self.__dict__.pop("tokenizer", None)  # a previous model's, loaded on first use
        model = AscendModel if ascend else CpuModel
        self.engine: MindFormersModel | None = model(self.hf_config, options,
                                                     options.engine_options["seq_length"])

    @staticmethod
    def _device_target(device: str) -> tuple[str, int | None]:
        """MindSpore's device target and device id for ``--device``: the CPU, or an Ascend NPU
        where one is visible and MindSpore can use it (package docstring)."""
        kind, _, index = device.lower().partition(":")
        if kind == "cpu":
            return "CPU", None
        if kind in ("npu", "ascend"):
            if index and not index.isdigit():
                raise UsageError(f"device {device}: the NPU index must be a number (npu:0, npu:1, ...)")
            reason = hardware.missing_ascend_npu()
            if reason:
                raise BackendUnavailableError(
                    f"device {device}: {reason}: "
                    "the MindFormers Qwen2/Qwen3 path needs one",
                    hint="use --device cpu, where MindFormers' legacy LlamaForCausalLM runs qwen2 and "
                         "llama models")
            ms = import_mindspore()
            if not ms.hal.is_available("Ascend"):
                raise BackendUnavailableError(
                    f"device {device}: an Ascend NPU is present but this MindSpore {ms.__version__} "
                    "cannot use it (no Ascend backend, or CANN is not set up)",
                    hint="install MindSpore's Ascend build and source CANN's set_env.sh, or use --device cpu")
            return "Ascend", int(index) if index else None
        raise UsageError(f"backend ms runs on cpu or npu[:N] (an Ascend NPU), not {device}")

    # -- engine facts --------------------------------------------------------------------------
    def set_seed(self, seed: int) -> dict[str, int]:
        import mindspore as ms

        ms.set_seed(seed)
        return {"mindspore": seed}

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    def version(self) -> str:
        import mindspore as ms

        return ms.__version__

    def engine_info(self) -> dict[str, Any]:
        import mindformers
        import mindspore as ms

        return {
            "mindspore": ms.__version__,
            "mindformers": mindformers.__version__,
            "mode": "PYNATIVE_MODE",
            "device_target": ms.get_context("device_target"),
            "deterministic": ms.get_context("deterministic"),
            "jit_config": ms.get_context("jit_config"),  # includes jit_level
            "precision_mode": (ms.get_context("ascend_config") or {}).get("precision_mode", "default"),
            "runtime_num_threads": ms.get_context("runtime_num_threads"),
            **self.engine.info(),
        }

    def resolved_settings(self) -> dict[str, Any]:
        import mindspore as ms

        return {**self.engine.resolved_settings(),
                "deterministic_algorithms": ms.get_context("deterministic") == "ON",
                # ptrace's own loop: one request at a time, the whole prompt in one forward pass
                "chunked_prefill": False, "max_num_batched_tokens": None, "prefix_caching": False,
                "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                "logprobs_mode": "raw_logprobs"}  # log_softmax of the raw logits (SequentialBackend)

    def close(self) -> None:
        self.engine = None

    @cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer, loaded on first use: only text needs it (a replay feeds
        token ids), so a tokenizer this transformers cannot load fails only what needs it."""
        return _load_tokenizer(self.load_options.model_dir)

    # -- generation ----------------------------------------------------------------------------
    def _check_length(self, longest: int) -> None:
        self.engine.check_length(longest)

    def _install_hooks(self, wanted: set[str], hooks: ExitStack) -> None:
        self.engine.install_hooks(wanted, self._emit, hooks)

    def _start_request(self) -> None:
        self.engine.start_request()

    def _forward(self, sequence: list[int], start: int, prompt_rows: bool) -> np.ndarray:
        return self.engine.forward(sequence, start)  # every new position, wanted or not


def _check_dtype_runs(dtype: Any, device_target: str) -> None:
    """Fail at load, with a hint, if the device cannot multiply matrices in ``dtype``
    (MindSpore's CPU MatMul has no bfloat16 kernel and reports that only when a result is read)."""
    import mindspore as ms

    try:
        ms.ops.matmul(ms.ops.ones((2, 2), dtype), ms.ops.ones((2, 2), dtype)).asnumpy()
    except (TypeError, RuntimeError, ValueError) as exc:
        name = dtype_name(dtype)
        raise BackendUnavailableError(
            f"MindSpore has no {name} matrix multiplication on {device_target} "
            f"({str(exc).splitlines()[0]})",
            hint="use --dtype float32 or float16" if name == "bfloat16" else "use --dtype float32") from exc


def _load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's HF tokenizer. transformers 4.57 (pinned by MindFormers) cannot resolve
    the tokenizer classes transformers 5 writes (``"tokenizer_class": "TokenizersBackend"``);
    ``tokenizer.json`` alone defines the tokenizer then, loaded with tokenizer_config.json's
    special tokens through the class every fast tokenizer derives from."""
    import transformers

    refusals = (OSError, ValueError, KeyError, TypeError)  # TypeError: its files are missing
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except refusals as exc:
        if not (model_dir / "tokenizer.json").is_file():
            raise ModelError(f"transformers cannot load the tokenizer of {model_dir}: {exc}") from exc
        log.info("AutoTokenizer refused %s (%s): loading its tokenizer.json", model_dir, exc)
        try:
            return transformers.PreTrainedTokenizerFast.from_pretrained(model_dir, trust_remote_code=False)
        except refusals as fallback:
            raise ModelError(f"transformers cannot load the tokenizer of {model_dir}: {exc}; "
                             f"nor its tokenizer.json: {fallback}") from fallback


def _eos_ids(model_dir: Path, config: dict) -> set[int]:
    """End-of-sequence ids as HF uses them: generation_config.json first, then config.json."""
    path = model_dir / "generation_config.json"
    eos = None
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if eos is None:
        eos = config.get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
