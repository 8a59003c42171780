"""Both sides of a tensor-parallel capture, for every engine whose ranks run ptrace's hooks
(vLLM's workers, HF transformers' ranks): in each rank, :class:`RankKeeper` runs the injections
on the rank's own shard and keeps its rows; in the driver, :class:`RankGather` unshards every
rank's rows into the canonical tensors a one-rank run records and shows them to the capture's
interceptors.

The ranks run the same hooks in the same order, so the ``i``-th rows kept by each rank are the
same site's shards. The unsharding rules and the replica checks are
:mod:`ptrace.backends.sharding`'s. Nothing here imports an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ptrace.backends import sharding
from ptrace.backends.base import EngineTensor, Interceptor, TensorSite, intercept_all
from ptrace.backends.torch_settings import dtype_name
from ptrace.backends.torch_tensor import TorchTensor
from ptrace.bundle_spec.dtypes import storage_dtype
from ptrace.bundle_spec.names import all_names, rank_name
from ptrace.bundle_spec.schema import ParallelInfo, ReplicaFinding, TensorLayout
from ptrace.errors import BackendError, UsageError


@dataclass(frozen=True)
class RankRows:
    """One request's rows of one tensor on one rank, as raw bytes (vLLM's RPC results are
    msgpack: arrays would arrive as lists of numbers, and bfloat16 as nothing NumPy has)."""

    site: TensorSite
    dtype: str  # torch's name: float32, bfloat16, ...
    shape: tuple[int, ...]
    data: bytes

    def to_plain(self) -> tuple:
        site = self.site
        return (site.name, site.request, site.step, site.start, self.dtype, list(self.shape), self.data)

    @classmethod
    def from_plain(cls, plain: Any) -> RankRows:
        name, request, step, start, dtype, shape, data = plain
        return cls(TensorSite(name, request, step, start), dtype, tuple(shape), bytes(data))


def split_interceptors(interceptors: Sequence[Interceptor],
                       wanted: set[str]) -> tuple[list[Interceptor], tuple[list[Interceptor], list[Interceptor]], bool]:
    """The capture's interceptors as a multi-rank run uses them: the observers (in the driver,
    on the unsharded tensors), the injections that run in each rank on its shard
    (``Interceptor.on_ranks``) before and after the rows are kept (what-ifs placed after the
    recorder), and whether an observer wants every rank's own shard (``--per-rank``)."""
    observers = [i for i in interceptors if not i.on_ranks]
    first = interceptors.index(observers[0]) if observers else len(interceptors)
    injections = ([i for i in interceptors[:first] if i.on_ranks], [i for i in interceptors[first:] if i.on_ranks])
    per_rank = any(i.wants(rank_name(name, 0)) for i in observers for name in wanted)
    return observers, injections, per_rank


class RankKeeper:
    """One rank's side: injects on the rank's own shard, keeps the rows (as :class:`RankRows`)
    until the driver collects them, and hands the engine its replacement."""

    def __init__(self, rank: int, injections: tuple[list[Interceptor], list[Interceptor]]) -> None:
        self.rank = rank
        #: The interceptors that replace (``Interceptor.on_ranks``), before and after the rows
        #: are kept (what-ifs that act after the recorder).
        self.before, self.after = injections
        self.kept: list[RankRows] = []

    def intercept(self, site: TensorSite, tensor: EngineTensor) -> EngineTensor | None:
        site = replace(site, rank=self.rank)
        injected = intercept_all(self.before, site, tensor)
        self.keep(site, injected or tensor)
        after = intercept_all(self.after, site, injected or tensor)
        return after or injected

    def keep(self, site: TensorSite, tensor: EngineTensor) -> None:
        import torch

        rows = tensor.native.detach().contiguous().cpu()
        data = rows.reshape(-1).view(torch.uint8).numpy().tobytes()
        self.kept.append(RankRows(site, dtype_name(rows.dtype), tuple(rows.shape), data))

    def drain(self) -> list[tuple]:
        """The rows kept since the last drain (plain tuples of :class:`RankRows`), forgotten here."""
        kept, self.kept = self.kept, []
        return [rows.to_plain() for rows in kept]


class RankGather:
    """Unshards each step's rows and shows them to ``intercept`` (and, with ``layout.per_rank``,
    each rank's own shard as :func:`~ptrace.bundle_spec.names.rank_name`); keeps the replicas'
    disagreements, one finding per tensor, pair of ranks and request (its first step, all its
    positions, the largest difference)."""

    def __init__(self, layout: ParallelInfo, intercept: Callable[[TensorSite, TorchTensor], Any]) -> None:
        self.base, self.intercept = layout, intercept
        self._findings: dict[tuple[str, tuple[int, int], int], ReplicaFinding] = {}

    def deliver(self, per_rank: Sequence[Sequence[Any]]) -> None:
        """One drain's rows from every rank (rank order), as :meth:`RankKeeper.drain` returns them."""
        ranks = [[RankRows.from_plain(plain) for plain in kept] for kept in per_rank]
        if len({len(kept) for kept in ranks}) != 1:
            raise BackendError(f"the ranks kept different numbers of tensors in one step "
                               f"({', '.join(str(len(kept)) for kept in ranks)})")
        for shards in zip(*ranks, strict=True):
            site, dtype = shards[0].site, shards[0].dtype
            if any(shard.site != site for shard in shards):
                raise BackendError(f"the ranks kept different tensors at one place: "
                                   f"{', '.join(shard.site.name for shard in shards)}")
            arrays = [np.frombuffer(shard.data, storage_dtype(dtype)).reshape(shard.shape) for shard in shards]
            whole, disagreements = sharding.unshard(site.name, arrays, dtype, self.base.kv_heads)
            for disagreement in disagreements:
                self._note(site, disagreement)
            for rank, shard in enumerate(arrays if self.base.per_rank else ()):
                self._show(replace(site, name=rank_name(site.name, rank)), shard, dtype)
            if self._show(site, whole, dtype) is not None:
                raise UsageError(f"{site.name}: at tensor_parallel_size > 1 ptrace observes tensors; "
                                 "it cannot replace one across the ranks",
                                 hint="run what-ifs and splices at tensor_parallel_size=1")

    def _show(self, site: TensorSite, array: np.ndarray, dtype: str) -> Any:
        import torch

        return self.intercept(site, TorchTensor(torch.from_numpy(array.copy()).view(getattr(torch, dtype))))

    def _note(self, site: TensorSite, disagreement: sharding.Disagreement) -> None:
        key = (site.name, disagreement.ranks, site.request)
        positions = tuple(site.start + row for row in disagreement.rows)
        known = self._findings.get(key)
        if known is None:
            self._findings[key] = ReplicaFinding(site.name, disagreement.ranks, site.request, site.step,
                                                 positions, disagreement.max_abs_diff)
        else:
            self._findings[key] = replace(known, positions=tuple(sorted({*known.positions, *positions})),
                                          max_abs_diff=max(known.max_abs_diff, disagreement.max_abs_diff))

    def layout(self, wanted: set[str], num_layers: int, moe_layers: Sequence[int]) -> ParallelInfo:
        """``meta/parallel`` for this run: every wanted tensor's layout, and the findings."""
        size, base = self.base.tensor_parallel_size, self.base
        tensors = tuple(TensorLayout(name, sharding.sharding_of(name).dims, sharding.sharding_of(name).rule,
                                     sharding.rank_shards(name, size, base.heads, base.kv_heads))
                        for name in all_names(num_layers, moe_layers) if name in wanted)
        return replace(base, tensors=tensors, replica_findings=tuple(self._findings.values()))
