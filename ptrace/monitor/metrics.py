"""The canary's Prometheus metrics: one registry, updated after every cycle, served over HTTP
(``--metrics-port``) or written as a metrics file (``--once --metrics-file``).

Names follow Prometheus's conventions: a ``ptrace_`` prefix, base units in the name (seconds,
nats), ``_total`` on counters, ratios from 0 to 1, and labels with a few values only: the result
of a cycle (``canary.RESULTS``), the load level (``--load``: filler streams) and the golden run's
identity in ``ptrace_build_info``. Every
``result`` series exists from the start at 0, so ``rate()`` and ``increase()`` see the first one.

Until the first comparison, and after a cycle that could not compare, the measurements keep
their last value (NaN before any): ``ptrace_canary_up`` says whether they are current, and
``ptrace_last_success_timestamp_seconds`` how old they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from ptrace import DISTRIBUTION
from ptrace.errors import UsageError
from ptrace.monitor.canary import RESULTS, CycleResult, Golden
from ptrace.monitor.textfile import FIRST_DIVERGENCE, KL_MAX, NO_DIVERGENCE, TOKEN_AGREEMENT, write_metrics_file

#: KL buckets in nats: float32 engines agree to ~1e-9, 16-bit ones to ~1e-5 .. 1e-3; a real
#: divergence is 0.1 and above.
KL_BUCKETS = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, math.inf)


# prometheus_client's one switch for them, process-wide: ptrace exports no *_created series at all.
disable_created_metrics()


def _ptrace_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a checkout
        return "unknown"


class CanaryMetrics:
    """The canary's registry. With ``loads`` (``--load``), every series but ``ptrace_build_info``
    carries a ``load`` label (the number of filler streams), one series per level, so that the
    levels stay apart; without, no series has it."""

    def __init__(self, golden: Golden, loads: Sequence[int] | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.labelled = loads is not None
        per_load = ["load"] if self.labelled else []
        self.up = Gauge("ptrace_canary_up", "1 if the last cycle reached the endpoint and compared its answers.",
                        per_load, registry=registry)
        self.runs = Counter("ptrace_canary_runs", "Canary cycles by result: pass, warn, fail, or the endpoint's "
                            "problem.", [*per_load, "result"], registry=registry)
        self.agreement = Gauge(*TOKEN_AGREEMENT, per_load, registry=registry)
        self.first_divergence = Gauge(*FIRST_DIVERGENCE, per_load, registry=registry)
        self.kl = Histogram("ptrace_kl_divergence_nats", "KL(golden || served) of each compared decode step's "
                            "next-token distribution, from top-k logprobs, in nats.", per_load, buckets=KL_BUCKETS,
                            registry=registry)
        self.kl_max = Gauge(*KL_MAX, per_load, registry=registry)
        self.logprob_error = Gauge("ptrace_logprob_max_abs_error_nats", "Largest difference of a golden token's "
                                   "logprob, served against golden, in nats.", per_load, registry=registry)
        self.last_success = Gauge("ptrace_last_success_timestamp_seconds", "When the last cycle that compared "
                                  "the endpoint's answers (whatever the verdict) started (Unix time).",
                                  per_load, registry=registry)
        self.duration = Gauge("ptrace_canary_cycle_duration_seconds", "How long the last cycle took.",
                              per_load, registry=registry)
        self.measurements = (self.agreement, self.first_divergence, self.kl_max, self.logprob_error)
        for load in loads or (0,):
            for result in RESULTS:
                self._at(self.runs, load, result=result)
            for gauge in self.measurements:
                self._at(gauge, load).set(math.nan)
            if self.labelled:  # labelled series exist once touched: the level's exist from the start
                self._at(self.up, load).set(0)
                self._at(self.kl, load)
        info = Gauge("ptrace_build_info", "The golden bundle the canary compares against: its engine, dtype and "
                     "model fingerprint, and this ptrace's version.",
                     ["engine", "dtype", "model_fingerprint", "version"], registry=registry)
        info.labels(engine=golden.engine, dtype=golden.dtype, model_fingerprint=golden.model_fingerprint,
                    version=_ptrace_version()).set(1)

    def _at(self, metric, load: int, **labels: str):
        """``metric``'s series with ``labels`` for cycles at ``load`` filler streams."""
        if self.labelled:
            labels["load"] = str(load)
        return metric.labels(**labels) if labels else metric

    def record(self, cycle: CycleResult) -> None:
        def at(metric, **labels: str):
            return self._at(metric, cycle.load, **labels)

        at(self.runs, result=cycle.result).inc()
        at(self.duration).set(cycle.duration_seconds)
        at(self.up).set(1 if cycle.compared else 0)
        if not cycle.compared:
            for gauge in self.measurements:
                at(gauge).set(math.nan)
            return
        at(self.agreement).set(cycle.token_match_rate)
        first = cycle.first_divergent_step
        at(self.first_divergence).set(NO_DIVERGENCE if first is None else first)
        for value in cycle.kl:
            at(self.kl).observe(value)
        at(self.kl_max).set(max(cycle.kl, default=math.nan))
        at(self.logprob_error).set(cycle.logprob_max_abs_error)
        at(self.last_success).set(cycle.started)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; the port bound (``0``: any free one)."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                             hint="choose another --metrics-port (0 picks a free one)") from None
        return int(server.server_address[1])

    def write(self, path: Path) -> None:
        write_metrics_file(self.registry, path)
