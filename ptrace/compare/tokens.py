"""Token agreement of two runs, per request: match rate, the first divergent step and whether
it is a flip between near-tied tokens, and the KL divergence of each comparable step's
next-token distribution."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ptrace.bundle_spec.reader import Bundle
from ptrace.compare.align import Alignment, read_rows, row_indices
from ptrace.compare.metrics import kl_full, kl_topk
from ptrace.compare.results import Divergence, RequestResult
from ptrace.compare.thresholds import FAIL, PASS, WARN, Thresholds


class TopK(NamedTuple):
    """Both runs' top-k token ids and logprobs per decode step (``[steps, k]`` each)."""

    ids_a: np.ndarray
    lp_a: np.ndarray
    ids_b: np.ndarray
    lp_b: np.ndarray


def _margin(logprobs: np.ndarray) -> float | None:
    return float(logprobs[0] - logprobs[1]) if logprobs.shape[0] >= 2 else None


def _divergence(step: int, token_a: int, token_b: int, topk: TopK, thresholds: Thresholds) -> Divergence:
    """A flip is a near-tie when each token is in the other run's top-k and a margin is small."""
    a_in_b, b_in_a = token_a in topk.ids_b[step].tolist(), token_b in topk.ids_a[step].tolist()
    margin_a, margin_b = _margin(topk.lp_a[step]), _margin(topk.lp_b[step])
    margins = [m for m in (margin_a, margin_b) if m is not None]
    near_tie = a_in_b and b_in_a and bool(margins) and min(margins) < thresholds.tie_margin
    return Divergence(step, token_a, token_b, a_in_b, b_in_a, margin_a, margin_b, near_tie)


def kl_per_step(a: Bundle, b: Bundle, request: int, steps: int, topk: TopK) -> tuple[list[float], str]:
    """KL(P_a || P_b) of each compared decode step's next-token distribution, and its source:
    exact from full logits where both runs captured them, else estimated from top-k logprobs."""
    if steps <= 0:
        return [], "none"
    prompt_len = a.requests.requests[request].prompt_len
    wanted = prompt_len - 1 + np.arange(steps)  # the logits row that predicts token s
    if a.has_tensor(request, "logits") and b.has_tensor(request, "logits"):
        pos_a, pos_b = a.tensor_positions(request, "logits"), b.tensor_positions(request, "logits")
        if np.isin(wanted, pos_a).all() and np.isin(wanted, pos_b).all():
            la = read_rows(a, request, "logits", row_indices(pos_a, wanted))
            lb = read_rows(b, request, "logits", row_indices(pos_b, wanted))
            return kl_full(la, lb).tolist(), "full logits"
    return (kl_topk(topk.ids_a[:steps], topk.lp_a[:steps], topk.ids_b[:steps], topk.lp_b[:steps]).tolist(),
            f"top-{topk.ids_a.shape[1]} logprobs")


class TokenAgreement(NamedTuple):
    """How two runs' generated tokens agree: the share of equal steps, the first step where they
    differ (None if never; the shorter length if one run stopped early) and, when both runs
    produced a token there, what the flip looks like."""

    match_rate: float
    first_divergent_step: int | None
    divergence: Divergence | None


def token_agreement(out_a: np.ndarray, out_b: np.ndarray, topk: TopK, thresholds: Thresholds) -> TokenAgreement:
    """Token agreement of run ``b`` against reference run ``a``, from their tokens and top-k
    alone: what a live endpoint gives back (``ptrace.monitor``) as much as a bundle."""
    n = min(len(out_a), len(out_b))
    same = out_a[:n] == out_b[:n]
    mismatches = np.flatnonzero(~same)
    first = int(mismatches[0]) if mismatches.size else (n if len(out_a) != len(out_b) else None)
    divergence = (_divergence(first, int(out_a[first]), int(out_b[first]), topk, thresholds)
                  if first is not None and first < n else None)
    return TokenAgreement(float(same.mean()) if n else 1.0, first, divergence)


def token_verdict(request: RequestResult) -> str:
    """Identical tokens pass; a first flip between near-tied tokens warns; any other flip fails."""
    if request.first_divergent_step is None:
        return PASS
    return WARN if request.divergence is not None and request.divergence.near_tie else FAIL


def overall_agreement(requests: list[RequestResult]) -> tuple[float, int | None]:
    """Token agreement over every request (weighted by steps) and the earliest divergent step."""
    total = sum(len(r.tokens_a) for r in requests)
    matched = sum(r.token_match_rate * min(len(r.tokens_a), len(r.tokens_b)) for r in requests)
    first_step = min((r.first_divergent_step for r in requests if r.first_divergent_step is not None),
                     default=None)
    return (matched / total if total else 1.0), first_step


def compare_request(a: Bundle, b: Bundle, request: int, alignment: Alignment,
                    thresholds: Thresholds) -> RequestResult:
    out_a, out_b = a.output_ids(request), b.output_ids(request)
    topk = TopK(*a.topk(request), *b.topk(request))
    agreement = token_agreement(out_a, out_b, topk, thresholds)
    prompt_len = a.requests.requests[request].prompt_len
    compared = alignment.positions
    # KL is defined for decode steps whose predicting position (prompt_len - 1 + s) is comparable.
    steps = int(min(len(out_a), len(out_b), max(0, compared.max() - prompt_len + 2) if compared.size else 0))
    kl, kl_source = kl_per_step(a, b, request, steps, topk)
    return RequestResult(
        index=request, prompt_len=prompt_len, tokens_a=out_a.tolist(), tokens_b=out_b.tolist(),
        token_match_rate=agreement.match_rate, first_divergent_step=agreement.first_divergent_step,
        divergence=agreement.divergence, compared_positions=int(compared.size), kl=kl, kl_source=kl_source,
        topk_a=topk.ids_a.tolist(), topk_b=topk.ids_b.tolist())
