"""What runs inside vLLM's workers: hooks, read-backs and teacher forcing's record, reached
through ``LLM.collective_rpc``.

vLLM runs its model in workers: one in-process worker at ``tensor_parallel_size=1`` (ptrace's
engine core runs in-process), or one process per rank from vLLM's multiprocessing (or Ray)
executor at ``tensor_parallel_size > 1``. The engine driver (:mod:`ptrace.backends.vllm.engine`)
calls the functions here on every worker alike, so one code path serves both: ``collective_rpc``
calls ``fn(worker, *args)`` in each worker and returns one result per rank, in rank order. In a
worker process that is a plain import of this module (the functions travel by name), whose
module-level :data:`_session` holds the hooks of the running ``generate``.

Where the worker is in-process, the hooks call the capture's interceptors directly (they may
replace tensors). In a rank's own process they cannot: each rank's rows of each wanted tensor are
kept as raw bytes (:class:`~ptrace.backends.rank_gather.RankRows`), drained by the driver after every engine step (so a
capture's memory stays bounded by one step) and unsharded there (:mod:`ptrace.backends.sharding`).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from ptrace.backends.base import Interceptor
from ptrace.backends.rank_gather import RankKeeper
from ptrace.backends.vllm.forcing import ForcedTokens
from ptrace.backends.vllm.hooks import Intercept, VllmHooks
from ptrace.bundle_spec.settings import UNKNOWN


class _Session(RankKeeper):
    """One ``generate`` call's hooks in this rank's process, and what they kept since the last
    drain."""

    def __init__(self, rank: int, injections: tuple[list[Interceptor], list[Interceptor]]) -> None:
        super().__init__(rank, injections)
        self.hooks: VllmHooks | None = None
        self.stack = ExitStack()


_session: _Session | None = None


def _model(worker: Any) -> tuple[Any, Any]:
    runner = worker.model_runner
    return runner.get_model(), runner


def install(worker: Any, wanted: set[str], prompt_lengths: list[int], prompt_rows: bool,
            requests: dict[str, int], intercept: Intercept | None = None,
            injections: tuple[list[Interceptor], list[Interceptor]] | None = None) -> None:
    """Hook this worker's model for one ``generate``, and start recording forced steps' greedy
    choices. ``intercept`` (in-process only) shows tensors to the capture's interceptors; without
    it the rows are kept for :func:`drain`, after ``injections`` (the interceptors that replace
    tensors, before and after the rows are kept) ran on them."""
    global _session
    finish(worker)  # a previous call that failed half-way leaves no hooks behind
    model, runner = _model(worker)
    session = _Session(int(getattr(worker, "rank", 0)), injections or ([], []))
    session.hooks = VllmHooks(model, runner, intercept or session.intercept, set(wanted), prompt_lengths,
                              prompt_rows)
    session.hooks.requests = dict(requests)
    session.hooks.install(session.stack)
    session.stack.enter_context(ForcedTokens.recording())
    _session = session


def drain(worker: Any) -> list[tuple]:
    """The rows kept since the last drain (plain tuples of :class:`RankRows`), forgotten here."""
    return [] if _session is None else _session.drain()


def finish(worker: Any) -> dict[str, Any] | None:
    """Unhook; the call's schedule steps and forced steps' greedy choices (``[request, step,
    token]`` triples: msgpack keeps no integer keys)."""
    global _session
    if _session is None:
        return None
    session, _session = _session, None
    choices = ForcedTokens.choices or {}
    result = {"schedule": [step.to_dict() for step in session.hooks.schedule] if session.hooks else [],
              "choices": [[request, step, token] for request, steps in choices.items()
                          for step, token in steps.items()]}
    session.stack.close()
    return result


def read_back(worker: Any) -> dict[str, Any]:
    """The engine facts read back from this worker's model and config: ``engine_info``,
    ``resolved_settings`` and the decoder's layer count."""
    model, runner = _model(worker)
    config = worker.vllm_config
    return {"engine": _engine_info(model, runner, config), "settings": _resolved_settings(model, config),
            "num_layers": len(model.model.layers)}


def _engine_info(model: Any, runner: Any, config: Any) -> dict[str, Any]:
    """The engine settings that change numerics (``meta/run.engine``), as this worker runs them."""
    attention = model.model.layers[0].self_attn.attn
    return {
    "torch": torch.__version__,
        "platform": runner.device.type,
        "dtype": str(config.model_config.dtype).removeprefix("torch."),
        "kv_cache_dtype": config.cache_config.cache_dtype,
        "block_size": config.cache_config.block_size,
        "enable_prefix_caching": config.cache_config.enable_prefix_caching,
        "attention_backend": attention.attn_backend.get_name(),
        "enforce_eager": config.model_config.enforce_eager,
        "compilation_mode": str(config.compilation_config.mode),
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "enable_chunked_prefill": config.scheduler_config.enable_chunked_prefill,
        "max_model_len": config.model_config.max_model_len,
        "logprobs_mode": config.model_config.logprobs_mode,
        "seed": config.model_config.seed,
        "num_threads": torch.get_num_threads(),
        "model_class": type(model).__name__,
    }

def _resolved_settings(model: Any, config: Any) -> dict[str, Any]:
    """The arithmetic settings read back from the model (its layers' norm, rotary embedding,
    attention layer and kernel, LM head) and the engine's own config, not from config.json."""
    import vllm.envs

    from ptrace.backends import torch_settings as ts

    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    kernel = attention.attn.impl
    dtype = ts.dtype_name(config.model_config.dtype)
    kv_dtype = ts.dtype_name(attention.attn.kv_cache_torch_dtype)
    soft_cap = getattr(kernel, "logits_soft_cap", None) or None  # the CPU kernel writes 0 for none
    values: dict[str, Any] = {
        **ts.torch_numerics(), **_rope_settings(attention.rotary_emb),
        "norm_eps": ts.norm_eps(layer.input_layernorm),
        "hidden_act": _ACTIVATIONS.get(type(getattr(mlp, "act_fn", None)).__name__, UNKNOWN),
        "tie_word_embeddings": ts.is_tied(model.lm_head, model.model.embed_tokens),
        "attention_scale": float(kernel.scale),
        "attn_logit_softcap": soft_cap,
        "final_logit_softcap": getattr(model.logits_processor, "soft_cap", UNKNOWN),
        "sliding_window": ts.one_value([decoder.self_attn.attn.sliding_window for decoder in model.model.layers]),
        "param_dtype": ts.dtype_name(model.model.embed_tokens.weight.dtype),
        "residual_dtype": dtype,
        "rotary_dtype": ts.dtype_name(attention.rotary_emb.cos_sin_cache.dtype),
        "kv_cache_dtype": kv_dtype,
        "kv_cache_scales": None if kv_dtype == dtype else _kv_scales(attention.attn),
        "attention_backend": attention.attn.attn_backend.get_name(),
        "chunked_prefill": config.scheduler_config.enable_chunked_prefill,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "prefix_caching": config.cache_config.enable_prefix_caching,
        "batch_invariant": vllm.envs.VLLM_BATCH_INVARIANT,
        "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        "pipeline_parallel_size": config.parallel_config.pipeline_parallel_size,
        "logprobs_mode": config.model_config.logprobs_mode,
        "seed": config.model_config.seed,
    }
    projection = getattr(attention, "qkv_proj", None)
    if projection is not None:
        values["qkv_bias"] = projection.bias is not None
        values["matmul_dtype"] = ts.dtype_name(projection.weight.dtype)
    experts = getattr(mlp, "experts", None)
    values["moe_top_k"] = getattr(experts, "top_k", UNKNOWN) if experts is not None else None
    values["moe_norm_topk_prob"] = getattr(experts, "renormalize", UNKNOWN) if experts is not None else None
    if ts.full_precision(dtype):  # the CPU kernels then compute softmax and norms in it
        values["softmax_dtype"] = values["norm_dtype"] = dtype
    return values


#: vLLM's fused activation classes -> HF's ``hidden_act``.
_ACTIVATIONS = {"SiluAndMul": "silu", "GeluAndMul": "gelu", "FastGELU": "gelu_fast", "NewGELU": "gelu_new",
                "QuickGELU": "quick_gelu"}
#: vLLM's rotary embedding classes -> HF's ``rope_type``.
_ROPE_TYPES = {"RotaryEmbedding": "default", "LinearScalingRotaryEmbedding": "linear",
               "DynamicNTKScalingRotaryEmbedding": "dynamic", "YaRNScalingRotaryEmbedding": "yarn",
               "Llama3RotaryEmbedding": "llama3"}


def _rope_settings(rotary: Any) -> dict[str, Any]:
    """Rope as vLLM's rotary embedding object holds it (its base, rotated dimensions, pairing)."""
    kind = _ROPE_TYPES.get(type(rotary).__name__, UNKNOWN)
    return {"rope_theta": float(rotary.base), "rope_type": kind,
            "rope_scaling_factor": None if kind == "default" else getattr(rotary, "scaling_factor", UNKNOWN),
            "partial_rotary_factor": rotary.rotary_dim / rotary.head_size,
            "rope_layout": "half-split" if rotary.is_neox_style else "interleaved"}


def _kv_scales(attention: Any) -> str:
    """The scales a quantized KV cache is written with, as ``"k=S, v=S"``: the attention layer's
    ``_k_scale`` / ``_v_scale`` buffers (1.0 unless the checkpoint brings its own)."""
    buffers = dict(attention.named_buffers())
    if "_k_scale" not in buffers or "_v_scale" not in buffers:
        return UNKNOWN
    return f"k={float(buffers['_k_scale']):g}, v={float(buffers['_v_scale']):g}"
