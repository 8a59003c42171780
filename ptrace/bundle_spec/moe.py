"""Mixture-of-experts facts of a model, read from its HF ``config.json`` (recorded in every
bundle's ``meta/model``): which decoder layers route tokens to experts, among how many experts,
and how many each token gets. Capture selects the routing tensors (SPEC.md section 5) by them,
validation checks expert ids against them, and comparison knows the top-k from them.

The keys are those of HF transformers' MoE configs: Qwen2-MoE and Qwen3-MoE (``num_experts``,
``decoder_sparse_step``, ``mlp_only_layers``), Mixtral (``num_local_experts``), DeepSeek
(``n_routed_experts``, ``first_k_dense_replace``, ``moe_layer_freq``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def num_experts(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    for key in _EXPERT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def top_k(config: Mapping[str, Any]) -> int:
    """Experts each token is routed to (0 for a dense model)."""
    return int(config.get("num_experts_per_tok") or 0) if num_experts(config) else 0


def moe_layers(config: Mapping[str, Any]) -> list[int]:
    """The decoder layers whose MLP is a mixture of experts, ascending."""
    if not num_experts(config):
        return []
    layers = int(config.get("num_hidden_layers") or 0)
    dense = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step") or config.get("moe_layer_freq") or 1)
    first = int(config.get("first_k_dense_replace") or 0)
    return [i for i in range(first, layers) if i not in dense and (i + 1) % step == 0]
