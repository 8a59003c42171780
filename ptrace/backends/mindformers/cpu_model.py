"""MindFormers on CPU: the legacy ``LlamaForCausalLM`` (the one MindFormers model whose kernels
all exist on CPU; with biases on q/k/v it is Qwen2), run in PyNative mode.

That model has no KV cache on CPU (``use_past`` needs Ascend kernels), so :class:`CpuModel`
keeps one itself and decodes incrementally, as a KV-cache engine does: the keys and values of
every position are kept as they were computed at their own step (after any interceptor replaced
them), and a decode step runs the model on its new position only, with the rotary angles taken at
that position. The cache enters where the attention joins a prefix's keys and values to the new
ones (``_cat_prefix``, MindFormers' prefix-tuning path): ptrace's own join puts the cached keys and
values (already in the attention's [batch, kv_heads, positions, head_dim] layout) before the new
ones and keeps the result for the next step, a concatenation per tensor, no layout changes. The
new position attends to every cached one unmasked, as a prefix is attended to. Earlier positions
can influence a new one only through their keys and values, so the new rows are what a KV-cache
engine computes, and a what-if that replaces a value (or anything upstream of it) persists in the
cache as it would there.
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
from ptrace.bundle_spec.settings import UNKNOWN
from ptrace.errors import UsageError

if TYPE_CHECKING:  # mindspore is imported where it is used, so listing backends stays cheap
    import mindspore as ms


def _theta_from_table(freqs_sin: Any) -> float:
    """The rotary base of an unscaled table: row 1 holds ``sin(theta^(-2i/d))``, and its last
    column's angle, ``asin`` of it, is ``theta^(-(d-2)/d)`` (the frequencies are repeated over
    both halves of the head)."""
    row = freqs_sin.asnumpy()[1].astype(np.float64)
    rotated = row.shape[0]
    theta = float(np.arcsin(row[-1])) ** (-rotated / (rotated - 2))
    return float(f"{theta:.6g}")


def _activation(act: Any) -> str:
    """HF's name of the feed-forward's activation: given as a name, or as MindFormers' cell class."""
    if isinstance(act, str):
        return act
    return {"LlamaSiLU": "silu", "SiLU": "silu"}.get(getattr(act, "__name__", ""), UNKNOWN)


class CpuModel:
    """MindFormers' legacy LlamaForCausalLM in PyNative mode, KV cache emulated (module docstring)."""

    model_class = "mindformers.models.llama.LlamaForCausalLM"

    def __init__(self, hf_config: dict, options: LoadOptions, seq_length: int) -> None:
        from mindformers.models.llama import LlamaForCausalLM

        self.seq_length = seq_length
        self.config = llama_config(hf_config, options.dtype, seq_length, options.engine_options)
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
        #: layer -> (keys, values) of every position so far, [batch, kv_heads, positions, head_dim]
        self.cache: dict[int, tuple[ms.Tensor, ms.Tensor]] = {}
        self._start = 0  # first position of the running forward pass (the cache holds those before)
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
            "kv_cache": "ptrace's own: a decode step computes its new position only, earlier "
                        "positions' keys and values joined to its own as a prefix's are",
        }

    def resolved_settings(self) -> dict[str, Any]:
        """Read back from the built cells (the norms' epsilon and dtype, the attention's softmax
        dtype and scale, the rotary table) and the config they were built from."""
        decoder, config = self.model.model, self.config
        layer = decoder.layers[0]
        attention, norm = layer.attention, layer.attention_norm
        compute = dtype_name(attention.dtype)
        head = self.model.lm_head.weight
        scaled = config.extend_method not in (None, "None")
        return {
            "norm_eps": float(norm.eps), "norm_dtype": dtype_name(norm.compute_type),
            "rope_theta": float(config.theta) if scaled else _theta_from_table(decoder.freqs_mgr.freqs_sin),
            "rope_type": str(config.extend_method).lower() if scaled else "default",
            "rope_scaling_factor": (config.scaling_factor or {}).get("factor") if scaled else None,
            "partial_rotary_factor": decoder.freqs_mgr.head_dim / self.head_dim,
            "rope_layout": "half-split" if config.use_rope_slice else UNKNOWN,
            "hidden_act": _activation(layer.feed_forward.hidden_act),
            "tie_word_embeddings": head is decoder.tok_embeddings.embedding_weight,
            "attention_scale": float(attention.inv_norm_factor.asnumpy()),
            "attn_logit_softcap": None, "final_logit_softcap": None,  # the legacy Llama has none
            "sliding_window": None,  # nor a window (convert refuses configs that ask for one)
            "qkv_bias": bool(attention.wq.has_bias),
            "moe_top_k": None, "moe_norm_topk_prob": None,  # built dense (convert)
            "param_dtype": dtype_name(attention.wq.weight.dtype), "matmul_dtype": compute,
            "softmax_dtype": dtype_name(attention.softmax_dtype),
            "rotary_dtype": dtype_name(decoder.freqs_mgr.freqs_cos.dtype),
            "residual_dtype": dtype_name(layer.residual_dtype),
            "kv_cache_dtype": compute,  # ptrace's own cache keeps k and v as the attention computed them
            "kv_cache_scales": None,
            "attention_backend": "flash_attention" if attention.use_flash_attention else "LLamaAttention._attn",
        }

    def check_length(self, longest: int) -> None:
        if longest > self.seq_length:
            raise UsageError(f"a request needs {longest} positions but the ms backend was built "
                             f"for {self.seq_length}",
                             hint=f"pass --engine-option seq_length={longest}")

    def start_request(self) -> None:
        self.cache.clear()

    def forward(self, sequence: list[int], start: int) -> np.ndarray:
        """Logits (float32) of positions ``start:`` of ``sequence``, earlier positions coming
        from the cache.

        The prefill computes every position's logits (prompt logprobs and the "logits" tensor
        need them); a later step has one position, its new one."""
        import mindspore as ms

        self._start = start
        input_ids = ms.Tensor(np.asarray(sequence[start:], np.int32)[None])
        logits = self.model(input_ids)[0]  # the attention's joins bring in the cache (module docstring)
        return logits.asnumpy().reshape(-1, self.config.vocab_size).astype(np.float32, copy=False)

    def install_hooks(self, wanted: set[str], emit: Emit, hooks: ExitStack) -> None:
        self._emit = emit
        decoder = self.model.model

        def on_states(name: str) -> Callable:
            def states_hook(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor:
                return self._emit_rows(name, output, lambda t: t[0], lambda t: t[None])
            return states_hook

        def on_logits(_cell: Any, _args: Any, output: ms.Tensor) -> ms.Tensor | None:
            # The LM head only ever sees this step's positions.
            new = emit("logits", output.reshape(-1, output.shape[-1]))
            return None if new is None else new.reshape(output.shape)

        points = {"embed": decoder.tok_embeddings, "final_norm": decoder.norm_out,
                  **layer_modules(decoder.layers, "attention_norm", "attention", "ffn_norm", "feed_forward")}
        for name, cell in points.items():
            if name in wanted:
                hook_cell(hooks, cell, on_states(name))
        if "logits" in wanted:
            hook_cell(hooks, self.model.lm_head, on_logits)
        for i, layer in enumerate(decoder.layers):
            if {f"layers.{i}.q", f"layers.{i}.k"} & wanted:
                hook_cell(hooks, layer.attention.apply_rotary_emb, self._rotary_hook(i, wanted))
            if f"layers.{i}.v" in wanted:
                hook_cell(hooks, layer.attention.wv, self._value_hook(i))
        # Always installed, observed or not: they make a decode step attend to the cache.
        hook_cell(hooks, decoder.freqs_mgr, self._positions_hook)
        for i, layer in enumerate(decoder.layers):
            layer.attention._cat_prefix = self._join_cache(i)  # shadows the method of the class
            hooks.callback(delattr, layer.attention, "_cat_prefix")

    def _emit_rows(self, name: str, states: ms.Tensor, to_rows: Callable[[ms.Tensor], ms.Tensor],
                   from_rows: Callable[[ms.Tensor], ms.Tensor]) -> ms.Tensor:
        """``states`` (this step's positions), or the interceptors' replacement of them."""
        new = self._emit(name, to_rows(states))
        return states if new is None else from_rows(new)

    def _positions_hook(self, _cell: Any, _args: Any, output: tuple) -> tuple | None:
        """The rotary angles of a decode step's positions: the model takes them from position 0,
        as it knows nothing of the cache. Slices of the same table, so the same numbers as a
        recomputation of the whole sequence would use."""
        if not self._start:
            return None
        cos, _sin, swap_mask = output
        freqs = self.model.model.freqs_mgr
        positions = slice(self._start, self._start + cos.shape[2])
        return (freqs.freqs_cos[positions][None, None], freqs.freqs_sin[positions][None, None], swap_mask)

    def _rotary_hook(self, layer: int, wanted: set[str]) -> Callable:
        """q and k after the rotary embedding, [batch, heads, positions, head_dim]."""
        def to_rows(states: ms.Tensor) -> ms.Tensor:
            return states[0].swapaxes(0, 1)  # -> [positions, heads, head_dim]

        def from_rows(rows: ms.Tensor) -> ms.Tensor:
            return rows.swapaxes(0, 1)[None]

        def rotary_hook(_cell: Any, _args: Any, output: tuple) -> tuple:
            query, key = output
            if f"layers.{layer}.q" in wanted:
                query = self._emit_rows(f"layers.{layer}.q", query, to_rows, from_rows)
            if f"layers.{layer}.k" in wanted:
                key = self._emit_rows(f"layers.{layer}.k", key, to_rows, from_rows)
            return query, key
        return rotary_hook

    def _value_hook(self, layer: int) -> Callable:
        """v as the value projection returns it, [batch, positions, kv_heads * head_dim]."""
        heads, head_dim = self.n_kv_heads, self.head_dim

        def value_hook(_cell: Any, _args: Any, value: ms.Tensor) -> ms.Tensor:
            return self._emit_rows(f"layers.{layer}.v", value, lambda t: t[0].reshape(-1, heads, head_dim),
                                   lambda t: t.reshape(1, -1, heads * head_dim))
        return value_hook

    def _join_cache(self, layer: int) -> Callable:
        """The attention's join of a prefix's keys and values to the new ones, made the KV cache of
        ``layer``: earlier steps' keys and values (after the rotary embedding and any interceptor's
        replacement) before this step's, the whole kept for the next step."""
        from mindspore import ops

        def join(key: ms.Tensor, value: ms.Tensor, _prefix: None) -> tuple[ms.Tensor, ms.Tensor]:
            if self._start:  # [batch, kv_heads, positions, head_dim]: positions are axis 2
                cached_key, cached_value = self.cache[layer]
                key, value = ops.concat((cached_key, key), axis=2), ops.concat((cached_value, value), axis=2)
            self.cache[layer] = key, value
            return key, value
        return join
