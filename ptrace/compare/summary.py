"""The one sentence at the top of the report and of ``ptrace compare``'s output.

It answers the user's three questions in order: do the tokens agree; where do the runs part ways
(above the noise floor, ``compare.noise``); and is the difference large enough to matter (the
pass/warn/fail thresholds, naming the limit that tripped and whose dtype's limits they are).
Every clause is a whole sentence about what was measured: "bit-identical" only when every
compared element is; a stats-only comparison says so; nothing compared is not a pass.
"""

from __future__ import annotations

from dataclasses import replace

from ptrace.compare import routing, settings
from ptrace.compare.results import Comparison, TensorResult
from ptrace.compare.thresholds import PASS, Thresholds, worst


def _tokens(c: Comparison) -> str:
    total = sum(len(r.tokens_a) for r in c.requests)
    same = round(c.token_match_rate * total)
    if c.first_divergent_step is None:
        return f"tokens identical for {same}/{total} steps"
    tie = any(r.divergence is not None and r.divergence.near_tie for r in c.requests)
    return (f"tokens agree for {same}/{total} steps, first divergence at step "
            f"{c.first_divergent_step}{' (a near-tie flip)' if tie else ''}")


def _worst_ratio(t: TensorResult) -> float:
    rel = [r for r in t.position_rel if r == r]  # NaN-free
    return max(rel, default=0.0) / t.noise_floor if t.noise_floor else 0.0


def _where(c: Comparison) -> str:
    if c.first_divergent_tensor is not None:
        tensor = next(t for t in c.tensors if t.name == c.first_divergent_tensor)
        at = [r for req, pos, r in zip(tensor.position_request, tensor.position_index, tensor.position_rel)
              if req == c.first_divergent_request and pos == c.first_divergent_position]
        size = f": relative error {at[0]:.3g}, {at[0] / tensor.noise_floor:.3g}x the {c.localized_by}" \
            if at and tensor.noise_floor else ""
        return (f"runs part ways at {c.first_divergent_tensor} (request {c.first_divergent_request}, "
                f"position {c.first_divergent_position}{size})")
    measured = [t for t in c.tensors if t.positions > 0]
    if not measured:
        return "no tensor position was compared"
    stats_only = sum(t.stats_only for t in measured)
    by_stats = f" ({stats_only} of {len(measured)} compared by their statistics only)" if stats_only else ""
    if all(not t.stats_only and max(t.position_rel) == 0 for t in measured):
        return "every compared tensor is bit-identical"
    if all(max(t.position_rel) == 0 for t in measured):
        return f"every compared tensor's elements or statistics are identical{by_stats}"
    worst = max(measured, key=_worst_ratio)
    return (f"every tensor difference is within rounding noise{by_stats} (largest: {worst.name} at "
            f"{_worst_ratio(worst):.2g}x the noise floor)")


def _size(c: Comparison) -> str:
    thresholds = Thresholds(**c.thresholds)
    level = worst([t.verdict for t in c.tensors])
    if not c.tensors:
        return "no tensor in both runs"
    if level == PASS:
        return f"every tensor within rounding noise or the {c.thresholds_dtype} limits"
    first = next(t for t in c.tensors if t.verdict == level)  # forward order: the earliest at the worst level
    count = sum(t.verdict == level for t in c.tensors)
    if first.positions == 0:
        what = "no position to compare"
    elif first.stats_only:
        what = f"its scale changes by {first.rel_err:.3g}"
    else:
        what = thresholds.tripped(first.mean_abs_err, first.cos_sim)
    return f"{count} tensor(s) {level}, first {first.name}: {what} ({c.thresholds_dtype} limits)"


def summarize(c: Comparison) -> str:
    """The what-ifs first, one line each, when there are any; then the verdict on B against A."""
    verdict = _verdict(c)
    if not c.whatifs:
        return verdict
    lines = [f"what-if {w.sentence}" for w in c.whatifs]
    return "\n".join([*lines, f"baseline ({c.b.get('backend')} {c.b.get('dtype')}, no injection) against the "
                                f"source: {verdict}"])


def _verdict(c: Comparison) -> str:
    if c.calibration is not None:  # judged against a trusted engine at the same dtype
        summary = f"{c.verdict.upper()}: {_tokens(c)}; {c.calibration.sentence}"
    else:
        summary = f"{c.verdict.upper()}: {_tokens(c)}; {_where(c)}; {_size(c)}"
        if c.calibration_note:
            summary += f"; {c.calibration_note}"
    moe = routing.sentence(c.routing, c.first_divergent_request, c.first_divergent_tensor,
                           c.first_divergent_position)
    if moe:
        summary += f"; {moe}"
    if c.first_nonfinite:
        summary += f"; first NaN/Inf in {c.first_nonfinite['tensor']} ({c.first_nonfinite['bundle']})"
    for clause in settings.clauses(c):
        summary += f"; {clause}"
    if c.a.get("model_fingerprint") != c.b.get("model_fingerprint"):
        summary += (f"; the runs used different weights (fingerprint {str(c.a.get('model_fingerprint'))[:12]} vs "
                    f"{str(c.b.get('model_fingerprint'))[:12]})")
    return summary


def with_summary(c: Comparison) -> Comparison:
    c = replace(c, settings_diff=[d.to_dict() for d in settings.differences(c)])
    return replace(c, summary=summarize(c))
