"""MindFormers on an Ascend NPU: its own Qwen2/Qwen3 inference classes with a real paged KV
cache. UNTESTED ON HARDWARE (see :class:`AscendModel`).

Every MindFormers call made here was checked against the installed mindformers 1.9.0 source; on
a CPU the model builds, loads HF weights and runs up to its first Ascend-only kernel (RmsNorm),
and with its three Ascend-only kernels (RmsNorm, ApplyRotaryPosEmb, FlashAttention/PagedAttention
with ReshapeAndCache) replaced by NumPy references it reproduced every canonical tensor, the
tokens and what-ifs of the torch backend; but no Ascend device ran it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np

from ptrace.backends.base import LoadOptions, layer_modules
from ptrace.backends.mindformers.convert import (
    ASCEND_MODEL_CLASSES,
    inference_config_values,
    load_inference_weights,
)
from ptrace.backends.mindformers.model import Emit, environment, hook_cell
from ptrace.backends.mindformers.tensor import dtype_name
from ptrace.bundle_spec.settings import UNKNOWN
from ptrace.errors import UsageError

if TYPE_CHECKING:  # mindspore is imported where it is used, so listing backends stays cheap
    import mindspore as ms


class AscendModel:
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

    def __init__(self, hf_config: dict, options: LoadOptions, seq_length: int) -> None:
        import importlib

        from mindformers.core.context import build_mf_context
        from mindformers.core.context.build_context import (
            MFContextOperator,
            is_legacy_model,
        )

        module_name, config_name, class_name = ASCEND_MODEL_CLASSES[hf_config["model_type"]]
        module = importlib.import_module(module_name)
        self.model_class = f"{module_name}.{class_name}"
        # The mcore classes need MindFormers' context with use_legacy=False (their weight-name
        # mapping refuses to run otherwise); MFContextOperator is a process-wide singleton.
        build_mf_context({"run_mode": "predict", "use_legacy": False})
        if is_legacy_model():
            MFContextOperator.get_mf_ctx_instance().set_context(run_mode="predict", use_legacy=False)
        self.config = getattr(module, config_name)(**inference_config_values(hf_config, options.dtype, seq_length,
                                                                                options.engine_options))
        self.block_size = int(self.config.block_size)
        self.seq_length = int(self.config.seq_length)
        with self._eager():
            self.model = getattr(module, class_name)(self.config)
        self.model.set_train(False)
        self.gpt = self.model.model
        load_inference_weights(self.model, options.model_dir, self.model_class)
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
    def _eager() -> AbstractContextManager[None]:
        """The switches under which MindFormers' ``@jit`` construct runs eagerly (hooks fire)."""
        return environment(ENFORCE_EAGER="true", RUN_MODE="predict")

    def info(self) -> dict[str, Any]:
        config = self.model.transformer_config
        return {
            "model_class": self.model_class,
            "compute_dtype": dtype_name(config.compute_dtype),
            "param_dtype": dtype_name(config.params_dtype),
            "layernorm_compute_dtype": dtype_name(config.layernorm_compute_dtype),
            "softmax_compute_dtype": dtype_name(config.softmax_compute_dtype),
            "rotary_dtype": dtype_name(config.rotary_dtype),
            "use_flash_attention": bool(config.use_flash_attention),
            "seq_length": self.seq_length,
            "kv_cache": f"paged: MindFormers BlockTables, block_size {self.block_size}, "
                        f"{self.seq_length // self.block_size} blocks",
            "execution": "PyNative, ENFORCE_EAGER=true (MindFormers' @jit construct runs eagerly)",
            "hardware_validated": False,
        }

    def resolved_settings(self) -> dict[str, Any]:
        """The precision the transformer was built with; the rest is not read back on Ascend yet
        (recorded as unknown)."""
        config = self.model.transformer_config
        return {"matmul_dtype": dtype_name(config.compute_dtype), "param_dtype": dtype_name(config.params_dtype),
                "norm_dtype": dtype_name(config.layernorm_compute_dtype),
                "softmax_dtype": dtype_name(config.softmax_compute_dtype),
                "rotary_dtype": dtype_name(config.rotary_dtype),
                "attention_backend": "flash_attention" if config.use_flash_attention else UNKNOWN}

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

    def install_hooks(self, wanted: set[str], emit: Emit, hooks: ExitStack) -> None:
        gpt = self.gpt

        def on_rows(name: str) -> Callable:
            def rows_hook(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor | None:
                return emit(name, output)  # rows are the step's positions already
            return rows_hook

        points = {"embed": gpt.embedding, "final_norm": gpt.decoder.final_layernorm,
                  "logits": gpt.output_layer,
                  **layer_modules(gpt.decoder.layers, "input_layernorm", "self_attention",
                                  "pre_mlp_layernorm", "mlp")}
        for name, cell in points.items():
            if name in wanted:
                hook_cell(hooks, cell, on_rows(name))
        rotary_cells: dict[int, Any] = {}
        rotary_wanted = any(f"layers.{i}.{part}" in wanted for i in range(self.num_layers) for part in "qk")
        for i, layer in enumerate(gpt.decoder.layers):
            if rotary_wanted:  # every layer, so that the shared rotary cell always knows its layer
                hook_cell(hooks, layer.self_attention, self._layer_marker(i), pre=True)
                rotary_cells.setdefault(id(layer.self_attention.rotary_emb), layer.self_attention.rotary_emb)
            if f"layers.{i}.v" in wanted:
                hook_cell(hooks, layer.self_attention.linear_qkv, self._value_hook(i, emit))
        for cell in rotary_cells.values():
            hook_cell(hooks, cell, self._rotary_hook(wanted, emit))

    def _layer_marker(self, layer: int) -> Callable:
        def marker(_cell: Any, _args: Any) -> None:
            self._layer = layer
        return marker

    def _rotary_hook(self, wanted: set[str], emit: Emit) -> Callable:
        """q and k after the rotary embedding, [tokens, heads * head_dim] each."""
        heads = {"q": self.n_heads, "k": self.n_kv_heads}

        def rotary_hook(_cell: Any, _args: Any, output: tuple) -> tuple | None:
            states = dict(zip(("q", "k"), output))
            changed = False
            for part in ("q", "k"):
                name = f"layers.{self._layer}.{part}"
                if name in wanted:
                    rows = states[part].reshape(-1, heads[part], self.head_dim)
                    new = emit(name, rows)
                    if new is not None:
                        states[part], changed = new.reshape(states[part].shape), True
            return (states["q"], states["k"]) if changed else None
        return rotary_hook

    def _value_hook(self, layer: int, emit: Emit) -> Callable:
        """v: the last kv_heads * head_dim columns of the fused q/k/v projection."""
        from mindspore import ops

        name = f"layers.{layer}.v"
        width = self.n_kv_heads * self.head_dim

        def value_hook(_cell: Any, _args: Any, qkv: ms.Tensor) -> ms.Tensor | None:
            split = qkv.shape[-1] - width
            new = emit(name, qkv[:, split:].reshape(-1, self.n_kv_heads, self.head_dim))
            if new is None:
                return None
            return ops.concat((qkv[:, :split], new.reshape(-1, width).astype(qkv.dtype)), axis=-1)
        return value_hook
