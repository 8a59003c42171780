"""Metrics files: a comparison (``ptrace replay/compare --metrics-file``) or the canary's last
cycle (``ptrace monitor --once --metrics-file``) in Prometheus's text exposition format, for
node_exporter's textfile collector.

The collector may read the file at any moment, so it is written whole to a temporary file beside
it and renamed over it (``prometheus_client.write_to_textfile``): a scrape sees the old file or
the new one, never half of one. The temporary name does not end in ``.prom``, so the collector
never reads it.

Every series of a comparison carries the compared run's ``engine`` and ``dtype``: jobs that
write files on the same machine stay apart, and the labels' values stay few.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from ptrace.bundle_spec.names import layer_index
from ptrace.compare.results import Comparison
from ptrace.compare.thresholds import FAIL, PASS, WARN
from ptrace.errors import UsageError

#: ``ptrace_first_divergence_step`` when the tokens never diverge.
NO_DIVERGENCE = -1

TOKEN_AGREEMENT = ("ptrace_token_agreement_ratio",
                   "Share of generated tokens equal to the reference's, 0 to 1.")
FIRST_DIVERGENCE = ("ptrace_first_divergence_step",
                    "Earliest decode step whose token differs from the reference's (-1: none).")
KL_MAX = ("ptrace_kl_divergence_max_nats",
          "Largest KL(reference || compared) of a compared decode step's next-token distribution, in nats.")


def write_metrics_file(registry: CollectorRegistry, path: Path) -> None:
    """Write ``registry`` to ``path`` atomically (temporary file + rename)."""
    try:
        write_to_textfile(str(path), registry)
    except OSError as exc:
        raise UsageError(f"cannot write the metrics file {path}: {exc.strerror or exc}",
                         hint="pass a writable path, such as node_exporter's textfile directory") from None


def comparison_registry(comparison: Comparison) -> CollectorRegistry:
    """A comparison's headline numbers: verdict, token agreement, first divergent step, the
    largest KL, and the cosine and mean abs error of each layer's output (``layers.{i}.out``)."""
    registry = CollectorRegistry()
    labels = {"engine": str(comparison.b.get("backend", "")), "dtype": str(comparison.b.get("dtype", ""))}

    def gauge(name: str, documentation: str, value: float, **extra: str) -> None:
        metric = Gauge(name, documentation, [*labels, *extra], registry=registry)
        metric.labels(**labels, **extra).set(value)

    verdict = Gauge("ptrace_comparison_verdict", "The comparison's verdict: 1 for the state it is in.",
                    [*labels, "verdict"], registry=registry)
    for state in (PASS, WARN, FAIL):
        verdict.labels(**labels, verdict=state).set(1.0 if comparison.verdict == state else 0.0)
    gauge(*TOKEN_AGREEMENT, comparison.token_match_rate)
    first = comparison.first_divergent_step
    gauge(*FIRST_DIVERGENCE, NO_DIVERGENCE if first is None else first)
    kl = [value for request in comparison.requests for value in request.kl if math.isfinite(value)]
    if kl:
        gauge(*KL_MAX, max(kl))
    layers = [(layer_index(t.name), t) for t in comparison.tensors if t.name.endswith(".out")]
    layers = [(layer, t) for layer, t in layers if layer is not None and not t.stats_only]
    if layers:
        cosine = Gauge("ptrace_layer_cosine_similarity", "Cosine similarity of a decoder layer's output "
                       "(the residual stream) with the reference's, over every compared position.",
                       [*labels, "layer"], registry=registry)
        error = Gauge("ptrace_layer_mean_abs_error", "Mean absolute error of a decoder layer's output against "
                      "the reference's, over every compared position.", [*labels, "layer"], registry=registry)
        for layer, tensor in layers:
            cosine.labels(**labels, layer=str(layer)).set(tensor.cos_sim)
            error.labels(**labels, layer=str(layer)).set(tensor.mean_abs_err)
    gauge("ptrace_comparison_timestamp_seconds", "When the comparison was written (Unix time).", time.time())
    return registry


def write_comparison_metrics(comparison: Comparison, path: Path) -> None:
    write_metrics_file(comparison_registry(comparison), path)
