"""PyTorch + HF transformers: the reference most people trust (``--backend torch``).

The model runs one request at a time in ptrace's own decode loop (:mod:`.sequential`) over a
``DynamicCache`` (no batching, no padding), so every forward pass maps to one step of one request
and every activation row to one position. With ``padded_batch=N`` the request is row 0 of a batch
whose N other rows are left-padded companions, as HF batched generation runs it: the reference's
own answer to whether a batch changes a request (row 0 is the only one shown). Canonical tensors come from forward hooks on the HF modules,
except q/k/v: HF applies the rotary embedding in a plain function, so ptrace registers an
attention implementation that wraps the model's own one and sees q, k, v exactly as they enter
attention (k and v are then the KV cache's own storage, so a replaced k or v persists in the
cache, as an error-injection what-if needs). In a sparse-MoE layer the router module's output
(logits, combine weights, expert ids) gives the routing tensors (:mod:`ptrace.backends.routing`).

With ``tensor_parallel_size=N`` the model runs split over N ranks by transformers' own plan,
ptrace's process being rank 0 (:mod:`ptrace.backends.torch_parallel`): every rank runs this same
decode loop and hooks, rank 0 gathers the ranks' rows and shows the interceptors the unsharded
tensors.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ptrace.backends import routing, sharding, torch_parallel
from ptrace.backends.base import (
    Capabilities,
    EngineOption,
    EngineTensor,
    Generation,
    Interceptor,
    LoadOptions,
    StepCallback,
    TensorSite,
    intercept_all,
    layer_modules,
)
from ptrace.backends.model_dir import read_config
from ptrace.backends.rank_gather import RankGather, RankKeeper, split_interceptors
from ptrace.backends.sequential import SequentialBackend
from ptrace.backends.torch_parallel import TP_SIZE
from ptrace.backends.torch_tensor import TorchTensor
from ptrace.bundle_spec.names import MOE_PARTS
from ptrace.bundle_spec.schema import ParallelInfo, SamplingParams
from ptrace.bundle_spec.settings import UNKNOWN
from ptrace.errors import BackendError, BackendUnavailableError, ModelError

if TYPE_CHECKING:  # torch is imported where it is used, so listing backends stays cheap
    import torch

_ATTENTION_PREFIX = "ptrace_"
#: The engine option that runs every request inside a padded batch (``batch:padded=N``).
PADDED_BATCH = "padded_batch"


def _wrapped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Attention implementation registered as "ptrace_<inner>": lets the backend see q/k/v, then
    delegates to the implementation the model was loaded with."""
    observe = getattr(module, "_ptrace_observe_qkv", None)
    if observe is not None:
        query, key, value = observe(module, query, key, value)
    return module._ptrace_inner_attention(module, query, key, value, *args, **kwargs)


class TorchBackend(SequentialBackend):
    name = "torch"
    description = "PyTorch + HF transformers (reference implementation)"
    requires = ("torch", "transformers")
    packages = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "triton",
                "flash-attn", "xformers", "intel-extension-for-pytorch", "torch-npu")
    options = (
        EngineOption("attn_implementation", str, "HF attention implementation (eager, sdpa, "
                     "flash_attention_2, ...)", default="sdpa"),
        EngineOption("float32_matmul_precision", str, "torch's float32 matmul precision: highest, high "
                     "(TF32 or bfloat16 passes where the hardware has them), medium",
                     choices=("highest", "high", "medium")),
        EngineOption(PADDED_BATCH, int, "run each request as the first row of a batch with this many "
                     "left-padded companion rows of seeded tokens (0: alone)", default=0, minimum=0),
        EngineOption(TP_SIZE, int, "ranks the model is split over by transformers' own tensor-parallel "
                     "plan (torch.distributed: gloo on the CPU, NCCL on CUDA; needs accelerate)", minimum=1),
    )
    capabilities = Capabilities(devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16", "float64"))
    tensor_type = TorchTensor

    def __init__(self, rank: int = 0) -> None:
        super().__init__()
        #: This process's rank in a tensor-parallel run (0: ptrace's own process, the driver).
        self.rank = rank
        #: The other ranks, in a tensor-parallel run (rank 0 starts them in ``_load``).
        self.ranks: torch_parallel.Ranks | None = None
        self._parallel: ParallelInfo | None = None
        # A running generate's side of the ranks: this rank's rows, and rank 0's unsharding.
        self._keeper: RankKeeper | None = None
        self._gather: RankGather | None = None

    @classmethod
    def install_hint(cls) -> str:
        return "install it with: pip install 'ptrace-llm[torch]' (or run `make setup`)"

    @classmethod
    def check_engine_options(cls, options: Mapping[str, Any], model_dir: Path, model_config: Mapping[str, Any],
                             device: str) -> None:
        """Refuse a tensor-parallel size this model, this machine or this environment cannot take."""
        torch_parallel.check(int(options.get(TP_SIZE) or 1), model_dir, model_config, device)

    def _load(self, options: LoadOptions) -> None:
        import torch
        import transformers

        device = torch.device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {options.device} requested but torch sees no CUDA GPU",
                                          hint="use --device cpu")
        attn = options.engine_options["attn_implementation"]
        precision = options.engine_options.get("float32_matmul_precision")
        self._restore_precision = torch.get_float32_matmul_precision()
        if precision is not None:  # process-wide in torch: put back by close()
            torch.set_float32_matmul_precision(precision)
        transformers.utils.logging.disable_progress_bar()
        size = int(options.engine_options.get(TP_SIZE) or 1)
        split, placed = {}, contextlib.nullcontext()
        if size > 1:
            device, split, placed = self._start_ranks(size, options)
        try:
            self._load_model(options, device, attn, split, placed)
        except BaseException:
            self.close()  # the other ranks, if any, end with this one
            raise
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._cache: transformers.DynamicCache | None = None
        self._companions = int(options.engine_options[PADDED_BATCH])
        self._mask: torch.Tensor | None = None  # the padded batch's attention mask so far

    def _load_model(self, options: LoadOptions, device: torch.device, attn: str, split: dict[str, Any],
                    placed: Any) -> None:
        """The tokenizer and the model, whole or (``split``: the load's arguments) this rank's share."""
        import torch
        import transformers

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(options.model_dir,
                                                                        trust_remote_code=False)
            with placed:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    options.model_dir, dtype=getattr(torch, options.dtype), attn_implementation=attn,
                    trust_remote_code=False, **split)
            self.model = (model if split else model.to(device)).eval()  # a split model is placed already
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"transformers cannot load {options.model_dir}: {exc}") from exc
        self.device = device
        self.attn_implementation = attn
        decoder = self.model.get_decoder()
        self._layers = list(decoder.layers)
        self._final_norm = decoder.norm

    def _start_ranks(self, size: int, options: LoadOptions) -> tuple[torch.device, dict[str, Any], Any]:
        """Before a split load: the other ranks started (on rank 0) and joined, this rank's
        device and share of the CPUs, the load's arguments and its context (the launcher's
        variables transformers reads, and a failing rank's error in place of the collective's)."""
        import torch
        from transformers.distributed import DistributedConfig

        config = read_config(options.model_dir)
        torch_parallel.check(size, options.model_dir, config, options.device)
        if self.ranks is None:  # rank 0; a helper's own are set before its load
            self.ranks = torch_parallel.Ranks(size, options, type(self))
        self._restore_threads = torch.get_num_threads()
        torch.set_num_threads(torch_parallel.threads_per_rank(size))
        heads = int(config.get("num_attention_heads", 0))
        self._parallel = ParallelInfo(tensor_parallel_size=size, heads=heads,
                                      kv_heads=int(config.get("num_key_value_heads") or heads),
                                      executor=torch_parallel.process_group_backend(options.device))
        device = torch.device("cuda", self.rank) if options.device.startswith("cuda") else torch.device("cpu")
        placed = ExitStack()
        placed.enter_context(torch_parallel.rank_environment(self.rank, size))
        placed.enter_context(self.ranks.failures())
        return device, {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=size)}, placed

    def close(self) -> None:
        import torch

        previous = getattr(self, "_restore_precision", None)
        if previous is not None:
            torch.set_float32_matmul_precision(previous)
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
            torch.set_num_threads(self._restore_threads)

    # -- engine facts --------------------------------------------------------------------------
    def set_seed(self, seed: int) -> dict[str, int]:
        import torch

        torch.manual_seed(seed)
        return {"torch": seed}

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def version(self) -> str:
        import torch

        return torch.__version__

    def engine_info(self) -> dict[str, Any]:
        import torch
        import transformers

        info: dict[str, Any] = {
            "torch": torch.__version__,
            PADDED_BATCH: self._companions,
            "transformers": transformers.__version__,
            "attn_implementation": self.attn_implementation,
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "mkldnn_enabled": torch.backends.mkldnn.enabled,
        }
        if self._parallel is not None:
            info.update(tensor_parallel_size=self._parallel.tensor_parallel_size,
                        process_group_backend=self._parallel.executor)
        if self.device.type == "cuda":
            info.update({
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "gpu": torch.cuda.get_device_name(self.device),
                "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
                "fp16_reduced_precision_reduction":
                    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                "bf16_reduced_precision_reduction":
                    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            })
        return info

    def resolved_settings(self) -> dict[str, Any]:
        """Read back from the loaded modules (``ptrace.backends.torch_settings``); config keys
        only from the config object the modules were built from, never from config.json."""
        from ptrace.backends import torch_settings as ts

        config, layer = self.model.config, self._layers[0]
        attention, mlp = layer.self_attn, layer.mlp
        dtype = ts.dtype_name(self.model.dtype)
        values: dict[str, Any] = {
            **ts.torch_numerics(), **_rope_settings(self.model, attention),
            "norm_eps": ts.norm_eps(layer.input_layernorm),
            "hidden_act": getattr(config, "hidden_act", None) if hasattr(mlp, "act_fn") else None,
            "tie_word_embeddings": ts.is_tied(self.model.get_output_embeddings(), self.model.get_input_embeddings()),
            "attention_scale": getattr(attention, "scaling", None),
            "attn_logit_softcap": getattr(attention, "attn_logit_softcapping", None),
            "final_logit_softcap": getattr(config, "final_logit_softcapping", None),
            "sliding_window": ts.one_value([getattr(decoder.self_attn, "sliding_window", None) for decoder in self._layers]),
            "param_dtype": ts.dtype_name(self.model.get_input_embeddings().weight.dtype),
            "residual_dtype": dtype, "rotary_dtype": dtype,  # HF casts cos/sin to the hidden states' dtype
            "kv_cache_dtype": dtype,  # a DynamicCache keeps k and v as computed
            "kv_cache_scales": None,
            "attention_backend": self.attn_implementation,
            # ptrace's own loop: one request at a time, the whole prompt in one forward pass
            "chunked_prefill": False, "max_num_batched_tokens": None, "prefix_caching": False,
            "tensor_parallel_size": self._parallel.tensor_parallel_size if self._parallel else 1,
            "pipeline_parallel_size": 1,
            "logprobs_mode": "raw_logprobs",  # log_softmax of the raw logits (SequentialBackend)
        }
        projection = getattr(attention, "q_proj", None)
        if projection is not None:
            values["qkv_bias"] = projection.bias is not None
            values["matmul_dtype"] = ts.dtype_name(projection.weight.dtype)
        experts = getattr(mlp, "experts", None)
        router = getattr(mlp, "gate", mlp)
        values["moe_top_k"] = getattr(router, "top_k", getattr(mlp, "top_k", UNKNOWN)) if experts is not None else None
        values["moe_norm_topk_prob"] = (getattr(router, "norm_topk_prob", getattr(mlp, "norm_topk_prob", UNKNOWN))
                                        if experts is not None else None)
        if self.attn_implementation == "eager":  # HF's eager attention: softmax(..., dtype=torch.float32)
            values["softmax_dtype"] = "float32"
        elif ts.full_precision(dtype):
            values["softmax_dtype"] = dtype
        values["norm_dtype"] = _norm_dtype(layer.input_layernorm, dtype)
        return values

    def parallel(self) -> ParallelInfo | None:
        """The last generate's layout; before any, the loaded model's sizes (None on one rank)."""
        return getattr(self, "_layout", None) or self._parallel

    # -- generation ----------------------------------------------------------------------------
    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        """On one rank, the sequential loop. Split over ranks: the helpers mirror the call; the
        observers see the unsharded tensors, the what-ifs act in every rank on its shard."""
        if self._parallel is None:
            return super()._generate(prompts, sampling, interceptors, on_step, forced)
        if self.ranks is None:
            raise BackendError("this tensor-parallel engine ended after a failed call", hint="load it again")
        wanted = self.wanted_tensors(interceptors)
        observers, injections, per_rank = split_interceptors(interceptors, wanted)
        gather = RankGather(replace(self._parallel, per_rank=per_rank), partial(intercept_all, observers))
        try:
            with self.ranks.failures():
                self.ranks.generate({"prompts": prompts, "sampling": sampling, "wanted": wanted,
                                     "injections": injections, "forced": forced})
                self._gather = gather
                generations = self.mirror(prompts, sampling, wanted, injections, forced, on_step)
        except BaseException:
            self.close()  # a call that failed half-way leaves the ranks out of step: end them
            raise
        layout = gather.layout(wanted, self.num_layers, self.moe_layers)
        # transformers' plan leaves the embedding whole on every rank (vLLM splits its vocabulary)
        self._layout = replace(layout, tensors=tuple(replace(t, unsharded=sharding.REPLICATED) if t.name == "embed"
                                                     else t for t in layout.tensors))
        return generations

    def mirror(self, prompts: list[np.ndarray], sampling: SamplingParams, wanted: set[str],
               injections: tuple[list[Interceptor], list[Interceptor]], forced: list[np.ndarray] | None,
               on_step: StepCallback | None = None) -> list[Generation]:
        """This rank's run of one generate call of a split model (a helper's results are dropped)."""
        self._keeper = RankKeeper(self.rank, injections)
        try:
            return super()._generate(prompts, sampling, [_Hooked(wanted)], on_step, forced)
        finally:
            self._keeper, self._gather = None, None

    def _intercept(self, interceptors: Sequence[Interceptor], site: TensorSite,
                   tensor: EngineTensor) -> EngineTensor | None:
        """Split over ranks: this rank's what-ifs on its shard, its rows to rank 0, and there the
        unsharded tensor to the observers (every rank gathers each hooked tensor, in one order)."""
        if self._keeper is None:
            return super()._intercept(interceptors, site, tensor)
        new = self._keeper.intercept(site, tensor)
        every = self.ranks.gather(self._keeper.drain())
        if every is not None:
            self._gather.deliver(every)
        return new

    def _next_token(self, fed: int | None) -> int | None:
        return fed if self.ranks is None else self.ranks.agree(fed)

    def _start_request(self) -> None:
        import transformers

        self._cache = transformers.DynamicCache()
        self._mask = None

    def _forward(self, sequence: list[int], start: int, prompt_rows: bool) -> np.ndarray:
        import torch

        tokens = torch.as_tensor(sequence[start:], dtype=torch.long, device=self.device)[None]
        batch = self._padded_batch(tokens) if self._companions else {"input_ids": tokens}
        # The LM head runs over every prompt position only for prompt logprobs; otherwise the
        # "logits" tensor of the prefill is its last row alone (SPEC.md section 6).
        with torch.inference_mode():
            out = self.model(**batch, past_key_values=self._cache, use_cache=True,
                             logits_to_keep=0 if prompt_rows else 1)
            rows = out.logits[0] if prompt_rows else out.logits[0, -1:]
            return rows.float().cpu().numpy()

    def _padded_batch(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The request (``tokens``, ``[1, new]``) as row 0 of a batch, as HF batched generation
        pads one: each companion row holds seeded random tokens, left-padded at the prefill to
        a length of its own, so the model runs with an attention mask and batch-shaped matrix
        products. Row 0 is never padded: its positions and tokens are the request's own, and
        the hooks show row 0 only."""
        import torch

        rows, new = 1 + self._companions, tokens.shape[1]
        if self._mask is None:  # the same companions for the same prompt, in every run
            self._companion_rng = np.random.default_rng(tokens[0, :64].tolist())
        fillers = torch.as_tensor(self._companion_rng.integers(0, self.vocab_size, (rows - 1, new)),
                                  device=self.device)
        step_mask = torch.ones((rows, new), dtype=torch.long, device=self.device)
        if self._mask is None:  # the prefill: companions of mixed lengths, padding on their left
            lengths = self._companion_rng.integers(1, new + 1, rows - 1)
            for row, length in enumerate(lengths, start=1):
                step_mask[row, : new - int(length)] = 0
        self._mask = step_mask if self._mask is None else torch.cat([self._mask, step_mask], dim=1)
        positions = (self._mask.cumsum(dim=1) - 1).clamp(min=0)[:, -new:]
        return {"input_ids": torch.cat([tokens, fillers]), "attention_mask": self._mask, "position_ids": positions}

    # -- hooks ---------------------------------------------------------------------------------
    def _install_hooks(self, wanted: set[str], hooks: ExitStack) -> None:
        def on_output(module: torch.nn.Module, name: str) -> None:
            def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
                tensor = output[0] if isinstance(output, tuple) else output
                new = self._emit(name, tensor[0])
                if new is None:
                    return None
                new = new[None]
                return (new, *output[1:]) if isinstance(output, tuple) else new
            hooks.callback(module.register_forward_hook(hook).remove)

        points: dict[str, torch.nn.Module] = {
            "embed": self.model.get_input_embeddings(),
            "final_norm": self._final_norm,
            "logits": self.model.get_output_embeddings(),
            **layer_modules(self._layers, "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
        }
        for name, module in points.items():
            if name in wanted:
                on_output(module, name)
        for i in self.moe_layers:
            if wanted & {f"layers.{i}.{part}" for part in MOE_PARTS}:
                hooks.callback(self._layers[i].mlp.gate.register_forward_hook(self._routing_hook(i)).remove)
        qkv_layers = {i for i in range(len(self._layers))
                      if wanted & {f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"}}
        if qkv_layers:
            self._wrap_attention(qkv_layers, wanted, hooks)

    def _routing_hook(self, layer: int) -> Callable:
        """On an HF sparse-MoE block's router (``mlp.gate``: Qwen2-MoE, Qwen3-MoE, Mixtral), whose
        output is (logits, combine weights, expert ids) for rows of positions: shows the three,
        and routes by what the interceptors hand back (:mod:`ptrace.backends.routing`)."""
        def hook(gate: torch.nn.Module, _args: Any, output: Any) -> Any:
            logits, weights, ids = output
            routed = routing.observe(lambda part, rows: self._emit(f"layers.{layer}.{part}", rows),
                                     logits, weights, ids, renormalize=getattr(gate, "norm_topk_prob", True))
            return None if routed is None else (routed.logits, routed.weights, routed.ids)
        return hook

    def _wrap_attention(self, layers: set[int], wanted: set[str], hooks: ExitStack) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import (
            ALL_MASK_ATTENTION_FUNCTIONS,
            AttentionMaskInterface,
        )
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # HF builds the attention mask by implementation name (and builds none for unknown
        # names), so the wrapper is registered with the wrapped implementation's mask function:
        # observing q/k/v must not change a single bit of the computation.
        name = f"{_ATTENTION_PREFIX}{self.attn_implementation}"
        AttentionInterface.register(name, _wrapped_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[self.attn_implementation])
        for i, layer in enumerate(self._layers):  # the config switch applies to every layer
            attention = layer.self_attn
            attention._ptrace_inner_attention = _inner_attention(attention, self.attn_implementation,
                                                                 ALL_ATTENTION_FUNCTIONS)
            if i in layers:
                attention._ptrace_observe_qkv = self._qkv_observer(i, wanted)
            hooks.callback(_forget, attention, ("_ptrace_inner_attention", "_ptrace_observe_qkv"))
        config = self.model.config
        original = config._attn_implementation
        config._attn_implementation = name
        hooks.callback(setattr, config, "_attn_implementation", original)

    def _qkv_observer(self, layer: int, wanted: set[str]) -> Callable:
        def observe(_module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            new_positions = query.shape[2]
            # [batch, heads, positions, head_dim] -> rows [positions, heads, head_dim]
            if f"layers.{layer}.q" in wanted:
                new = self._emit(f"layers.{layer}.q", query[0].transpose(0, 1))
                if new is not None:
                    query = new.transpose(0, 1)[None].contiguous()
            for part, states in (("k", key), ("v", value)):
                if f"layers.{layer}.{part}" in wanted:
                    # Only the new positions are this step's; earlier ones are cached history.
                    rows = states[0, :, -new_positions:].transpose(0, 1)
                    new = self._emit(f"layers.{layer}.{part}", rows)
                    if new is not None:  # in place: the cache keeps the replaced values
                        states[0, :, -new_positions:] = new.transpose(0, 1)
            return query, key, value
        return observe


def _rope_settings(model: torch.nn.Module, attention: torch.nn.Module) -> dict[str, Any]:
    """Rope as the model's rotary embedding computes it: theta from its table where the table is
    unscaled, else from the rope parameters it was built from; the rotated share of a head from
    the table's length; the pairing from the model module's rotate function."""
    from ptrace.backends import torch_settings as ts

    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return {}
    kind = getattr(rotary, "rope_type", UNKNOWN)
    parameters = getattr(model.config, "rope_parameters", None) or {}
    head_dim = getattr(attention, "head_dim", None)
    module = sys.modules[type(attention).__module__]
    layout = "half-split" if hasattr(module, "rotate_half") else UNKNOWN
    return {
        "rope_type": kind,
        "rope_theta": ts.theta_from_inv_freq(rotary.inv_freq) if kind == "default"
        else parameters.get("rope_theta", UNKNOWN),
        "rope_scaling_factor": parameters.get("factor") if kind != "default" else None,
        "partial_rotary_factor": 2 * rotary.inv_freq.numel() / head_dim if head_dim else UNKNOWN,
        "rope_layout": layout,
    }


def _norm_dtype(norm: torch.nn.Module, dtype: str) -> str:
    """HF's RMSNorms compute in float32 whatever the model's dtype (``.to(torch.float32)`` in their
    forward); another norm computes in the model's dtype when that is full precision."""
    import inspect

    from ptrace.backends import torch_settings as ts

    try:
        source = inspect.getsource(type(norm).forward)
    except (OSError, TypeError):
        source = ""
    if "torch.float32" in source:
        return "float32"
    return dtype if ts.full_precision(dtype) else UNKNOWN


def _inner_attention(attention: torch.nn.Module, implementation: str, registry: Any) -> Callable:
    """The attention function the model would have used without ptrace."""
    if implementation == "eager":
        module = sys.modules[type(attention).__module__]
        if not hasattr(module, "eager_attention_forward"):
            raise BackendError(f"{type(attention).__name__} has no eager_attention_forward to wrap")
        return module.eager_attention_forward
    return registry[implementation]


def _forget(obj: object, names: Sequence[str]) -> None:
    for name in names:
        if hasattr(obj, name):
            delattr(obj, name)


class _Hooked(Interceptor):
    """What a split model's loop hooks: the tensors the capture's interceptors want (which
    :meth:`TorchBackend._intercept` shows them, through rank 0's gather)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def wants(self, name: str) -> bool:
        return name in self.names

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> None:
        return None
