"""Canonical tensor names (SPEC.md section 5): the vocabulary every backend maps to.

A capture from one engine lines up with a replay on another only because both call the same
tensor ``layers.3.mlp``. The forward order defined here decides which divergent tensor is the
*first* one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import numpy as np

#: Per-layer tensors, in forward order within a layer.
LAYER_PARTS: tuple[str, ...] = ("attn_norm", "q", "k", "v", "attn", "mlp_norm", "mlp", "out")

#: The routing of a mixture-of-experts layer (whose ``mlp`` is the sparse block): router logits
#: over the experts, the chosen expert ids (int32, top-k in the engine's order) and their combine
#: weights. Only MoE layers have them; they come between ``mlp_norm`` and ``mlp``.
MOE_PARTS: tuple[str, ...] = ("router", "experts", "expert_weights")

_FORWARD_PARTS = (*LAYER_PARTS[:6], *MOE_PARTS, *LAYER_PARTS[6:])

#: The LM head's output: the one tensor whose rows MAY skip prompt positions (SPEC.md section 6).
LOGITS = "logits"

#: What ``ptrace capture`` records when ``--tensors`` is not given.
DEFAULT_PATTERNS: tuple[str, ...] = ("layers.*.out", "logits")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")


def all_names(num_layers: int, moe_layers: Iterable[int] = ()) -> list[str]:
    """Every canonical name of a model with ``num_layers`` decoder layers, in forward order;
    the layers in ``moe_layers`` (mixture of experts) also have the :data:`MOE_PARTS`."""
    moe = set(moe_layers)
    names = ["embed"]
    for i in range(num_layers):
        parts = _FORWARD_PARTS if i in moe else LAYER_PARTS
        names.extend(f"layers.{i}.{part}" for part in parts)
    names.extend(["final_norm", "logits"])
    return names


def naming_hint(num_layers: int, moe_layers: Sequence[int] = ()) -> str:
    """What the names of a model are, for the hint of a glob that matches none of them."""
    hint = f"names are embed, layers.{{0..{num_layers - 1}}}.{{{','.join(LAYER_PARTS)}}}, final_norm, logits"
    if moe_layers:
        return f"{hint}; mixture-of-experts layers {list(moe_layers)} also have {','.join(MOE_PARTS)}"
    return f"{hint} (a dense model: no {','.join(MOE_PARTS)})"


def forward_key(name: str) -> tuple[int, int, int]:
    """Sort key putting names in forward order (extras last)."""
    if name == "embed":
        return (0, 0, 0)
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _FORWARD_PARTS:
        return (1, int(match.group(1)), _FORWARD_PARTS.index(match.group(2)))
    if name == "final_norm":
        return (2, 0, 0)
    if name == "logits":
        return (3, 0, 0)
    return (4, 0, 0)


def sort_forward(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (forward_key(n), n))


def select(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The names matching any glob pattern (``layers.*.out``, ``layers.[0-3].*``), forward order."""
    return sort_forward(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def layer_index(name: str) -> int | None:
    """The layer number of a per-layer name, else None."""
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def is_recordable(name: str) -> bool:
    """Whether a bundle may hold a tensor of this name: canonical, or an ``x.`` engine extra."""
    if "/" in name:
        return False
    return forward_key(name)[0] < 4 or (name.startswith("x.") and len(name) > 2)


def tensor_positions(name: str, positions: np.ndarray, prompt_len: int, rows: int) -> np.ndarray | None:
    """Positions of the ``rows`` rows of tensor ``name`` in a request whose captured positions
    are ``positions`` (SPEC.md section 6): all of them, or, for the logits, those from the last
    prompt position on (the LM head skipped the rest of the prompt); None if neither fits."""
    if rows == positions.size:
        return positions
    if name == LOGITS:
        tail = positions[positions >= prompt_len - 1]
        if rows == tail.size:
            return tail
    return None


#: A rank's own shard of a tensor (``--per-rank``, SPEC.md 3.10): an engine extra, so that every
#: reader accepts it.
_RANK_SHARD_RE = re.compile(r"^x\.rank\d+\.")


def rank_name(name: str, rank: int) -> str:
    """Where ``--per-rank`` keeps rank ``rank``'s own shard of ``name``: ``x.rank1.layers.0.q``."""
    return f"x.rank{rank}.{name}"


def is_rank_shard(name: str) -> bool:
    return bool(_RANK_SHARD_RE.match(name))


def per_rank_names(names: Sequence[str], tp_size: int) -> list[str]:
    """Every rank's shard names of ``names``; not the logits' (their rows follow the logits'
    own positions rule, and every rank holds them whole after the all-gather)."""
    return [rank_name(name, rank) for rank in range(tp_size) for name in names if name != "logits"]
