"""Reading arithmetic settings back from a loaded PyTorch model: the parts HF transformers and
vLLM share (both hold their weights and rotary tables in torch tensors).

Values come from the objects the engine computes with (a norm's epsilon attribute, the rotary
table, whether the LM head *is* the embedding tensor), so a config key an engine read
differently from what config.json says shows up as the value it really used.
"""

from __future__ import annotations

from typing import Any

from ptrace.bundle_spec.settings import UNKNOWN


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


def theta_from_inv_freq(inv_freq: Any) -> float:
    """The rotary base of a default (unscaled) rotary table ``inv_freq[i] = theta^(-2i/d)``, read
    from its last entry (``d/(d-2)`` amplifies that entry's float32 rounding least), rounded to
    the 6 significant digits a float32 table keeps."""
    values = inv_freq.detach().double().cpu()
    rotated = 2 * values.numel()
    if rotated <= 2:
        return UNKNOWN
    theta = float(values[-1]) ** (-rotated / (rotated - 2))
    return float(f"{theta:.6g}")


def norm_eps(norm: Any) -> Any:
    """The epsilon a norm module adds: HF's and vLLM's RMSNorm call it ``variance_epsilon``,
    torch's LayerNorm ``eps``."""
    for attribute in ("variance_epsilon", "eps"):
        value = getattr(norm, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
    return UNKNOWN


def one_value(values: list[Any]) -> Any:
    """One value where every layer has the same, else the per-layer list (a model whose layers
    alternate between windowed and full attention)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else values


def is_tied(head: Any, embedding: Any) -> bool:
    """Whether the LM head computes with the embedding's own storage."""
    return head.weight.data_ptr() == embedding.weight.data_ptr()


def torch_numerics() -> dict[str, Any]:
    """Settings of torch itself that every torch-based engine shares."""
    import torch

    return {"matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def full_precision(dtype: str) -> bool:
    """A softmax or norm over ``dtype`` inputs is computed in ``dtype`` at least: for float32 and
    float64 the result's dtype says how it was computed; for 16-bit inputs it does not."""
    return dtype in ("float32", "float64")
