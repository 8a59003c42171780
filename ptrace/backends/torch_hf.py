"""PyTorch + HF transformers: the reference most people trust (``--backend torch``).

The model runs one request at a time in ptrace's own decode loop (:mod:`.sequential`) over a
``DynamicCache`` (no batching, no padding), so every forward pass maps to one step of one request
and every activation row to one position. Canonical tensors come from forward hooks on the HF modules,
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

from ptrace.backends.base import Capabilities, EngineOption, LoadOptions, layer_modules
from ptrace.backends.sequential import SequentialBackend
from ptrace.backends.torch_tensor import TorchTensor
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


class TorchBackend(SequentialBackend):
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
    tensor_type = TorchTensor

    @classmethod
    def install_hint(cls) -> str:
        return "install it with: pip install 'ptrace-llm[torch]' (or run `make setup`)"

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
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(options.model_dir,
                                                                        trust_remote_code=False)
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
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._cache: transformers.DynamicCache | None = None

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
    def _start_request(self) -> None:
        import transformers

        self._cache = transformers.DynamicCache()

    def _forward(self, sequence: list[int], start: int, prompt_rows: bool) -> np.ndarray:
        import torch

        tokens = torch.as_tensor(sequence[start:], dtype=torch.long, device=self.device)[None]
        # The LM head runs over every prompt position only for prompt logprobs; otherwise the
        # "logits" tensor of the prefill is its last row alone (SPEC.md section 6).
        with torch.inference_mode():
            out = self.model(input_ids=tokens, past_key_values=self._cache, use_cache=True,
                             logits_to_keep=0 if prompt_rows else 1)
            rows = out.logits[0] if prompt_rows else out.logits[0, -1:]
            return rows.float().cpu().numpy()

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
