"""MindFormers on CPU: the legacy ``LlamaForCausalLM`` (the one MindFormers model whose kernels
all exist on CPU; with biases on q/k/v it is Qwen2), run in PyNative mode.

That model has no KV cache on CPU (``use_past`` needs Ascend kernels), so every step recomputes
the whole sequence. :class:`CpuModel` hides this completely: interceptors see only each step's
new positions, and the keys and values of earlier positions are frozen as they were computed at
their own step (after any interceptor replaced them) and substituted into every later
recomputation, in every layer. Earlier positions can influence a new one only through their keys
and values, so the new rows are exactly what a KV-cache engine computes, and a what-if that
replaces a value (or anything upstream of it) persists in the "cache" as it would there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np

from ptrace.backends.base import LoadOptions, layer_modules
from ptrace.backends.mindformers.convert import llama_config, load_llama_weights
from ptrace.backends.mindformers.model import Emit, environment, hook_cell
from ptrace.backends.mindformers.tensor import dtype_name
from ptrace.errors import UsageError

if TYPE_CHECKING:  # mindspore is imported where it is used, so listing backends stays cheap
    import mindspore as ms


class CpuModel:
    """MindFormers' legacy LlamaForCausalLM in PyNative mode, KV cache emulated (module docstring)."""

    model_class = "mindformers.models.llama.LlamaForCausalLM"

    def __init__(self, hf_config: dict, options: LoadOptions, seq_length: int) -> None:
        from mindformers.models.llama import LlamaForCausalLM

        self.seq_length = seq_length
        self.config = llama_config(hf_config, options.dtype, seq_length)
        # ENFORCE_EAGER is MindFormers' switch for PyNative inference: without it the causal mask
        # is not cut to the input's length, and every input must be padded to seq_length.
        with environment(ENFORCE_EAGER="true"):
            self.model = LlamaForCausalLM(self.config)
        self.model.set_train(False)
        load_llama_weights(self.model, options.model_dir, self.config)
        self.num_layers = self.config.num_layers
        self.n_heads = self.config.num_heads
        self.n_kv_heads = self.config.n_kv_heads or self.n_heads
        self.head_dim = self.config.hidden_size // self.n_heads
        self.frozen_keys: dict[int, ms.Tensor] = {}
        self.frozen_values: dict[int, ms.Tensor] = {}
        self._start = 0  # first new position of the running forward pass
        self._emit: Emit = lambda _name, _rows: None

    def info(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "compute_dtype": dtype_name(self.config.compute_dtype),
            "param_dtype": dtype_name(self.config.param_init_type),
            "layernorm_compute_dtype": dtype_name(self.config.layernorm_compute_type),
            "softmax_compute_dtype": dtype_name(self.config.softmax_compute_type),
            "rotary_dtype": dtype_name(self.config.rotary_dtype),
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

        self._start = start
        input_ids = ms.Tensor(np.asarray(sequence, np.int32)[None])
        if start == 0:
            logits = self.model(input_ids)[0]
        else:
            logits = self.model(input_ids, batch_valid_length=ms.Tensor([len(sequence)], ms.int32))[0]
        return logits.asnumpy().reshape(-1, self.config.vocab_size).astype(np.float32, copy=False)

    def install_hooks(self, wanted: set[str], emit: Emit, hooks: ExitStack) -> None:
        self._emit = emit
        decoder = self.model.model

        def on_states(name: str) -> Callable:
            def states_hook(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor:
                return self._emit_rows(name, output, 1, lambda t: t[0], lambda t: t[None])
            return states_hook

        def on_logits(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor | None:
            # The LM head only ever sees this step's positions (forward() gathers before it).
            new = emit("logits", output.reshape(-1, output.shape[-1]))
            return None if new is None else new.reshape(output.shape)

        points = {"embed": decoder.tok_embeddings, "final_norm": decoder.norm_out,
                  **layer_modules(decoder.layers, "attention_norm", "attention", "ffn_norm", "feed_forward")}
        for name, cell in points.items():
            if name in wanted:
                hook_cell(hooks, cell, on_states(name))
        if "logits" in wanted:
            hook_cell(hooks, self.model.lm_head, on_logits)
        # Always installed, observed or not: the frozen keys and values are the emulated cache.
        for i, layer in enumerate(decoder.layers):
            hook_cell(hooks, layer.attention.apply_rotary_emb, self._rotary_hook(i, wanted))
            hook_cell(hooks, layer.attention.wv, self._value_hook(i, wanted))

    def _emit_rows(self, name: str, states: ms.Tensor, axis: int,
                   to_rows: Callable[[ms.Tensor], ms.Tensor],
                   from_rows: Callable[[ms.Tensor], ms.Tensor]) -> ms.Tensor:
        """Emit the new positions of ``states`` (the whole recomputed sequence, positions on
        ``axis``); ``states`` with the interceptors' replacement of those positions, if any."""
        from mindspore import ops

        start = self._start
        new = self._emit(name, to_rows(states[(slice(None),) * axis + (slice(start, None),)]))
        if new is None:
            return states
        history = states[(slice(None),) * axis + (slice(0, start),)]
        return ops.concat((history, from_rows(new)), axis=axis) if start else from_rows(new)

    def _rotary_hook(self, layer: int, wanted: set[str]) -> Callable:
        """q and k after the rotary embedding, [batch, heads, positions, head_dim]."""
        from mindspore import ops

        def to_rows(states: ms.Tensor) -> ms.Tensor:
            return states[0].swapaxes(0, 1)  # -> [positions, heads, head_dim]

        def from_rows(rows: ms.Tensor) -> ms.Tensor:
            return rows.swapaxes(0, 1)[None]

        def rotary_hook(_cell: Any, _args: Any, output: tuple) -> tuple:
            query, key = output
            if self._start:
                key = ops.concat((self.frozen_keys[layer], key[:, :, self._start:]), axis=2)
            if f"layers.{layer}.q" in wanted:
                query = self._emit_rows(f"layers.{layer}.q", query, 2, to_rows, from_rows)
            if f"layers.{layer}.k" in wanted:
                key = self._emit_rows(f"layers.{layer}.k", key, 2, to_rows, from_rows)
            self.frozen_keys[layer] = key
            return query, key
        return rotary_hook

    def _value_hook(self, layer: int, wanted: set[str]) -> Callable:
        """v as the value projection returns it, [batch, positions, kv_heads * head_dim]."""
        from mindspore import ops

        heads, head_dim = self.n_kv_heads, self.head_dim

        def value_hook(_cell: Any, _args: Any, value: ms.Tensor) -> ms.Tensor:
            if self._start:
                value = ops.concat((self.frozen_values[layer], value[:, self._start:]), axis=1)
            if f"layers.{layer}.v" in wanted:
                value = self._emit_rows(
                    f"layers.{layer}.v", value, 1,
                    lambda t: t[0].reshape(-1, heads, head_dim), lambda t: t.reshape(1, -1, heads * head_dim))
            self.frozen_values[layer] = value
            return value
        return value_hook
