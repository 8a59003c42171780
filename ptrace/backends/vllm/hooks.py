"""Hooks on vLLM's worker model that show its tensors as canonical ones (SPEC.md section 5, vLLM
column).

The model runs eager in vLLM's worker (in-process, or one rank's process: see
:mod:`ptrace.backends.vllm.workers`), so forward hooks on its modules fire and may replace outputs. What is vLLM's own here:

- the batch layout: the runner's ``execute_model`` is wrapped to keep the scheduler's tokens per
  request, and a pre-hook on the model reads the request order and the positions of the pass;
  :class:`~ptrace.backends.flat_batch.FlatBatch` then splits every tensor into requests;
- a vLLM decoder layer returns ``(mlp branch, residual)`` with the residual add deferred into the
  next layer's fused add+norm: the canonical ``layers.{i}.out`` is their sum;
- q/k/v are the attention layer's inputs (after the rotary embedding): what enters the KV cache;
- in a fused-MoE layer the router logits are the gate's output, and the expert choice is what the
  fused-MoE router's ``select_experts`` returns (wrapped): the choice the experts kernel then uses;
- the schedule: each pass's requests, tokens and starting positions, and the prefix-cache hits
  of the requests it admitted, are kept as ``meta/schedule``'s steps;
- ``logits``: vLLM computes logits only at each request's last scheduled token; at a prefill
  ptrace also runs the engine's own ``compute_logits`` over the other prompt rows, as vLLM does
  itself for prompt logprobs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ptrace.backends import routing
from ptrace.backends.base import TensorSite
from ptrace.backends.flat_batch import FlatBatch
from ptrace.backends.torch_tensor import TorchTensor
from ptrace.bundle_spec.schema import ScheduleStep

if TYPE_CHECKING:
    import torch

#: Shows one tensor to the capture's interceptors; returns the replacement, if any replaced it.
Intercept = Callable[[TensorSite, TorchTensor], "TorchTensor | None"]


class VllmHooks:
    """Forward hooks that turn vLLM's flattened activations into canonical per-request tensors,
    for one ``generate`` call."""

    def __init__(self, model: torch.nn.Module, runner: Any, intercept: Intercept, wanted: set[str],
                 prompt_lengths: list[int], prompt_rows: bool) -> None:
        #: The worker's model (its ``.model`` is the decoder) and model runner.
        self.model, self.runner = model, runner
        self.layers = list(model.model.layers)
        self.intercept = intercept
        self.wanted = wanted
        #: Whether the "logits" of a prefill cover every prompt position (prompt logprobs asked
        #: for), or only the last one, which vLLM computes anyway (SPEC.md section 6).
        self.prompt_rows = prompt_rows
        self.batch = FlatBatch(prompt_lengths, self._show)
        self.requests: dict[str, int] = {}  # vLLM request id -> ptrace's request index
        self.final_hidden: torch.Tensor | None = None
        self.prompt_logits: dict[int, torch.Tensor] = {}  # first row -> replaced prompt logits
        #: The engine steps of this call, as ``meta/schedule`` records them.
        self.schedule: list[ScheduleStep] = []
        self._prompt_lengths: dict[str, int] = {}  # vLLM request id -> prompt tokens
        self._cached_on_admission: dict[str, int] = {}  # vLLM request id -> prefix-cache hit tokens

    def _show(self, site: TensorSite, rows: torch.Tensor) -> torch.Tensor | None:
        new = self.intercept(site, TorchTensor(rows))
        return None if new is None else new.native

    # -- installation ----------------------------------------------------------------------------
    def install(self, stack: ExitStack) -> None:
        """Hook what is wanted; ``stack`` removes every hook when it closes."""
        decoder, runner = self.model.model, self.runner
        execute = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            runner._ptrace_scheduled = scheduler_output.num_scheduled_tokens  # tokens per request id
            for admitted in scheduler_output.scheduled_new_reqs:
                self._prompt_lengths[admitted.req_id] = len(admitted.prompt_token_ids or ())
                self._cached_on_admission[admitted.req_id] = admitted.num_computed_tokens
            return execute(scheduler_output, *args, **kwargs)
        runner.execute_model = execute_model
        stack.callback(delattr, runner, "execute_model")
        # On the outer model: the decoder's torch.compile wrapper calls forward() directly,
        # bypassing hooks on the decoder itself (its submodules are called normally).
        model = self.model
        stack.callback(model.register_forward_pre_hook(self._on_batch, with_kwargs=True).remove)
        stack.callback(model.register_forward_hook(self._after_batch).remove)
        points: dict[str, tuple[torch.nn.Module, str]] = {"embed": (decoder.embed_tokens, "plain"),
                                                          "final_norm": (decoder.norm, "first")}
        for i, layer in enumerate(self.layers):
            points.update({
                f"layers.{i}.attn_norm": (layer.input_layernorm, "first"),
                f"layers.{i}.attn": (layer.self_attn, "plain"),
                f"layers.{i}.mlp_norm": (layer.post_attention_layernorm, "first"),
                f"layers.{i}.mlp": (layer.mlp, "plain"),
                f"layers.{i}.out": (layer, "residual_sum"),
            })
            if self.wanted & {f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.v"}:
                stack.callback(layer.self_attn.attn.register_forward_pre_hook(self._qkv_hook(i)).remove)
        for i, sparse in enumerate(layer.mlp for layer in self.layers):
            if not hasattr(getattr(sparse, "experts", None), "router"):
                continue  # a dense MLP: only a fused-MoE block (gate + experts) routes
            points[f"layers.{i}.router"] = (sparse.gate, "first")  # GateLinear: (logits, bias)
            if self.wanted & {f"layers.{i}.experts", f"layers.{i}.expert_weights"}:
                router = sparse.experts.router
                router.select_experts = self._routing_hook(i, router.select_experts, router.renormalize)
                stack.callback(delattr, router, "select_experts")
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
        runner = self.runner
        scheduled = getattr(runner, "_ptrace_scheduled", None)
        if positions is None or scheduled is None:
            self.batch.clear()
            return
        order = runner.input_batch.req_ids[: runner.input_batch.num_reqs]
        rows = positions.cpu().numpy()
        self.batch.begin([(self.requests.get(req_id), int(scheduled[req_id])) for req_id in order], rows)
        self._note_step(order, scheduled, rows)

    def _note_step(self, order: list[str], scheduled: dict[str, int], positions: Any) -> None:
        """This pass as a step of the schedule: who ran, how many tokens from which position,
        and what the prefix cache served each request when it was admitted."""
        requests, tokens, starts, prefill, cached = [], [], [], [], []
        row = 0
        for req_id in order:
            count = int(scheduled[req_id])
            start = int(positions[row]) if count else 0
            requests.append(self.requests.get(req_id, -1))
            tokens.append(count)
            starts.append(start)
            prefill.append(start < self._prompt_lengths.get(req_id, 0))
            cached.append(self._cached_on_admission.pop(req_id, 0))
            row += count
        self.schedule.append(ScheduleStep(tuple(requests), tuple(tokens), tuple(starts), tuple(prefill),
                                          tuple(cached)))

    def _after_batch(self, _module: Any, _args: Any, output: Any) -> None:
        self.final_hidden = output if not isinstance(output, tuple) else output[0]

    # -- emission --------------------------------------------------------------------------------
    def _output_hook(self, name: str, kind: str) -> Callable:
        import torch

        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if not self.batch:
                return None
            if kind == "residual_sum":  # (mlp branch, residual): the stream is their sum
                branch, residual = output
                new = self.batch.emit(name, branch + residual)
                if new is None:
                    return None
                return (torch.zeros_like(branch), new)  # 0 + new == new exactly, in the next add
            tensor = output[0] if kind == "first" and isinstance(output, tuple) else output
            new = self.batch.emit(name, tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def _qkv_hook(self, layer: int) -> Callable:
        attention = self.layers[layer].self_attn

        def hook(_module: Any, args: tuple) -> tuple | None:
            if not self.batch:
                return None
            heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
            tensors = list(args[:3])
            changed = False
            for slot, (part, count) in enumerate((("q", heads), ("k", kv_heads), ("v", kv_heads))):
                name = f"layers.{layer}.{part}"
                if name in self.wanted:
                    new = self.batch.emit(name, tensors[slot], (count, head_dim))
                    if new is not None:  # the attention layer writes k/v into the paged cache
                        tensors[slot], changed = new, True
            return (*tensors, *args[3:]) if changed else None
        return hook

    def _routing_hook(self, layer: int, select_experts: Callable, renormalize: bool) -> Callable:
        """Wraps the fused-MoE router's ``select_experts`` (top-k over the router logits, which
        the gate's hook has already shown): shows the choice, routes by a replaced one."""
        def hook(*args: Any, **kwargs: Any) -> tuple:
            weights, ids = select_experts(*args, **kwargs)
            if not self.batch:
                return weights, ids
            logits = kwargs.get("router_logits", args[1] if len(args) > 1 else None)
            routed = routing.observe_choice(
                lambda part, rows: self.batch.emit(f"layers.{layer}.{part}", rows),
                logits, weights, ids, renormalize=renormalize)
            return (weights, ids) if routed is None else (routed.weights.contiguous(), routed.ids.contiguous())
        return hook

    def _logits_hook(self, original: Callable) -> Callable:
        def compute_logits(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            logits = original(hidden, *args, **kwargs)
            final = self.final_hidden
            if not self.batch or final is None:
                return logits
            if _is_view_of(hidden, final):  # vLLM's own prompt-logprob call over prompt rows
                row = (hidden.data_ptr() - final.data_ptr()) // (final.stride(0) * final.element_size())
                replaced = self.prompt_logits.get(row)
                return logits if replaced is None else replaced[: logits.shape[0]]
            return self._emit_sampled_logits(original, logits, final)
        return compute_logits

    def _emit_sampled_logits(self, original: Callable, logits: torch.Tensor,
                             final: torch.Tensor) -> torch.Tensor:
        """The sampling call has one row per request (its last scheduled token); at a prefill
        with prompt logprobs the other prompt rows come from the engine's own ``compute_logits``
        over the same hidden states. Without them, a prefill chunk that ends before the prompt
        does shows nothing (vLLM discards its sampled row)."""
        import torch

        replaced = None
        self.prompt_logits = {}
        for slot, segment in enumerate(self.batch.segments):
            last = logits[slot: slot + 1]
            end = segment.start + segment.count
            if segment.count == 1 or not self.prompt_rows:
                if segment.step == 0 and end < self.batch.prompt_lengths[segment.request]:
                    continue
                site, rows = replace(segment.site("logits"), start=end - 1), last
            else:
                site, rows = segment.site("logits"), torch.cat(
                    [original(final[segment.row: segment.row + segment.count - 1]), last])
            new = self._show(site, rows)
            if new is not None:
                if replaced is None:
                    replaced = logits.clone()
                replaced[slot] = new[-1]
                if rows.shape[0] > 1:
                    self.prompt_logits[segment.row] = new[:-1]
        return logits if replaced is None else replaced


def _is_view_of(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    start = base.data_ptr()
    end = start + base.numel() * base.element_size()
    return start <= tensor.data_ptr() < end
