"""Mixture-of-experts routing as interceptors see it, shared by the torch-based engines (HF
transformers, vLLM): the router logits, then the chosen experts and their combine weights
(SPEC.md section 5: ``layers.{i}.router``, ``.experts``, ``.expert_weights``).

What an interceptor hands back changes the routing the way the engine's own would have:

- new router logits (``noise``/``cast`` on ``layers.*.router``): the experts and weights are
  chosen again from them (softmax, top-k, optional renormalisation: the routing of Qwen-MoE,
  Mixtral and vLLM's softmax router), so a perturbation large enough flips expert choices;
- new expert ids (the ``route`` what-if: the source bundle's choices): their weights are the
  router's probabilities of those experts, renormalised like the engine's, unless new weights
  are handed back too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: ``(part, rows) -> replacement or None``: shows one routing tensor (``router``, ``experts`` or
#: ``expert_weights``) to the interceptors.
Emit = Callable[[str, Any], Any]


@dataclass
class Routed:
    """The routing a sparse block uses: ``ids`` and ``weights`` are ``[rows, top_k]``."""

    logits: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor


def choose(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of the ``top_k`` most probable experts: softmax in float32, top-k,
    renormalised to sum 1 if ``renormalize``."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def weights_of(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The combine weights of experts ``ids`` under these router logits."""
    import torch

    weights = torch.softmax(logits.float(), dim=-1).gather(-1, ids.long())
    return weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights


def observe_choice(emit: Emit, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *,
                   renormalize: bool) -> Routed | None:
    """Show the chosen experts (int32, the engine's order) and their weights; the routing the
    interceptors' replacements give, or None if nothing was replaced."""
    import torch

    changed = False
    new_ids = emit("experts", ids.to(torch.int32))
    if new_ids is not None:
        ids, changed = new_ids.to(ids.dtype), True
        weights = weights_of(logits, ids, renormalize).to(weights.dtype)
    new_weights = emit("expert_weights", weights)
    if new_weights is not None:
        weights, changed = new_weights, True
    return Routed(logits, weights, ids) if changed else None


def observe(emit: Emit, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *,
            renormalize: bool) -> Routed | None:
    """Show a router's logits, then its choice (:func:`observe_choice`): for engines whose router
    computes both in one call (HF transformers). None if nothing was replaced."""
    new_logits = emit("router", logits)
    if new_logits is not None:
        chosen_weights, chosen_ids = choose(new_logits, ids.shape[-1], renormalize)
        logits, weights, ids = new_logits, chosen_weights.to(weights.dtype), chosen_ids.to(ids.dtype)
    routed = observe_choice(emit, logits, weights, ids, renormalize=renormalize)
    if routed is None and new_logits is not None:
        return Routed(logits, weights, ids)
    return routed
