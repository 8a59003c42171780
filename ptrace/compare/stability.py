"""Stability across many requests: does run B drift on long contexts, and from which length?

Everything here is derived from what token comparison already measured per request (tokens,
top-k ids, KL per step), so a comparison loaded from ``--json`` holds the same numbers:

- **Per request**: steps whose tokens agree, and the mean and largest KL per step. The KL comes
  from the teacher-forced run where the comparison has one (fed A's tokens, so every step is
  defined), else from the comparison's own run (free-running: only up to the first divergence).
- **Divergence rate per prompt-length bucket**: the share of requests whose tokens differ from
  A's at any step (or whose length differs). Buckets hold about equally many requests (quantiles
  of the prompt lengths, at least :data:`MIN_PER_BUCKET` requests each, at most
  :data:`MAX_BUCKETS`), and requests of one prompt length never straddle two buckets; ``min_len``
  and ``max_len`` are the shortest and longest prompt in the bucket, inclusive.
- **KL and top-1 agreement against absolute position**: the position of a generated token is the
  length of the context it was predicted from (prompt length + step). Steps are pooled over
  requests into bins of a power-of-two width (at most about :data:`MAX_BINS` of them; empty bins
  are left out). Teacher-forced, every step counts; free-running, a request's steps after its first
  divergence are left out (B was fed other tokens there, so its distribution answers another
  question).
- **Div_Index**: the distribution of first divergent steps over the requests that diverge, binned
  like positions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from statistics import fmean, pstdev
from typing import NamedTuple, TypeVar

from ptrace.compare.results import (
    Comparison,
    LengthBucket,
    PositionBin,
    RequestResult,
    Stability,
    StepBin,
)

#: A divergence rate over fewer requests says little: buckets hold at least this many.
MIN_PER_BUCKET = 4
MAX_BUCKETS = 8
#: Bins of positions and of first divergent steps: a power-of-two width giving at most this many.
MAX_BINS = 32

_T = TypeVar("_T")
TEACHER_FORCED, FREE_RUNNING = "teacher-forced", "free-running"


class Step(NamedTuple):
    """One decode step of one request: where its token sits, its KL, whether the top-1s agree."""

    request: int
    position: int
    kl: float | None
    top1_same: bool | None


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def _largest(values: Sequence[float]) -> float | None:
    return max(values) if values else None


def _kl_run(request: RequestResult) -> RequestResult:
    """The run whose KL describes this request: the teacher-forced one where there is one."""
    return request.teacher_forced if request.teacher_forced is not None else request


def with_request_totals(request: RequestResult) -> RequestResult:
    """``request`` with its agreeing steps and its mean and largest KL filled in."""
    kl = [k for k in _kl_run(request).kl if math.isfinite(k)]
    matched = sum(a == b for a, b in zip(request.tokens_a, request.tokens_b))
    return replace(request, tokens_matched=matched, mean_kl=_mean(kl), max_kl=_largest(kl))


def _steps(request: RequestResult, source: str) -> list[Step]:
    """Every step of ``request`` with a comparable next-token distribution (module docstring)."""
    run = _kl_run(request)
    count = min(len(request.tokens_a), len(run.tokens_b))
    if source == FREE_RUNNING and request.first_divergent_step is not None:
        count = min(count, request.first_divergent_step + 1)  # the flip's own step still shares its context
    steps = []
    for s in range(count):
        kl = run.kl[s] if s < len(run.kl) and math.isfinite(run.kl[s]) else None
        top_a = run.topk_a[s] if s < len(run.topk_a) else []
        top_b = run.topk_b[s] if s < len(run.topk_b) else []
        same = top_a[0] == top_b[0] if top_a and top_b else None
        steps.append(Step(request.index, request.prompt_len + s, kl, same))
    return steps


def bucket_members(requests: Sequence[RequestResult]) -> list[list[RequestResult]]:
    """Requests in quantile buckets of their prompt length (module docstring)."""
    ordered = sorted(requests, key=lambda r: (r.prompt_len, r.index))
    count = max(1, min(MAX_BUCKETS, len(ordered) // MIN_PER_BUCKET))
    buckets: list[list[RequestResult]] = []
    for rank, request in enumerate(ordered):
        same_length = bool(buckets) and request.prompt_len == buckets[-1][-1].prompt_len
        if buckets and (same_length or rank < len(buckets) * len(ordered) / count):
            buckets[-1].append(request)
        else:
            buckets.append([request])
    return buckets


def _bucket(members: list[RequestResult]) -> LengthBucket:
    kl = [k for r in members for k in _kl_run(r).kl if math.isfinite(k)]
    diverged = sum(r.first_divergent_step is not None for r in members)
    return LengthBucket(min_len=members[0].prompt_len, max_len=members[-1].prompt_len, requests=len(members),
                        diverged=diverged, divergence_rate=diverged / len(members), mean_kl=_mean(kl),
                        max_kl=_largest(kl), indices=sorted(r.index for r in members))


def bin_width(values: Sequence[int]) -> int:
    """The smallest power of two that covers ``values``' range in at most :data:`MAX_BINS` bins."""
    span = max(values) - min(values) + 1 if values else 1
    return 1 << max(0, math.ceil(math.log2(span / MAX_BINS)))


def binned(items: Sequence[_T], value: Callable[[_T], int]) -> list[tuple[int, int, list[_T]]]:
    """``items`` in bins of their ``value`` (power-of-two width, aligned to multiples of it):
    ``(first, last, members)`` of every non-empty bin, in order."""
    width = bin_width([value(item) for item in items])
    bins: dict[int, list[_T]] = defaultdict(list)
    for item in items:
        bins[value(item) // width * width].append(item)
    return [(start, start + width - 1, bins[start]) for start in sorted(bins)]


def _position_bins(steps: list[Step]) -> list[PositionBin]:
    bins = []
    for first, last, members in binned(steps, lambda s: s.position):
        kl = [s.kl for s in members if s.kl is not None]
        agree = [float(s.top1_same) for s in members if s.top1_same is not None]
        bins.append(PositionBin(min_pos=first, max_pos=last, steps=len(members),
                                requests=len({s.request for s in members}), mean_kl=_mean(kl),
                                max_kl=_largest(kl), top1_agreement=_mean(agree)))
    return bins


def _div_index(requests: Sequence[RequestResult]) -> list[StepBin]:
    steps = [r.first_divergent_step for r in requests if r.first_divergent_step is not None]
    return [StepBin(min_step=first, max_step=last, requests=len(members))
            for first, last, members in binned(steps, lambda s: s)]


def position_source(c: Comparison) -> str:
    """Teacher-forced when the comparison holds a teacher-forced run, free-running otherwise."""
    forced = any(r.teacher_forced is not None for r in c.requests)
    mode = (c.b.get("replay") or {}).get("mode")
    return TEACHER_FORCED if forced or mode == TEACHER_FORCED else FREE_RUNNING


def _kl_source(requests: Sequence[RequestResult]) -> str:
    sources = {_kl_run(r).kl_source for r in requests if _kl_run(r).kl}
    return sources.pop() if len(sources) == 1 else "mixed" if sources else "none"


def stability(requests: Sequence[RequestResult], source: str) -> Stability:
    """The stability of run B over ``requests`` (with their totals filled in), ``source`` saying
    whether their KL and top-k come from a teacher-forced run."""
    lengths_a = [len(r.tokens_a) for r in requests] or [0]
    lengths_b = [len(r.tokens_b) for r in requests] or [0]
    diverged = sum(r.first_divergent_step is not None for r in requests)
    return Stability(
        requests=len(requests), diverged=diverged, divergence_rate=diverged / max(len(requests), 1),
        output_len_mean_a=fmean(lengths_a), output_len_mean_b=fmean(lengths_b),
        output_len_std_a=pstdev(lengths_a), output_len_std_b=pstdev(lengths_b),
        kl_source=_kl_source(requests), position_source=source,
        buckets=[_bucket(members) for members in bucket_members(requests)],
        positions=_position_bins([step for r in requests for step in _steps(r, source)]),
        div_index=_div_index(requests))


def with_stability(c: Comparison) -> Comparison:
    """``c`` with every request's totals and the stability over its requests."""
    requests = [with_request_totals(r) for r in c.requests]
    return replace(c, requests=requests, stability=stability(requests, position_source(c)))
