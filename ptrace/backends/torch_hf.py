"""PyTorch + HF transformers: the reference most people trust (``--backend torch``).

The model runs one request at a time in a hand-written decode loop over a ``DynamicCache``
(no batching, no padding), so every forward pass maps to one step of one request and every
activation row to one position. Canonical tensors come from forward hooks on the HF modules,
except q/k/v: HF applies the rotary embedding in a plain function, so ptrace registers an
attention implementation that wraps the model's own one and sees q, k, v exactly as they enter
attention (k and v are then the KV cache's own storage, so a replaced k or v persists in the
cache, as an error-injection what-if needs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np

from ptrace.backends.base import (
    Backend,
    Capabilities,
    DecodeSteps,
    EngineOption,
    Generation,
    Interceptor,
    LoadOptions,
    StepCallback,
    TensorSite,
)
from ptrace.backends.torch_tensor import TorchTensor
from ptrace.bundle_spec.schema import SamplingParams
from ptrace.errors import BackendError, BackendUnavailableError, ModelError

if TYPE_CHECKING:  # torch is imported where it is used, so listing backends stays cheap
    import torch

_ATTENTION_PREFIX = "ptrace_"


def _wrapped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Attention implementation registered as "ptrace_<inner>": lets the backend see q/k/v, then
    delegates to the implementation the model was loaded with."""
    observe = getattr(module, "_ptrace_observe_qkv", None)
    if observe is not None:
        query, key, value = observe(module, query, key, value)
    return module._ptrace_inner_attention(module, query, key, value, *args, **kwargs)


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch + HF transformers (reference implementation)"
    requires = ("torch", "transformers")
    packages = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "triton",
                "flash-attn", "xformers", "intel-extension-for-pytorch", "torch-npu")
    options = (
        EngineOption("attn_implementation", str, "HF attention implementation (eager, sdpa, "
                     "flash_attention_2, ...)", default="sdpa"),
    )
    capabilities = Capabilities(devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16", "float64"))

    @classmethod
    def install_hint(cls) -> str:
        return "install it with: pip install 'ptrace[torch]' (or run `make setup`)"

    def _load(self, options: LoadOptions) -> None:
        import torch
        import transformers

        device = torch.device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {options.device} requested but torch sees no CUDA GPU",
                                          hint="use --device cpu")
        attn = options.engine_options["attn_implementation"]
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(options.model_dir, trust_remote_code=False)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                options.model_dir, dtype=getattr(torch, options.dtype), attn_implementation=attn,
                trust_remote_code=False,
            ).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"transformers cannot load {options.model_dir}: {exc}") from exc
        self.device = device
        self.attn_implementation = attn
        decoder = self.model.get_decoder()
        self._layers = list(decoder.layers)
        self._final_norm = decoder.norm

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
            "transformers": transformers.__version__,
            "attn_implementation": self.attn_implementation,
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "mkldnn_enabled": torch.backends.mkldnn.enabled,
        }
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

    # -- generation ----------------------------------------------------------------------------
    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        import torch

        wanted = self.wanted_tensors(interceptors)
        results = []
        with ExitStack() as hooks, torch.inference_mode():
            self._site: TensorSite | None = None
            self._interceptors = interceptors
            self._install_hooks(wanted, hooks)
            for index, prompt in enumerate(prompts):
                results.append(self._generate_one(index, prompt, sampling, wanted, on_step,
                                                  None if forced is None else forced[index]))
        return results

    def _generate_one(self, index: int, prompt: np.ndarray, sampling: SamplingParams,
                      wanted: set[str], on_step: StepCallback | None,
                      forced: np.ndarray | None) -> Generation:
        import torch
        import transformers

        generator = torch.Generator(device=self.device).manual_seed(sampling.seed + index)
        cache = transformers.DynamicCache()
        eos = self.model.generation_config.eos_token_id
        steps = DecodeSteps(sampling, forced, set(eos if isinstance(eos, list) else [eos]) if eos is not None else set())
        all_logits = sampling.prompt_logprobs or "logits" in wanted
        k = sampling.logprobs
        tokens = torch.as_tensor(prompt, dtype=torch.long, device=self.device)[None]
        start, prompt_logprobs = 0, None
        for step in range(sampling.max_new_tokens):
            self._site = TensorSite("", index, step, start)
            out = self.model(input_ids=tokens, past_key_values=cache, use_cache=True,
                             logits_to_keep=0 if (step == 0 and all_logits) else 1)
            if step == 0 and sampling.prompt_logprobs:
                prompt_logprobs = _prompt_logprobs(out.logits[0, :-1].float(), prompt, k)
            last = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            values, ids = torch.topk(last, k) if k else (last[:0], last[:0].long())
            fed = steps.record(_choose(out.logits[0, -1].float(), sampling, generator),
                               ids.cpu().numpy(), values.cpu().numpy())
            if on_step:
                on_step(index, step)
            if fed is None:
                break
            start += tokens.shape[1]
            tokens = torch.tensor([[fed]], dtype=torch.long, device=self.device)
        self._site = None
        return steps.generation(prompt_logprobs)

    # -- hooks ---------------------------------------------------------------------------------
    def _emit(self, name: str, rows: torch.Tensor) -> torch.Tensor | None:
        """Show one tensor (rows = positions) to the interceptors; the replacement, if any."""
        if self._site is None:
            return None
        site = TensorSite(name, self._site.request, self._site.step, self._site.start)
        new = self._intercept(self._interceptors, site, TorchTensor(rows))
        return None if new is None else new.native

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
        }
        for i, layer in enumerate(self._layers):
            points.update({
                f"layers.{i}.attn_norm": layer.input_layernorm,
                f"layers.{i}.attn": layer.self_attn,
                f"layers.{i}.mlp_norm": layer.post_attention_layernorm,
                f"layers.{i}.mlp": layer.mlp,
                f"layers.{i}.out": layer,
            })
        for name, module in points.items():
            if name in wanted:
                on_output(module, name)
        qkv_layers = {i for i in range(len(self._layers))
                      if wanted & {f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"}}
        if qkv_layers:
            self._wrap_attention(qkv_layers, wanted, hooks)

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


def _choose(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    """Greedy argmax, or seeded sampling with temperature, top-k and top-p."""
    import torch

    if sampling.greedy:
        return int(torch.argmax(logits))
    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= sampling.top_p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _prompt_logprobs(logits: torch.Tensor, prompt: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row i of the prefill's logits predicts prompt token i+1 (SPEC.md section 2): the prompt
    tokens' logprobs, and the top-k ids and logprobs per position.

    log p = logit - logsumexp(row): only the picked entries are normalised, so no
    [prompt, vocab] log-softmax is ever materialised (a quarter GB for 2048 x 32000)."""
    import torch

    positions = prompt.shape[0]
    token_lp = np.full(positions, np.nan, dtype=np.float32)
    top_ids = np.full((positions, k), -1, dtype=np.int64)
    top_lps = np.full((positions, k), np.nan, dtype=np.float32)
    if positions > 1:
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        targets = torch.as_tensor(prompt[1:], dtype=torch.long, device=logits.device)
        token_lp[1:] = (logits.gather(1, targets[:, None]) - norm)[:, 0].cpu().numpy()
        if k:
            values, ids = torch.topk(logits, k, dim=-1)
            top_ids[1:], top_lps[1:] = ids.cpu().numpy(), (values - norm).cpu().numpy()
    return token_lp, top_ids, top_lps
