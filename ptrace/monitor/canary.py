"""The canary: a golden bundle's prompts sent to a live endpoint, its answers compared with the
bundle's, over and over.

A serving stack reports latency and cache use, never whether its numbers still match what the
model computed when it was validated; a kernel upgrade, an fp8 KV cache or a new parallel layout
changes them silently. The canary asks the endpoint the golden bundle's own questions (its
prompts as token ids, its sampling: greedy, or seeded exactly as the capture seeded each
request) and compares the answers with the recorded ones exactly as ``ptrace compare`` compares
two bundles (``ptrace.compare.tokens``): token agreement, the first divergent step and whether
that flip is between near-tied tokens (pass / warn / fail), and KL from top-k logprobs with its
tail bucket (``ptrace.compare.metrics.kl_topk``).

KL and logprob errors are measured only up to the first divergent step: after it, the two runs
continue different texts and their distributions answer different questions.

A cycle never raises for the endpoint's sake: down, slow, erroring or serving another model, it
ends as a :class:`CycleResult` whose ``result`` names the problem (``client.PROBLEMS``), and
:func:`run` carries on, backing off. Only a golden bundle that cannot serve as a reference is
refused, once, at start (:func:`load_golden`).

A cycle may run under load (``load`` filler streams, :mod:`ptrace.monitor.load`): the same
comparison, of answers computed in a busy server's batches; :func:`run` runs a cycle per load
level.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.schema import SamplingParams
from ptrace.compare.metrics import kl_topk
from ptrace.compare.results import RequestResult
from ptrace.compare.thresholds import FAIL, PASS, WARN, thresholds_for, worst
from ptrace.compare.tokens import TopK, overall_agreement, token_agreement, token_verdict
from ptrace.errors import BundleError, EndpointError, UsageError
from ptrace.monitor.client import BAD_RESPONSE, HTTP_ERROR, MODEL_MISMATCH, PROBLEMS, Endpoint, one_line
from ptrace.monitor.load import FillerShape, Load

log = logging.getLogger(__name__)

#: What a cycle can end as: a verdict, or the endpoint's problem.
VERDICTS = (PASS, WARN, FAIL)
RESULTS = VERDICTS + PROBLEMS
#: Prompt formats: token ids (exact), text (checked to tokenize as the bundle's ids), or ids
#: falling back to text when the endpoint refuses ids.
PROMPT_FORMATS = ("auto", "ids", "text")
#: The longest wait between cycles while the endpoint keeps failing (unless --interval is longer).
MAX_BACKOFF_SECONDS = 300.0
_TOKEN_ID_PREFIX = "token_id:"


@dataclass(frozen=True)
class GoldenRequest:
    index: int
    prompt: str | None
    prompt_ids: np.ndarray
    output_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


@dataclass(frozen=True)
class Golden:
    """What the canary needs of the golden bundle, read once: the bundle is closed afterwards."""

    path: Path
    engine: str
    dtype: str
    model_name: str
    model_fingerprint: str
    sampling: SamplingParams
    requests: tuple[GoldenRequest, ...]
    #: the model's vocabulary size (config.json's), what filler prompts draw their tokens from
    vocab_size: int

    @property
    def top_k(self) -> int:
        return min(r.topk_ids.shape[1] for r in self.requests)

    def filler_shape(self) -> FillerShape:
        """Fillers as long as the golden requests at most: they fit wherever those do."""
        longest = max(r.prompt_ids.size + r.output_ids.size for r in self.requests)
        max_tokens = max(r.output_ids.size for r in self.requests)
        return FillerShape(self.vocab_size, max(1, longest - max_tokens), max_tokens)


def load_golden(path: Path) -> Golden:
    """Read a golden bundle, refusing one that cannot be a reference for a live endpoint."""
    with open_bundle(path) as bundle:
        replay = bundle.replay_info()
        if replay is not None and replay["mode"] == "teacher-forced":
            raise BundleError(f"{path} is a teacher-forced replay: its tokens were forced, not generated",
                              hint="use a capture (ptrace capture) or a free-running replay as the golden bundle")
        if bundle.whatif_info() is not None:
            raise BundleError(f"{path} is a what-if run (perturbed on purpose), not a reference",
                              hint="use a capture of the unperturbed model as the golden bundle")
        if bundle.num_requests == 0:
            raise BundleError(f"{path} holds no request to send", hint="capture at least one prompt")
        requests = []
        for index, record in enumerate(bundle.requests.requests):
            topk_ids, topk_logprobs = bundle.topk(index)
            output_ids = bundle.output_ids(index)
            if output_ids.size == 0 or topk_ids.ndim != 2 or topk_ids.shape[1] == 0:
                raise BundleError(f"{path}: request {index} has no generated tokens with top-k logprobs to compare",
                                  hint="capture with --max-new-tokens and --logprobs above 0")
            requests.append(GoldenRequest(index, record.prompt, bundle.prompt_ids(index), output_ids,
                                          topk_ids, topk_logprobs))
        # A bundle without the model's vocabulary size: the ids it holds are in the vocabulary.
        vocab_size = int(bundle.model.config.get("vocab_size") or 1 + max(
            int(max(r.prompt_ids.max(initial=0), r.output_ids.max(), r.topk_ids.max())) for r in requests))
        return Golden(path=Path(path), engine=bundle.run.backend, dtype=bundle.run.dtype,
                      model_name=bundle.model.name, model_fingerprint=bundle.model.fingerprint,
                      sampling=bundle.run.sampling, requests=tuple(requests), vocab_size=vocab_size)


@dataclass(frozen=True)
class Served:
    """One completion as the endpoint gave it: tokens and per-step top-k ``[steps, k]``."""

    tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


@dataclass(frozen=True)
class CycleResult:
    """One cycle: a verdict with its measurements, or the problem that prevented them."""

    result: str
    #: one line saying what happened (the summary, or the problem)
    message: str
    #: when the cycle started (Unix time)
    started: float
    duration_seconds: float
    model: str | None = None
    requests: list[RequestResult] = field(default_factory=list)
    token_match_rate: float = math.nan
    first_divergent_step: int | None = None
    #: KL(golden || served) of every compared step of every request, in nats
    kl: list[float] = field(default_factory=list)
    #: the largest difference of a golden token's logprob, golden against served, in nats
    logprob_max_abs_error: float = math.nan
    #: filler streams running beside the canary's requests (``--load``), and how many fillers
    #: were answered to the end and failed meanwhile
    load: int = 0
    fillers_answered: int = 0
    fillers_failed: int = 0

    @property
    def started_at(self) -> str:
        """When the cycle started, in ISO 8601 (UTC, to the second): the stamp of its lines."""
        return _dt.datetime.fromtimestamp(self.started, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def compared(self) -> bool:
        """Whether the endpoint answered and the answers were compared (whatever the verdict)."""
        return self.result in VERDICTS

    def to_dict(self) -> dict[str, Any]:
        """The cycle as strict JSON data (``--json``); per request without the top-k id lists."""
        requests = [{k: v for k, v in r.to_dict().items() if k not in ("topk_a", "topk_b", "compared_positions")}
                    for r in self.requests]
        return {"result": self.result, "message": self.message, "started": self.started,
                "started_at": self.started_at, "duration_seconds": self.duration_seconds, "model": self.model,
                "token_match_rate": _finite(self.token_match_rate),
                "first_divergent_step": self.first_divergent_step,
                "kl_max": _finite(max(self.kl, default=math.nan)),
                "logprob_max_abs_error": _finite(self.logprob_max_abs_error), "load": self.load,
                "fillers_answered": self.fillers_answered, "fillers_failed": self.fillers_failed,
                "requests": requests}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Canary:
    """Compares ``endpoint``'s answers to ``golden``'s, one :meth:`cycle` at a time.

    ``model`` is the served model's name (default: the one model the endpoint lists);
    ``top_logprobs`` lowers the top-k asked for, for servers that cap it below the bundle's.
    """

    def __init__(self, golden: Golden, endpoint: Endpoint, *, model: str | None = None,
                 prompt_format: str = "auto", top_logprobs: int | None = None,
                 threshold_overrides: dict[str, float] | None = None) -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise UsageError(f"unknown prompt format {prompt_format!r}", hint=f"use {', '.join(PROMPT_FORMATS)}")
        if prompt_format == "text" and any(r.prompt is None for r in golden.requests):
            raise UsageError(f"{golden.path} has prompts without text (token ids only): they cannot be sent as text",
                             hint="use --prompt-format ids")
        if top_logprobs is not None and top_logprobs < 1:
            raise UsageError(f"--logprobs must be at least 1, not {top_logprobs}")
        self.golden = golden
        self.endpoint = endpoint
        self.model = model
        self.prompt_format = prompt_format
        self.top_logprobs = min(top_logprobs or golden.top_k, golden.top_k)
        self.thresholds = thresholds_for(golden.dtype, threshold_overrides)
        self._fillers = itertools.count()  # every filler's number, across cycles: none repeats

    def cycle(self, load: int = 0) -> CycleResult:
        """One comparison of every golden request, with ``load`` filler streams running beside."""
        if load < 0:
            raise UsageError(f"a load is a number of filler streams, 0 or more, not {load}")
        started, clock = time.time(), time.monotonic()
        fillers = None
        try:
            model = self._served_model()
            if load:
                fillers = Load(self.endpoint, model, load, self.golden.filler_shape(), self._fillers)
            with fillers or nullcontext():
                compared = [self._compare(request, self._complete(model, request))
                            for request in self.golden.requests]
        except EndpointError as exc:
            return CycleResult(exc.result, str(exc), started, time.monotonic() - clock, self.model, load=load)
        requests, errors = zip(*compared)
        error = max((e for e in errors if not math.isnan(e)), default=math.nan)
        answered, failed = (fillers.answered, fillers.failed) if fillers is not None else (0, 0)
        return replace(_judged(list(requests), error, model, started, time.monotonic() - clock), load=load,
                       fillers_answered=answered, fillers_failed=failed)

    # -- the endpoint ---------------------------------------------------------------------------
    def _served_model(self) -> str:
        models = self.endpoint.models()
        if self.model is not None:
            if self.model not in models:
                raise EndpointError(MODEL_MISMATCH, f"{self.endpoint.base_url} serves "
                                                    f"{_listing(models)}, not {self.model!r}")
            return self.model
        if len(models) != 1:
            raise EndpointError(MODEL_MISMATCH, f"{self.endpoint.base_url} serves {_listing(models)}: "
                                                "name the golden bundle's model with --model")
        return models[0]

    def _complete(self, model: str, request: GoldenRequest) -> Served:
        if self.prompt_format == "text":
            return self._ask(model, request, as_text=True)
        try:
            return self._ask(model, request, as_text=False)
        except EndpointError as exc:
            refused_ids = exc.result == HTTP_ERROR and exc.status is not None and 400 <= exc.status < 500
            if self.prompt_format != "auto" or not refused_ids or request.prompt is None:
                raise
            served = self._ask(model, request, as_text=True)
            log.warning("%s refuses token-id prompts (%s); sending text prompts, checked to tokenize as the "
                        "golden bundle's", self.endpoint.base_url, exc)
            self.prompt_format = "text"
            return served

    def _ask(self, model: str, request: GoldenRequest, *, as_text: bool) -> Served:
        sampling = self.golden.sampling
        body: dict[str, Any] = {
            "model": model, "prompt": request.prompt if as_text else request.prompt_ids.tolist(),
            "max_tokens": int(request.output_ids.size), "temperature": sampling.temperature,
            "top_p": sampling.top_p, "logprobs": self.top_logprobs, "stream": False,
            # vLLM's extensions (other servers ignore what they do not know): the capture's
            # fixed length, and token ids instead of token strings in the answer.
            "ignore_eos": sampling.ignore_eos, "return_tokens_as_token_ids": True, "return_token_ids": True,
        }
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if not sampling.greedy:
            body["seed"] = sampling.seed + request.index  # how every backend seeds request i
        answer = self.endpoint.complete(body)
        try:
            choice = answer["choices"][0]
            served = _served(choice, self.top_logprobs)
            if as_text:
                self._check_tokenization(request, choice, answer.get("usage"))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise EndpointError(BAD_RESPONSE, f"{self.endpoint.base_url}/completions: malformed completion for "
                                              f"request {request.index} ({type(exc).__name__}: "
                                              f"{one_line(str(exc))})") from None
        return served

    def _check_tokenization(self, request: GoldenRequest, choice: dict[str, Any], usage: Any) -> None:
        """The served prompt must be the golden bundle's token ids, or the answers are not comparable."""
        expected = request.prompt_ids.tolist()
        ids = choice.get("prompt_token_ids")
        if ids is not None:
            same, got = list(map(int, ids)) == expected, f"{len(ids)} tokens"
        elif isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            same, got = usage["prompt_tokens"] == len(expected), f"{usage['prompt_tokens']} tokens"
        else:
            raise EndpointError(BAD_RESPONSE, f"{self.endpoint.base_url} does not say how it tokenized request "
                                              f"{request.index}'s prompt: cannot check it")
        if not same:
            raise EndpointError(MODEL_MISMATCH, f"{self.endpoint.base_url} tokenizes request {request.index}'s prompt "
                                                f"differently ({got}; the golden bundle has {len(expected)}): "
                                                "another tokenizer or model")

    # -- comparison -----------------------------------------------------------------------------
    def _compare(self, golden: GoldenRequest, served: Served) -> tuple[RequestResult, float]:
        """The request's token agreement and KL, and its golden tokens' largest logprob error."""
        topk = TopK(golden.topk_ids, golden.topk_logprobs, served.topk_ids, served.topk_logprobs)
        agreement = token_agreement(golden.output_ids, served.tokens, topk, self.thresholds)
        steps = min(golden.output_ids.size, served.tokens.size)
        if agreement.first_divergent_step is not None:
            steps = min(steps, agreement.first_divergent_step + 1)  # the flip's own step still shares its context
        kl = kl_topk(topk.ids_a[:steps], topk.lp_a[:steps], topk.ids_b[:steps], topk.lp_b[:steps])
        result = RequestResult(
            index=golden.index, prompt_len=int(golden.prompt_ids.size), tokens_a=golden.output_ids.tolist(),
            tokens_b=served.tokens.tolist(), token_match_rate=agreement.match_rate,
            first_divergent_step=agreement.first_divergent_step, divergence=agreement.divergence,
            compared_positions=0, kl=kl.tolist(), kl_source=f"top-{topk.ids_b.shape[1]} logprobs",
            topk_a=topk.ids_a.tolist(), topk_b=topk.ids_b.tolist())
        return result, _logprob_max_abs_error(topk, golden.output_ids, steps)


def _listing(models: list[str]) -> str:
    return "no model" if not models else ", ".join(repr(m) for m in models[:5]) + (" ..." if len(models) > 5 else "")


def _token_id(key: str) -> int:
    """vLLM writes tokens as ``token_id:N`` when asked (``return_tokens_as_token_ids``)."""
    if not key.startswith(_TOKEN_ID_PREFIX):
        raise ValueError(f"token {one_line(key, 40)!r} is text, not an id: the server ignores "
                         "return_tokens_as_token_ids (vLLM's), which the canary needs")
    return int(key[len(_TOKEN_ID_PREFIX):])


def _served(choice: dict[str, Any], k: int) -> Served:
    """Tokens and top-k of one OpenAI completion choice (``logprobs.top_logprobs``: one
    ``{token: logprob}`` per step, the top-k plus possibly the sampled token)."""
    logprobs = choice["logprobs"]
    top = logprobs["top_logprobs"]
    ids = choice.get("token_ids")
    tokens = np.array([int(t) for t in ids] if ids is not None else [_token_id(t) for t in logprobs["tokens"]],
                      dtype=np.int64)
    if len(top) != tokens.size:
        raise ValueError(f"{tokens.size} tokens but {len(top)} steps of top logprobs")
    width = min([k, *(len(entries) for entries in top)])
    topk_ids = np.zeros((tokens.size, width), np.int64)
    topk_logprobs = np.zeros((tokens.size, width), np.float64)
    for step, entries in enumerate(top):
        ranked = sorted(((float(lp), _token_id(token)) for token, lp in entries.items()), reverse=True)[:width]
        topk_ids[step] = [token for _, token in ranked]
        topk_logprobs[step] = [lp for lp, _ in ranked]
    return Served(tokens, topk_ids, topk_logprobs)


def _judged(requests: list[RequestResult], error: float, model: str, started: float,
            duration: float) -> CycleResult:
    verdict = worst([token_verdict(r) for r in requests])
    match_rate, first_step = overall_agreement(requests)
    kl = [value for r in requests for value in r.kl]
    total = sum(len(r.tokens_a) for r in requests)
    tokens = (f"tokens identical for {total}/{total} steps" if first_step is None else
              f"tokens agree for {round(match_rate * total)}/{total} steps, first divergence at step {first_step}"
              + (" (a near-tie flip)" if verdict == WARN else ""))
    message = (f"{verdict.upper()}: {tokens}; KL up to {max(kl, default=0.0):.3g} nats, golden-token logprobs "
               f"within {error:.3g} nats ({len(requests)} request{'s' * (len(requests) != 1)} to {model!r} "
               f"in {duration:.2f} s)")
    return CycleResult(verdict, message, started, duration, model, requests, match_rate, first_step, kl, error)


def _logprob_max_abs_error(topk: TopK, tokens: np.ndarray, steps: int) -> float:
    """How far the served logprob of each golden token is from the golden one over the first
    ``steps`` steps: the drift in nats, readable at a glance. A token missing from either top-k
    is skipped; NaN when none is comparable."""
    errors = []
    for step in range(steps):
        token = int(tokens[step])
        golden = dict(zip(topk.ids_a[step].tolist(), topk.lp_a[step].tolist()))
        served = dict(zip(topk.ids_b[step].tolist(), topk.lp_b[step].tolist()))
        if token in golden and token in served:
            errors.append(abs(golden[token] - served[token]))
    return max(errors, default=math.nan)


def backoff(interval: float, failures: int) -> float:
    """Seconds to wait after ``failures`` failed cycles in a row: ``interval``, doubling per
    failure up to :data:`MAX_BACKOFF_SECONDS` (or ``interval`` if that is longer)."""
    return min(interval * 2.0 ** min(failures, 16), max(interval, MAX_BACKOFF_SECONDS))


def run(canary: Canary, *, interval: float, once: bool = False, stop: threading.Event | None = None,
        on_cycle: Callable[[CycleResult], None] = lambda cycle: None, loads: Sequence[int] = (0,),
        before_cycle: Callable[[int], None] = lambda load: None) -> list[CycleResult]:
    """Round after round until ``stop`` is set (or once), a round being a cycle at each of
    ``loads`` (filler streams) in turn, calling ``before_cycle`` with its load before each and
    ``on_cycle`` after; returns the last round's cycles.

    A problem is logged once when it appears and once when it is gone (per load level), not every
    cycle; each line starts with the cycle's start in ISO 8601. A round in which any cycle could
    not compare backs off.
    """
    stop = stop or threading.Event()
    failures, problems = 0, dict.fromkeys(loads)
    while True:
        cycles = []
        for load in loads:
            before_cycle(load)
            cycle = canary.cycle(load)
            on_cycle(cycle)
            cycles.append(cycle)
        failures = 0 if all(cycle.compared for cycle in cycles) else failures + 1
        wait = backoff(interval, failures)
        for cycle in cycles:
            at = f" at load {cycle.load}" if len(loads) > 1 or cycle.load else ""
            now = None if cycle.compared else (cycle.result, cycle.message)
            if now is not None and now != problems[cycle.load]:
                log.warning("%s %s%s: %s%s", cycle.started_at, cycle.result, at, cycle.message,
                            "" if once else f" (next try in {wait:g} s)")
            elif now is None and problems[cycle.load] is not None:
                log.warning("%s recovered%s: %s answers again", cycle.started_at, at, canary.endpoint.base_url)
            problems[cycle.load] = now
        if once or stop.wait(wait):
            return cycles
