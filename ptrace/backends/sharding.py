"""How a tensor-parallel engine's ranks hold each canonical tensor, and how ptrace unshards it
(SPEC.md 3.10, ``meta/parallel``).

Megatron-style tensor parallelism (vLLM's) splits attention by heads and the MLP by its
intermediate dimension; the row-parallel output projections (``o_proj``, ``down_proj``) and the
vocabulary-parallel embedding end in an all-reduce, the LM head in an all-gather. So of the
canonical tensors only q, k and v are sharded (by heads); every other one is whole on every rank:
a replica. Each tensor carries a dims annotation, as SGLang's dumps do: ``t`` tokens (rows),
``h`` heads, ``d`` head or hidden size, ``v`` vocabulary, ``(tp)`` marking the split dimension.

Unsharding concatenates the head shards in rank order, and takes a replicated tensor from rank
0 after checking that the other ranks hold the same values: where they do not, that is a
:class:`Disagreement` (a finding for the comparison, not an error).

Nothing here imports an engine: shards are NumPy arrays of a tensor's *storage* dtype
(``ptrace.bundle_spec.dtypes``: bfloat16 as its 16 bits), so concatenating and comparing them
is exact for every dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptrace import hardware
from ptrace.bundle_spec.dtypes import to_float
from ptrace.errors import UsageError

#: How the canonical tensor is made from the ranks' shards.
CONCAT_HEADS = "concat_heads"  # each rank holds a block of the heads: concatenated in rank order
ALL_REDUCED = "all_reduced"  # taken after the all-reduce that ends the branch: whole on every rank
ALL_GATHERED = "all_gathered"  # gathered over the vocabulary shards: whole on every rank
REPLICATED = "replicated"  # computed from whole inputs on every rank
RULES = (CONCAT_HEADS, ALL_REDUCED, ALL_GATHERED, REPLICATED)


@dataclass(frozen=True)
class TensorSharding:
    """One canonical tensor's layout over the ranks."""

    dims: str
    rule: str

    @property
    def sharded(self) -> bool:
        return self.rule == CONCAT_HEADS


#: By the part of the canonical name after ``layers.{i}.`` (or the whole name).
_SHARDINGS = {
    "embed": TensorSharding("t d", ALL_REDUCED),  # vocabulary-parallel embedding
    "attn_norm": TensorSharding("t d", REPLICATED),
    "q": TensorSharding("t h(tp) d", CONCAT_HEADS),
    "k": TensorSharding("t h(tp) d", CONCAT_HEADS),
    "v": TensorSharding("t h(tp) d", CONCAT_HEADS),
    "attn": TensorSharding("t d", ALL_REDUCED),  # o_proj, row-parallel
    "mlp_norm": TensorSharding("t d", REPLICATED),
    "mlp": TensorSharding("t d", ALL_REDUCED),  # down_proj (or the experts' sum), row-parallel
    "out": TensorSharding("t d", REPLICATED),
    "router": TensorSharding("t e", REPLICATED),  # the gate is a replicated linear layer
    "experts": TensorSharding("t k", REPLICATED),
    "expert_weights": TensorSharding("t k", REPLICATED),
    "final_norm": TensorSharding("t d", REPLICATED),
    "logits": TensorSharding("t v", ALL_GATHERED),
}


def sharding_of(name: str) -> TensorSharding:
    """The layout of canonical tensor ``name`` under tensor parallelism."""
    return _SHARDINGS[name.rsplit(".", 1)[-1]]


def kv_head_replicas(tp_size: int, kv_heads: int) -> int:
    """How many ranks hold each KV head: 1 when the ranks split the KV heads, ``tp / kv_heads``
    when there are fewer KV heads than ranks (vLLM then gives rank ``r`` head ``r // replicas``)."""
    return max(1, tp_size // kv_heads)


def rank_shards(name: str, tp_size: int, heads: int, kv_heads: int) -> tuple[str, ...]:
    """What each rank holds of ``name`` (``heads``/``kv_heads``: the model's totals), one text per
    rank: ``"heads 0-7"`` for a block of heads, ``"whole"`` for a replica."""
    sharding = sharding_of(name)
    if not sharding.sharded:
        return ("whole",) * tp_size
    part = name.rsplit(".", 1)[-1]
    total = heads if part == "q" else kv_heads
    replicas = 1 if part == "q" else kv_head_replicas(tp_size, kv_heads)
    per_rank = max(1, total // tp_size)
    blocks = []
    for rank in range(tp_size):
        first = (rank // replicas) * per_rank
        blocks.append(f"heads {first}-{first + per_rank - 1}")
    return tuple(blocks)


def check_cpu_ranks(size: int) -> None:
    """Refuse more CPU ranks than CPUs this process may use (one rank per CPU at least)."""
    cpus = len(hardware.usable_cpus())
    if size > cpus:
        raise UsageError(f"tensor_parallel_size={size} needs {size} CPUs and this process may use {cpus}",
                         hint=f"use tensor_parallel_size <= {cpus} (one rank per CPU at least)")


@dataclass(frozen=True)
class Disagreement:
    """Two ranks' copies of a replicated tensor (or of a replicated KV head) that differ."""

    ranks: tuple[int, int]
    #: Row indices (of the compared rows) where they differ.
    rows: tuple[int, ...]
    max_abs_diff: float


def unshard(name: str, shards: Sequence[np.ndarray], logical_dtype: str,
            kv_heads: int) -> tuple[np.ndarray, list[Disagreement]]:
    """The canonical tensor from every rank's shard (rank order), and where replicas disagree.

    ``shards`` are in storage dtype; q/k/v shards are ``[rows, heads of the rank, head_dim]``.
    ``kv_heads`` is the model's number of KV heads (ranks beyond it hold replicas of k and v).
    """
    tp_size = len(shards)
    sharding = sharding_of(name)
    if sharding.sharded:
        replicas = 1 if name.endswith(".q") else kv_head_replicas(tp_size, kv_heads)
        owners = range(0, tp_size, replicas)
        pairs = [(rank - rank % replicas, rank) for rank in range(tp_size) if rank % replicas]
        whole = np.concatenate([shards[rank] for rank in owners], axis=1)
    else:
        pairs = [(0, rank) for rank in range(1, tp_size)]
        whole = shards[0]
    found = []
    for first, second in pairs:
        disagreement = compare_replicas(shards[first], shards[second], logical_dtype, (first, second))
        if disagreement is not None:
            found.append(disagreement)
    return whole, found


def compare_replicas(first: np.ndarray, second: np.ndarray, logical_dtype: str,
                     ranks: tuple[int, int]) -> Disagreement | None:
    """Where two copies of the same rows differ (bit for bit), and by how much at most."""
    if first.shape != second.shape:
        return Disagreement(ranks, tuple(range(max(len(first), len(second)))), float("inf"))
    bits = np.dtype(f"u{first.dtype.itemsize}")  # bit for bit: equal NaNs agree
    differs = (first.view(bits) != second.view(bits)).reshape(len(first), -1).any(axis=1)
    if not differs.any():
        return None
    gap = np.abs(to_float(first, logical_dtype).astype(np.float64) - to_float(second, logical_dtype))
    return Disagreement(ranks, tuple(int(r) for r in np.flatnonzero(differs)), float(np.nanmax(gap)))
