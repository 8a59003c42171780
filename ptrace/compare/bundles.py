"""Compare two bundles: tokens, tensors, distributions; then localize the divergence.

Engine-free by design (it reads bundles, never runs a model), so ``ptrace compare`` works on a
laptop with neither engine installed. The result is plain data (:class:`Comparison`) holding
everything the report shows, so a report renders without the bundles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ptrace.bundle_spec.names import is_rank_shard, sort_forward
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.structure import require_structure
from ptrace.compare.align import align
from ptrace.compare.localize import earliest, first_divergent, first_nonfinite, largest_local_error
from ptrace.compare.noise import coarser
from ptrace.compare.results import Comparison, RequestResult, TensorResult
from ptrace.compare.routing import compare_routing, is_categorical
from ptrace.compare.settings import recorded as recorded_settings
from ptrace.compare.stability import with_stability
from ptrace.compare.summary import with_summary
from ptrace.compare.tensors import compare_tensor, worth_compiling
from ptrace.compare.thresholds import thresholds_for, worst
from ptrace.compare.tokens import compare_request, overall_agreement, token_verdict
from ptrace.errors import ComparisonError

_SAME_INPUTS = "compare a bundle with a replay of it (`ptrace replay`), or two captures of the same prompts"


def _run_summary(bundle: Bundle) -> dict[str, Any]:
    """What the report shows of one run."""
    run = bundle.run
    records = bundle.requests.requests
    return {
        "path": str(bundle.path), "bundle_id": bundle.manifest.bundle_id, "backend": run.backend,
        "backend_version": run.backend_version, "dtype": run.dtype, "device": run.device,
        "mode": bundle.mode, "command": list(bundle.manifest.command), "model": bundle.model.name,
        "model_fingerprint": bundle.model.fingerprint, "run": run.to_dict(),
        "environment": bundle.environment.to_dict(), "replay": bundle.replay_info(),
        "schedule": bundle.schedule_info(),
        "parallel": None if (parallel := bundle.parallel_info()) is None else parallel.to_dict(),
        "output_tokens": [list(r.output_tokens) for r in records],
        "prompts": [r.prompt for r in records],
        "settings": recorded_settings(bundle),
    }


def _check_same_inputs(a: Bundle, b: Bundle) -> None:
    if a.num_requests != b.num_requests:
        raise ComparisonError(f"cannot compare {a.path} with {b.path}: the bundles have {a.num_requests} "
                              f"and {b.num_requests} requests", hint=_SAME_INPUTS)
    for r in range(a.num_requests):
        if a.prompt_ids(r).tolist() != b.prompt_ids(r).tolist():
            raise ComparisonError(f"cannot compare {a.path} with {b.path}: request {r} has different "
                                  "prompts in the two bundles: not the same run", hint=_SAME_INPUTS)


def compare(a: Bundle, b: Bundle, *, threshold_overrides: dict[str, float] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Compare run ``b`` against reference run ``a`` (same inputs; engines, dtypes may differ).
    A bundle that breaks the spec's structural rules is refused, however it was opened."""
    require_structure(a)
    require_structure(b)
    thresholds_dtype = coarser(a.run.dtype, b.run.dtype)
    thresholds = thresholds_for(thresholds_dtype, threshold_overrides)
    _check_same_inputs(a, b)
    alignments = {r: align(a, b, r) for r in range(a.num_requests)}
    names = sort_forward(n for n in set(a.tensor_names) & set(b.tensor_names) if not is_categorical(n))
    # a rank's own shards (--per-rank) have no counterpart in a run that kept none: not missing
    missing = sorted(n for n in set(a.tensor_names) ^ set(b.tensor_names) if not is_rank_shard(n))
    compiled = worth_compiling(a, b, names, alignments)
    done = 0

    def one(name: str) -> TensorResult:
        nonlocal done
        result = compare_tensor(a, b, name, alignments, thresholds, compiled=compiled)
        done += 1
        if progress:
            progress(done, len(names))
        return result

    def tokens_and_nonfinite() -> tuple[list[RequestResult], dict[str, Any] | None]:
        return ([compare_request(a, b, r, alignments[r], thresholds) for r in range(a.num_requests)],
                first_nonfinite(a, "a", names) or first_nonfinite(b, "b", names))

    # Tensors are independent, and reading, decoding and the kernel release the GIL (the CRC-32C
    # does not): one worker per core.
    # The tokens and the NaN/Inf search go first to the same workers, so that they run beside the
    # first tensor (whose worker loads the compiled kernel) and no thread waits for them alone.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        beside = pool.submit(tokens_and_nonfinite)
        compared = pool.map(one, names)
        try:
            requests, nonfinite = beside.result()
        except BaseException:  # an error there is the answer: the tensors not started are not waited for
            pool.shutdown(cancel_futures=True)
            raise
        tensors = list(compared)

    divergent = first_divergent(tensors)
    requests = [replace(r, first_divergent_tensor=divergent.get(r.index, (None, None))[0],
                        first_divergent_position=divergent.get(r.index, (None, None))[1]) for r in requests]
    first_request, first_tensor, first_position = earliest(divergent) or (None, None, None)
    match_rate, first_step = overall_agreement(requests)
    return with_summary(with_stability(Comparison(
        verdict=worst([t.verdict for t in tensors] + [token_verdict(r) for r in requests]), summary="",
        token_match_rate=match_rate, first_divergent_step=first_step,
        first_divergent_tensor=first_tensor, first_divergent_position=first_position,
        first_divergent_request=first_request, largest_local_error=largest_local_error(tensors),
        first_nonfinite=nonfinite,
        thresholds=thresholds.to_dict(), thresholds_dtype=thresholds_dtype, tensors=tensors, requests=requests,
        a=_run_summary(a), b=_run_summary(b), missing=missing,
        routing=compare_routing(a, b, alignments))))


def combine(*, tensors: Comparison, tokens: Comparison) -> Comparison:
    """One result from two replays of the same bundle: tensor metrics from one (teacher-forced,
    aligned at every position), token agreement from the other (free-running).

    Run B's summary is the tensor run's, with the token run's generated token texts (they
    belong with the token results) and its path under ``token_run_path``; the tensor run's
    token texts stay under ``teacher_output_tokens``, and each request keeps its tensor-run
    result under ``teacher_forced`` (the report shows both timelines)."""
    if tensors is tokens:
        return tensors
    b = {**tensors.b, "output_tokens": tokens.b["output_tokens"], "token_run_path": tokens.b["path"],
         "teacher_output_tokens": tensors.b["output_tokens"]}
    located = {r.index: r for r in tensors.requests}  # where each request diverges: from the tensors
    requests = [replace(r, first_divergent_tensor=located[r.index].first_divergent_tensor,
                        first_divergent_position=located[r.index].first_divergent_position,
                        teacher_forced=located[r.index])
                for r in tokens.requests]
    return with_summary(with_stability(replace(
        tensors, token_match_rate=tokens.token_match_rate, first_divergent_step=tokens.first_divergent_step,
        requests=requests, verdict=worst([tensors.verdict, tokens.verdict]), b=b)))
