"""MindSpore Transformers (MindFormers): Huawei's engine (``--backend ms``).

On CPU the model is MindFormers' legacy ``LlamaForCausalLM`` (the one MindFormers model whose
kernels all exist on CPU; with biases on q/k/v it is Qwen2), run in PyNative mode: cell forward
hooks fire there and are silently ignored in GRAPH mode, so GRAPH mode is refused. The decode loop
is ptrace's own, one request at a time, with no padding.

That model has no KV cache on CPU (``use_past`` needs Ascend kernels), so every step recomputes
the whole sequence. The backend hides this completely: interceptors see only each step's new
positions, and the keys and values of earlier positions are frozen as they were computed at
their own step (after any interceptor replaced them) and substituted into every later
recomputation, in every layer. Earlier positions can influence a new one only through their keys
and values, so the new rows are exactly what a KV-cache engine computes, and a what-if that
replaces a value (or anything upstream of it) persists in the "cache" as it would there.

On an Ascend NPU (``--device npu``, ``npu:N`` or ``ascend``, where ``/dev/davinci*`` exists and
MindSpore has its Ascend backend) the model is MindFormers' own ``InferenceQwen2ForCausalLM`` /
``InferenceQwen3ForCausalLM`` (the "mcore" ``parallel_core`` inference classes), driven as
MindFormers' own ``generate()`` drives them, with a real paged KV cache; see :class:`_AscendModel`.
That path is UNTESTED ON HARDWARE: every MindFormers call it makes was checked against the
installed mindformers 1.9.0 source; on a CPU the model builds, loads HF weights and runs up to its
first Ascend-only kernel (RmsNorm), and with its three Ascend-only kernels (RmsNorm,
ApplyRotaryPosEmb, FlashAttention/PagedAttention with ReshapeAndCache) replaced by NumPy
references it reproduced every canonical tensor, the tokens and what-ifs of the torch backend;
but no Ascend device ran it. Without an Ascend device, ``--device npu`` is refused with one line.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from ptrace.backends.base import (
    Backend,
    Capabilities,
    DecodeSteps,
    EngineOption,
    EngineTensor,
    Generation,
    Interceptor,
    LoadOptions,
    StepCallback,
    TensorSite,
)
from ptrace.bundle_spec.schema import SamplingParams
from ptrace.bundle_spec.stats import row_stats
from ptrace.backends.environments import TORCH, EngineEnvironment
from ptrace.backends.model_dir import read_config
from ptrace.errors import BackendUnavailableError, ModelError, UsageError

if TYPE_CHECKING:  # mindspore is imported where it is used, so listing backends stays cheap
    import mindspore as ms

#: HF ``model_type`` -> whether q/k/v projections carry a bias (the only Qwen2/Llama difference
#: MindFormers' LlamaForCausalLM needs to know; Llama's own ``attention_bias`` overrides it).
SUPPORTED_MODEL_TYPES = {"qwen2": True, "llama": False}
#: HF ``model_type`` -> (module, config class, model class) of MindFormers' own inference classes,
#: the models the Ascend path runs.
ASCEND_MODEL_CLASSES = {
    "qwen2": ("mindformers.models.qwen2", "Qwen2Config", "InferenceQwen2ForCausalLM"),
    "qwen3": ("mindformers.models.qwen3", "Qwen3Config", "InferenceQwen3ForCausalLM"),
}
#: Dtypes of the Ascend path: its FlashAttentionScore and PagedAttention kernels take only these.
ASCEND_DTYPES = ("float16", "bfloat16")
#: Longest sequence (prompt + generated) the CPU model is built for unless ``seq_length`` says
#: otherwise: its causal mask is a [seq_length, seq_length] tensor.
DEFAULT_SEQ_LENGTH = 4096
_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _import_mindspore() -> Any:
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


def _dtype_name(dtype: Any) -> str:
    return str(dtype).lower()  # MindSpore prints Float32, BFloat16, ...


class MindSporeTensor(EngineTensor):
    def __init__(self, native: ms.Tensor) -> None:
        self.native = native

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.native.shape)

    @property
    def dtype(self) -> str:
        return _dtype_name(self.native.dtype)

    def numpy(self) -> np.ndarray:
        return np.ascontiguousarray(self.native.asnumpy())  # bfloat16 arrives as ml_dtypes.bfloat16

    def row_stats(self) -> np.ndarray:
        return row_stats(self.numpy())

    def replaced(self, array: np.ndarray) -> MindSporeTensor:
        import mindspore as ms

        host = np.ascontiguousarray(array).astype(_NUMPY_DTYPES[self.dtype])
        return MindSporeTensor(ms.Tensor(host, dtype=self.native.dtype).reshape(self.native.shape))


@contextmanager
def _environment(**values: str):
    """MindFormers reads some switches from the environment when a model is built."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MindFormersBackend(Backend):
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
    )
    capabilities = Capabilities(devices=("cpu", "npu", "ascend"))

    def _load(self, options: LoadOptions) -> None:
        if options.engine_options["mode"] == "graph":
            raise UsageError("backend ms cannot capture in MindSpore GRAPH mode: the graph compiler "
                             "silently drops the cell hooks that see the tensors",
                             hint="drop --engine-option mode=graph; ptrace runs MindSpore in PyNative mode")
        device_target, device_id = self._device_target(options.device)  # before the noisy imports
        ms = _import_mindspore()
        ascend = device_target == "Ascend"
        if ascend and options.dtype not in ASCEND_DTYPES:
            raise UsageError(f"backend ms on an Ascend NPU does not run {options.dtype}: MindFormers' "
                             "FlashAttention and PagedAttention kernels take float16 or bfloat16 only",
                             hint="pass --dtype bfloat16 (or float16)")
        ms.set_context(mode=ms.PYNATIVE_MODE)
        ms.set_device(device_target, device_id)
        _check_dtype_runs(getattr(ms, options.dtype), device_target)
        self.hf_config = read_config(options.model_dir)
        model_type = self.hf_config.get("model_type")
        supported = ASCEND_MODEL_CLASSES if ascend else SUPPORTED_MODEL_TYPES
        if model_type not in supported:
            raise ModelError(f"backend ms does not support model_type {model_type!r} on {device_target}",
                             hint=f"it runs {', '.join(supported)} models there "
                                  f"({', '.join(ASCEND_MODEL_CLASSES)} on an Ascend NPU)")
        self.tokenizer = _load_tokenizer(options.model_dir)
        self.eos_ids = _eos_ids(options.model_dir, self.hf_config)
        seq_length = options.engine_options["seq_length"]
        model = _AscendModel if ascend else _CpuModel
        self.engine: _CpuModel | _AscendModel | None = model(self, options, seq_length)

    @staticmethod
    def _device_target(device: str) -> tuple[str, int | None]:
        """MindSpore's device target and device id for ``--device``: the CPU, or an Ascend NPU
        where one is visible and MindSpore can use it (module docstring)."""
        kind, _, index = device.lower().partition(":")
        if kind == "cpu":
            return "CPU", None
        if kind in ("npu", "ascend"):
            if index and not index.isdigit():
                raise UsageError(f"device {device}: the NPU index must be a number (npu:0, npu:1, ...)")
            if not glob.glob("/dev/davinci[0-9]*"):
                raise BackendUnavailableError(
                    f"device {device}: no Ascend NPU visible (no /dev/davinci*): "
                    "the MindFormers Qwen2/Qwen3 path needs one",
                    hint="use --device cpu, where MindFormers' legacy LlamaForCausalLM runs qwen2 and "
                         "llama models")
            ms = _import_mindspore()
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

    def close(self) -> None:
        self.engine = None

    # -- generation ----------------------------------------------------------------------------
    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens - 1
        self.engine.check_length(longest)
        wanted = self.wanted_tensors(interceptors)
        results = []
        with ExitStack() as hooks:
            self._site: TensorSite | None = None
            self._interceptors = interceptors
            self.engine.install_hooks(wanted, hooks)
            for index, prompt in enumerate(prompts):
                results.append(self._generate_one(index, prompt, sampling, wanted, on_step,
                                                  None if forced is None else forced[index]))
        return results

    def _generate_one(self, index: int, prompt: np.ndarray, sampling: SamplingParams,
                      wanted: set[str], on_step: StepCallback | None,
                      forced: np.ndarray | None) -> Generation:
        rng = np.random.default_rng(sampling.seed + index)
        k = sampling.logprobs
        steps = DecodeSteps(sampling, forced, self.eos_ids)
        sequence = [int(t) for t in prompt]
        prompt_logprobs = None
        self.engine.start_request()
        for step in range(sampling.max_new_tokens):
            start = 0 if step == 0 else len(sequence) - 1
            self._site = TensorSite("", index, step, start)
            logits = self.engine.forward(sequence, start)  # float32 [new positions, vocab]
            if step == 0 and sampling.prompt_logprobs:
                prompt_logprobs = _prompt_logprobs(logits[:-1], prompt, k)
            last = logits[-1]
            logprobs = _log_softmax(last)
            ids = np.argsort(-logprobs, kind="stable")[:k]
            fed = steps.record(_choose(last, sampling, rng), ids, logprobs[ids])
            if on_step:
                on_step(index, step)
            if fed is None:
                break
            sequence.append(fed)
        self._site = None
        return steps.generation(prompt_logprobs)

    # -- hooks ---------------------------------------------------------------------------------
    def _emit(self, name: str, rows: ms.Tensor) -> ms.Tensor | None:
        """Show one tensor (rows = positions) to the interceptors; the replacement, if any."""
        if self._site is None:
            return None
        site = TensorSite(name, self._site.request, self._site.step, self._site.start)
        new = self._intercept(self._interceptors, site, MindSporeTensor(rows))
        return None if new is None else new.native

    def _emit_rows(self, name: str, states: ms.Tensor, axis: int, start: int,
                   to_rows: Callable[[ms.Tensor], ms.Tensor],
                   from_rows: Callable[[ms.Tensor], ms.Tensor]) -> ms.Tensor:
        """Emit positions ``start:`` of ``states`` (positions on ``axis``); ``states`` with the
        interceptors' replacement of those positions, if any."""
        from mindspore import ops

        index = (slice(None),) * axis + (slice(start, None),)
        new = self._emit(name, to_rows(states[index]))
        if new is None:
            return states
        history = states[(slice(None),) * axis + (slice(0, start),)]
        return ops.concat((history, from_rows(new)), axis=axis) if start else from_rows(new)


class _CpuModel:
    """MindFormers' legacy LlamaForCausalLM in PyNative mode, KV cache emulated (module docstring)."""

    model_class = "mindformers.models.llama.LlamaForCausalLM"

    def __init__(self, backend: MindFormersBackend, options: LoadOptions, seq_length: int) -> None:
        from mindformers.models.llama import LlamaForCausalLM

        self.backend = backend
        self.seq_length = seq_length
        self.config = _llama_config(backend.hf_config, options.dtype, seq_length)
        # ENFORCE_EAGER is MindFormers' switch for PyNative inference: without it the causal mask
        # is not cut to the input's length, and every input must be padded to seq_length.
        with _environment(ENFORCE_EAGER="true"):
            self.model = LlamaForCausalLM(self.config)
        self.model.set_train(False)
        _load_weights(self.model, options.model_dir, self.config)
        self.num_layers = self.config.num_layers
        self.n_heads = self.config.num_heads
        self.n_kv_heads = self.config.n_kv_heads or self.n_heads
        self.head_dim = self.config.hidden_size // self.n_heads
        self.frozen_keys: dict[int, ms.Tensor] = {}
        self.frozen_values: dict[int, ms.Tensor] = {}

    def info(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "compute_dtype": _dtype_name(self.config.compute_dtype),
            "param_dtype": _dtype_name(self.config.param_init_type),
            "layernorm_compute_dtype": _dtype_name(self.config.layernorm_compute_type),
            "softmax_compute_dtype": _dtype_name(self.config.softmax_compute_type),
            "rotary_dtype": _dtype_name(self.config.rotary_dtype),
            "seq_length": self.seq_length,
            "kv_cache": "emulated: each step recomputes the sequence with earlier positions' "
                        "keys and values frozen as computed at their own step",
        }

    def check_length(self, longest: int) -> None:
        if longest > self.seq_length:
            raise UsageError(f"a request needs {longest} positions but the ms backend was built "
                             f"for {self.seq_length}",
                             hint=f"pass --engine-option seq_length={longest}")

    def start_request(self) -> None:
        self.frozen_keys.clear()
        self.frozen_values.clear()

    def forward(self, sequence: list[int], start: int) -> np.ndarray:
        """Logits (float32) of positions ``start:`` of ``sequence``.

        The prefill computes every position's logits (prompt logprobs and the "logits" tensor
        need them); later steps let the model gather the last position before the LM head."""
        import mindspore as ms

        input_ids = ms.Tensor(np.asarray(sequence, np.int32)[None])
        if start == 0:
            logits = self.model(input_ids)[0]
        else:
            logits = self.model(input_ids, batch_valid_length=ms.Tensor([len(sequence)], ms.int32))[0]
        return logits.asnumpy().reshape(-1, self.config.vocab_size).astype(np.float32, copy=False)

    def install_hooks(self, wanted: set[str], hooks: ExitStack) -> None:
        backend, decoder = self.backend, self.model.model

        def hook(cell: Any, function: Callable) -> None:
            hooks.callback(cell.register_forward_hook(function).remove)

        def on_states(name: str) -> Callable:
            def states_hook(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor:
                return backend._emit_rows(name, output, 1, backend._site.start, lambda t: t[0], lambda t: t[None])
            return states_hook

        def on_logits(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor | None:
            # The LM head only ever sees this step's positions (forward() gathers before it).
            new = backend._emit("logits", output.reshape(-1, output.shape[-1]))
            return None if new is None else new.reshape(output.shape)

        points = {"embed": decoder.tok_embeddings, "final_norm": decoder.norm_out}
        for i, layer in enumerate(decoder.layers):
            points.update({
                f"layers.{i}.attn_norm": layer.attention_norm,
                f"layers.{i}.attn": layer.attention,
                f"layers.{i}.mlp_norm": layer.ffn_norm,
                f"layers.{i}.mlp": layer.feed_forward,
                f"layers.{i}.out": layer,
            })
        for name, cell in points.items():
            if name in wanted:
                hook(cell, on_states(name))
        if "logits" in wanted:
            hook(self.model.lm_head, on_logits)
        # Always installed, observed or not: the frozen keys and values are the emulated cache.
        for i, layer in enumerate(decoder.layers):
            hook(layer.attention.apply_rotary_emb, self._rotary_hook(i, wanted))
            hook(layer.attention.wv, self._value_hook(i, wanted))

    def _rotary_hook(self, layer: int, wanted: set[str]) -> Callable:
        """q and k after the rotary embedding, [batch, heads, positions, head_dim]."""
        from mindspore import ops

        def to_rows(states: ms.Tensor) -> ms.Tensor:
            return states[0].swapaxes(0, 1)  # -> [positions, heads, head_dim]

        def from_rows(rows: ms.Tensor) -> ms.Tensor:
            return rows.swapaxes(0, 1)[None]

        def rotary_hook(_cell: Any, _args: Any, output: tuple) -> tuple:
            query, key = output
            start = self.backend._site.start
            if start:
                key = ops.concat((self.frozen_keys[layer], key[:, :, start:]), axis=2)
            if f"layers.{layer}.q" in wanted:
                query = self.backend._emit_rows(f"layers.{layer}.q", query, 2, start, to_rows, from_rows)
            if f"layers.{layer}.k" in wanted:
                key = self.backend._emit_rows(f"layers.{layer}.k", key, 2, start, to_rows, from_rows)
            self.frozen_keys[layer] = key
            return query, key
        return rotary_hook

    def _value_hook(self, layer: int, wanted: set[str]) -> Callable:
        """v as the value projection returns it, [batch, positions, kv_heads * head_dim]."""
        from mindspore import ops

        heads, head_dim = self.n_kv_heads, self.head_dim

        def value_hook(_cell: Any, _args: Any, value: ms.Tensor) -> ms.Tensor:
            start = self.backend._site.start
            if start:
                value = ops.concat((self.frozen_values[layer], value[:, start:]), axis=1)
            if f"layers.{layer}.v" in wanted:
                value = self.backend._emit_rows(
                    f"layers.{layer}.v", value, 1, start,
                    lambda t: t[0].reshape(-1, heads, head_dim), lambda t: t.reshape(1, -1, heads * head_dim))
            self.frozen_values[layer] = value
            return value
        return value_hook


class _AscendModel:
    """MindFormers' own Qwen2/Qwen3 inference classes on an Ascend NPU. UNTESTED ON HARDWARE.

    The model is ``InferenceQwen2ForCausalLM`` or ``InferenceQwen3ForCausalLM`` (mindformers 1.9),
    built from the HF ``config.json`` and loaded from its safetensors through MindFormers' own
    name mapping, and stepped as MindFormers' ``GenerationMixin.generate()`` steps it (mcore
    branch): a paged KV cache (``_set_block_mgr``, ``_set_kv_cache``,
    ``_set_lower_triangle_mask``), block tables and slot mappings from
    ``block_mgr.assemble_pa_full_inputs`` (prefill) / ``assemble_pa_inc_inputs`` (decode), inputs
    from ``prepare_inputs_for_generation_mcore``, and ``add_flags_custom_mcore`` before each step
    (what ``forward_mcore`` does, except that its "set the prefill flag only once" shortcut, made
    for compiled graphs, would leave the flag off for a second request's prefill in PyNative).

    Execution: ``construct`` carries MindFormers' ``@jit``, which compiles unless
    ``ENFORCE_EAGER=true`` (it also needs ``RUN_MODE=predict``); both are set around building and
    every call, and MindSpore runs in PyNative mode, so cell hooks fire. Tokens are flattened
    (``[tokens, hidden]``, no batch axis); with one request per call the rows are exactly the
    step's positions: the whole prompt at the prefill, one position per decode step.

    Canonical names (all of SPEC.md section 5), hooked on the mindformers 1.9 module tree
    (``gpt = model.model``, ``layer = gpt.decoder.layers[i]``):

    ============================  =============================================================
    ``embed``                     ``gpt.embedding`` output
    ``layers.{i}.attn_norm``      ``layer.input_layernorm`` output
    ``layers.{i}.q`` / ``k``      ``self_attention.rotary_emb`` output ``(q, k)`` [tokens,
                                  heads * head_dim] (after Qwen3's q/k norms), one RotaryEmbedding
                                  cell shared by every layer: a pre-hook on each
                                  ``layer.self_attention`` tells the hook which layer is running
    ``layers.{i}.v``              ``self_attention.linear_qkv`` output, its last kv_heads * head_dim
                                  columns (q, k, v are fused and split after the projection)
    ``layers.{i}.attn``           ``layer.self_attention`` output (``post_self_attn_layernorm`` is
                                  an identity for Qwen2/Qwen3)
    ``layers.{i}.mlp_norm``       ``layer.pre_mlp_layernorm`` output
    ``layers.{i}.mlp``            ``layer.mlp`` output
    ``layers.{i}.out``            ``layer`` output: in mindformers 1.9 the layer adds both
                                  residuals itself (its norms are not fused with the add), so the
                                  output is the full residual stream, nothing deferred
    ``final_norm``                ``gpt.decoder.final_layernorm`` output
    ``logits``                    ``gpt.output_layer`` output, which ptrace calls itself
    ============================  =============================================================

    The model's own prefill computes logits for the last position only (``pre_gather_func``);
    ptrace sets ``gpt.return_hidden_states`` (MindFormers' switch to return the final-norm rows and
    skip the LM head, as vLLM-MindSpore does) and applies the model's own ``output_layer`` to every
    new row, so ``logits`` and prompt logprobs cover all prompt positions. Replacements of q, k
    and v happen before the attention kernel writes them into the paged cache, so a what-if
    persists in later steps as in any KV-cache engine. If a hook does not fire on the hardware,
    the capture's coverage check fails naming the tensors that were never produced.
    """

    def __init__(self, backend: MindFormersBackend, options: LoadOptions, seq_length: int) -> None:
        import importlib

        from mindformers.core.context import build_mf_context
        from mindformers.core.context.build_context import (
            MFContextOperator,
            is_legacy_model,
        )

        self.backend = backend
        hf = backend.hf_config
        module_name, config_name, class_name = ASCEND_MODEL_CLASSES[hf["model_type"]]
        module = importlib.import_module(module_name)
        self.model_class = f"{module_name}.{class_name}"
        # The mcore classes need MindFormers' context with use_legacy=False (their weight-name
        # mapping refuses to run otherwise); MFContextOperator is a process-wide singleton.
        build_mf_context({"run_mode": "predict", "use_legacy": False})
        if is_legacy_model():
            MFContextOperator.get_mf_ctx_instance().set_context(run_mode="predict", use_legacy=False)
        self.config = getattr(module, config_name)(**self._config_values(hf, options.dtype, seq_length))
        self.block_size = int(self.config.block_size)
        self.seq_length = int(self.config.seq_length)
        with self._eager():
            self.model = getattr(module, class_name)(self.config)
        self.model.set_train(False)
        self.gpt = self.model.model
        self._load_weights(options.model_dir)
        self.gpt.return_hidden_states = True  # final-norm rows back; ptrace applies output_layer
        self.model._set_block_mgr(1, self.seq_length)
        self.model._set_kv_cache()
        self.model._set_lower_triangle_mask()
        self.num_layers = len(self.gpt.decoder.layers)
        attention = self.gpt.decoder.layers[0].self_attention
        self.head_dim = int(attention.hidden_size_per_attention_head)
        self.n_heads = int(attention.num_attention_heads_per_partition)
        self.n_kv_heads = int(attention.num_query_groups_per_partition)
        self._layer = 0  # the layer whose self_attention is running (the rotary cell is shared)

    @staticmethod
    def _config_values(hf: dict, dtype: str, seq_length: int) -> dict:
        """MindFormers' Qwen2Config/Qwen3Config arguments: the HF config plus its own fields."""
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise ModelError(f"backend ms on an Ascend NPU does not pass rope_scaling type {kind!r} "
                             "to MindFormers yet", hint="it runs models with default RoPE there")
        values = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling", "dtype")}
        if hf["model_type"] == "qwen2":
            values["attention_bias"] = True  # HF Qwen2 always has q/k/v biases; MindFormers defaults off
        # A whole number of cache blocks per sequence (BlockTables: seq_length // block_size).
        block_size = 32  # Qwen2Config/Qwen3Config's own default
        seq_length = -(-seq_length // block_size) * block_size
        values.update(
            rope_theta=_rope_theta(hf), rope_scaling=None, seq_length=seq_length, block_size=block_size,
            num_blocks=seq_length // block_size,  # one request at a time, each at most seq_length
            max_position_embeddings=max(hf.get("max_position_embeddings", seq_length), seq_length),
            compute_dtype=dtype, params_dtype=dtype, rotary_dtype=dtype,
            layernorm_compute_dtype="float32", softmax_compute_dtype="float32",  # as HF computes them
        )
        return values

    def _load_weights(self, model_dir: Path) -> None:
        """HF safetensors through MindFormers' own mapping; every parameter must be loaded.
        (``InferModelMixin.load_weights`` step by step, to see which parameters it loaded.)"""
        files = self.model.get_weights_files(str(model_dir))
        if not files:
            raise ModelError(f"{model_dir} has no .safetensors weights (the ms backend reads only those)")
        loaded = self.gpt.load_weights(self.model._safetensors_weights_iterator(files),
                                       self.model.generate_mapping(),
                                       self.model.check_hf_weight(weights_files=files))
        self.model.process_weights_after_loading(self.gpt)
        missing = sorted(set(self.gpt.get_params_dict()) - set(loaded or ()))
        if missing:
            raise ModelError(f"{model_dir} does not fit MindFormers' {self.model_class}: "
                             f"not loaded {missing[:5]}")

    @staticmethod
    def _eager() -> Any:
        """The switches under which MindFormers' ``@jit`` construct runs eagerly (hooks fire)."""
        return _environment(ENFORCE_EAGER="true", RUN_MODE="predict")

    def info(self) -> dict[str, Any]:
        config = self.model.transformer_config
        return {
            "model_class": self.model_class,
            "compute_dtype": _dtype_name(config.compute_dtype),
            "param_dtype": _dtype_name(config.params_dtype),
            "layernorm_compute_dtype": _dtype_name(config.layernorm_compute_dtype),
            "softmax_compute_dtype": _dtype_name(config.softmax_compute_dtype),
            "rotary_dtype": _dtype_name(config.rotary_dtype),
            "use_flash_attention": bool(config.use_flash_attention),
            "seq_length": self.seq_length,
            "kv_cache": f"paged: MindFormers BlockTables, block_size {self.block_size}, "
                        f"{self.seq_length // self.block_size} blocks",
            "execution": "PyNative, ENFORCE_EAGER=true (MindFormers' @jit construct runs eagerly)",
            "hardware_validated": False,
        }

    def check_length(self, longest: int) -> None:
        if longest > self.seq_length:
            raise UsageError(f"a request needs {longest} positions but the ms backend's KV cache "
                             f"holds {self.seq_length}", hint=f"pass --engine-option seq_length={longest}")

    def start_request(self) -> None:
        self.model.block_mgr.clear_cache()  # the previous request's blocks go back to the pool

    def forward(self, sequence: list[int], start: int) -> np.ndarray:
        """Logits (float32) of positions ``start:`` of ``sequence``: the prompt at the prefill
        (``start == 0``), then the one new position."""
        import mindspore as ms

        prefill = start == 0
        valid = np.array([len(sequence)], np.int32)
        manager = self.model.block_mgr
        if prefill:
            block_tables, slots = manager.assemble_pa_full_inputs(len(sequence), valid, [False])
        else:
            block_tables, slots = manager.assemble_pa_inc_inputs(valid, [False])
        inputs, prefill = self.model.prepare_inputs_for_generation_mcore(
            input_ids=np.asarray(sequence[start:], np.int32), valid_length_each_example=valid,
            block_tables=block_tables, slot_mapping=slots, prefill=prefill)
        with self._eager():
            self.model.add_flags_custom_mcore(is_prefill=prefill)
            hidden = self.model(**inputs)  # [new positions, hidden] after the final norm
            logits = self.gpt.output_layer(hidden)
        return logits.astype(ms.float32).reshape(-1, logits.shape[-1]).asnumpy()

    def install_hooks(self, wanted: set[str], hooks: ExitStack) -> None:
        backend, gpt = self.backend, self.gpt

        def hook(cell: Any, function: Callable, pre: bool = False) -> None:
            handle = cell.register_forward_pre_hook(function) if pre else cell.register_forward_hook(function)
            hooks.callback(handle.remove)

        def on_rows(name: str) -> Callable:
            def rows_hook(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor | None:
                return backend._emit(name, output)  # rows are the step's positions already
            return rows_hook

        points = {"embed": gpt.embedding, "final_norm": gpt.decoder.final_layernorm,
                  "logits": gpt.output_layer}
        for i, layer in enumerate(gpt.decoder.layers):
            points.update({
                f"layers.{i}.attn_norm": layer.input_layernorm,
                f"layers.{i}.attn": layer.self_attention,
                f"layers.{i}.mlp_norm": layer.pre_mlp_layernorm,
                f"layers.{i}.mlp": layer.mlp,
                f"layers.{i}.out": layer,
            })
        for name, cell in points.items():
            if name in wanted:
                hook(cell, on_rows(name))
        rotary_cells: dict[int, Any] = {}
        rotary_wanted = any(f"layers.{i}.{part}" in wanted for i in range(self.num_layers) for part in "qk")
        for i, layer in enumerate(gpt.decoder.layers):
            if rotary_wanted:  # every layer, so that the shared rotary cell always knows its layer
                hook(layer.self_attention, self._layer_marker(i), pre=True)
                rotary_cells.setdefault(id(layer.self_attention.rotary_emb), layer.self_attention.rotary_emb)
            if f"layers.{i}.v" in wanted:
                hook(layer.self_attention.linear_qkv, self._value_hook(i))
        for cell in rotary_cells.values():
            hook(cell, self._rotary_hook(wanted))

    def _layer_marker(self, layer: int) -> Callable:
        def marker(_cell: Any, _args: Any) -> None:
            self._layer = layer
        return marker

    def _rotary_hook(self, wanted: set[str]) -> Callable:
        """q and k after the rotary embedding, [tokens, heads * head_dim] each."""
        backend = self.backend
        heads = {"q": self.n_heads, "k": self.n_kv_heads}

        def rotary_hook(_cell: Any, _args: Any, output: tuple) -> tuple | None:
            states = dict(zip(("q", "k"), output))
            changed = False
            for part in ("q", "k"):
                name = f"layers.{self._layer}.{part}"
                if name in wanted:
                    rows = states[part].reshape(-1, heads[part], self.head_dim)
                    new = backend._emit(name, rows)
                    if new is not None:
                        states[part], changed = new.reshape(states[part].shape), True
            return (states["q"], states["k"]) if changed else None
        return rotary_hook

    def _value_hook(self, layer: int) -> Callable:
        """v: the last kv_heads * head_dim columns of the fused q/k/v projection."""
        from mindspore import ops

        backend, name = self.backend, f"layers.{layer}.v"
        width = self.n_kv_heads * self.head_dim

        def value_hook(_cell: Any, _args: Any, qkv: ms.Tensor) -> ms.Tensor | None:
            split = qkv.shape[-1] - width
            new = backend._emit(name, qkv[:, split:].reshape(-1, self.n_kv_heads, self.head_dim))
            if new is None:
                return None
            return ops.concat((qkv[:, :split], new.reshape(-1, width).astype(qkv.dtype)), axis=-1)
        return value_hook


def _check_dtype_runs(dtype: Any, device_target: str) -> None:
    """Fail at load, with a hint, if the device cannot multiply matrices in ``dtype``
    (MindSpore's CPU MatMul has no bfloat16 kernel and reports that only when a result is read)."""
    import mindspore as ms

    try:
        ms.ops.matmul(ms.ops.ones((2, 2), dtype), ms.ops.ones((2, 2), dtype)).asnumpy()
    except (TypeError, RuntimeError, ValueError) as exc:
        name = _dtype_name(dtype)
        raise BackendUnavailableError(
            f"MindSpore has no {name} matrix multiplication on {device_target} "
            f"({str(exc).splitlines()[0]})",
            hint="use --dtype float32 or float16" if name == "bfloat16" else "use --dtype float32") from exc


def _llama_config(hf: dict, dtype: str, seq_length: int) -> Any:
    """MindFormers' LlamaConfig for an HF Qwen2/Llama config, numerics as HF computes them."""
    from mindformers.models.llama import LlamaConfig

    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if (hf.get("head_dim") or hidden // heads) * heads != hidden:
        raise ModelError("MindFormers' LlamaForCausalLM needs head_dim = hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ModelError("MindFormers' LlamaForCausalLM needs a SiLU MLP without bias")
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise ModelError("MindFormers' LlamaForCausalLM has no sliding-window attention")
    qkv_bias = bool(hf.get("attention_bias", SUPPORTED_MODEL_TYPES[hf["model_type"]]))
    if hf.get("attention_bias") and hf["model_type"] == "llama":
        raise ModelError("MindFormers' LlamaForCausalLM has no bias on o_proj (attention_bias=true)")
    return LlamaConfig(
        batch_size=1, seq_length=seq_length, hidden_size=hidden, num_layers=hf["num_hidden_layers"],
        num_heads=heads, n_kv_heads=hf.get("num_key_value_heads", heads),
        max_position_embedding=max(hf.get("max_position_embeddings", seq_length), seq_length),
        intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), theta=_rope_theta(hf), **_rope_scaling(hf),
        # MindFormers masks every key position whose token equals pad_token_id (HF does not): a
        # prompt containing that token would attend differently. No token id is negative.
        pad_token_id=-1,
        qkv_has_bias=qkv_bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        compute_dtype=dtype, param_init_type=dtype, embedding_init_type=dtype, residual_dtype=dtype,
        rotary_dtype=dtype,  # HF applies the rotary embedding in the model's dtype
        layernorm_compute_type="float32", softmax_compute_type="float32",  # as HF does
        use_past=False, use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True,
        checkpoint_name_or_path="",
    )


def _rope_theta(hf: dict) -> float:
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict) -> dict:
    """MindFormers' extend_method/scaling_factor for HF's rope_scaling (default, linear, llama3)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        return {"extend_method": "linear", "scaling_factor": {"factor": float(scaling["factor"])}}
    if kind == "llama3":
        return {"extend_method": "LLAMA3", "scaling_factor": {
            "factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}}
    raise ModelError(f"backend ms does not support rope_scaling type {kind!r}",
                     hint="it supports default, linear and llama3")


def _load_weights(model: Any, model_dir: Path, config: Any) -> None:
    """HF safetensors -> MindFormers names, cast to each parameter's dtype; every parameter
    must be loaded and every checkpoint tensor used."""
    import mindspore as ms
    from mindformers.models.llama import LlamaForCausalLM

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights (the ms backend reads only those)")
    state: dict[str, Any] = {}
    for path in files:
        state.update(ms.load_checkpoint(str(path), format="safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed
    converted = LlamaForCausalLM.convert_weight_dict(state, model_config=config)
    params = model.parameters_dict()
    missing = sorted(set(params) - set(converted))
    unexpected = sorted(set(converted) - set(params))
    if missing or unexpected:
        raise ModelError(f"{model_dir} does not fit MindFormers' LlamaForCausalLM: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in converted.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ModelError(f"{name}: checkpoint shape {tuple(value.shape)}, model expects "
                             f"{tuple(params[name].shape)}")
    cast = {name: ms.Parameter(value.astype(params[name].dtype), name=name) for name, value in converted.items()}
    not_loaded, _ = ms.load_param_into_net(model, cast, strict_load=True)
    if not_loaded:
        raise ModelError(f"MindSpore did not load {not_loaded[:5]}")


def _load_tokenizer(model_dir: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"transformers cannot load the tokenizer of {model_dir}: {exc}") from exc


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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _choose(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy argmax, or seeded sampling with temperature, top-k and top-p (on the host)."""
    if sampling.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k > 0:
        kth = np.partition(scores, -min(sampling.top_k, scores.size))[-min(sampling.top_k, scores.size)]
        scores[scores < kth] = -np.inf
    if sampling.top_p < 1.0:
        order = np.argsort(-scores, kind="stable")
        probs = np.exp(_log_softmax(scores[order]))
        drop = np.cumsum(probs) - probs >= sampling.top_p
        scores[order[drop]] = -np.inf
    cumulative = np.cumsum(np.exp(_log_softmax(scores)))
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


def _prompt_logprobs(logits: np.ndarray, prompt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row i of the prefill's logits predicts prompt token i+1 (SPEC.md section 2): the prompt
    tokens' logprobs, and the top-k ids and logprobs per position."""
    positions = prompt.shape[0]
    token_lp = np.full(positions, np.nan, dtype=np.float32)
    top_ids = np.full((positions, k), -1, dtype=np.int64)
    top_lps = np.full((positions, k), np.nan, dtype=np.float32)
    if positions > 1:
        top = logits.max(axis=-1, keepdims=True)
        norm = top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        token_lp[1:] = logits[np.arange(positions - 1), prompt[1:]] - norm[:, 0]
        if k:
            ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
            top_ids[1:], top_lps[1:] = ids, np.take_along_axis(logits, ids, axis=-1) - norm
    return token_lp, top_ids, top_lps
