"""The one sentence at the top of the report and of ``ptrace compare``'s output."""

from __future__ import annotations

from dataclasses import replace

from ptrace.compare.results import Comparison
from ptrace.compare.thresholds import WARN


def summarize(c: Comparison) -> str:
    total = sum(len(r.tokens_a) for r in c.requests)
    same = round(c.token_match_rate * total)
    if c.first_divergent_step is None:
        tokens = f"tokens identical for {same}/{total} steps"
    else:
        tie = any(r.divergence is not None and r.divergence.near_tie for r in c.requests)
        tokens = (f"tokens agree for {same}/{total} steps, first divergence at step "
                  f"{c.first_divergent_step}{' (a near-tie flip)' if tie else ''}")
    if c.first_divergent_tensor is not None:
        result = next(t for t in c.tensors if t.name == c.first_divergent_tensor)
        where = (f"first divergent tensor {c.first_divergent_tensor} at position {c.first_divergent_position}"
                 + (f", cos {result.cos_sim:.6g}" if not result.stats_only else ""))
    elif warned := [t.name for t in c.tensors if t.verdict == WARN]:
        where = f"no tensor fails, {len(warned)} warn (first: {warned[0]})"
    else:
        worst_cos = min((t.cos_sim for t in c.tensors if not t.stats_only), default=None)
        where = "every tensor within tolerance" + (f" (worst cos {worst_cos:.7g})" if worst_cos is not None else "")
    summary = f"{c.verdict.upper()}: {tokens}; {where}"
    if c.first_nonfinite:
        summary += f"; first NaN/Inf in {c.first_nonfinite['tensor']} ({c.first_nonfinite['bundle']})"
    return summary


def with_summary(c: Comparison) -> Comparison:
    return replace(c, summary=summarize(c))
