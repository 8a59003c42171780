"""The shipped alert rules and dashboard: valid, unit-tested by promtool, and reading only series
that ptrace exports."""

from __future__ import annotations

import json
import re
import subprocess

from ptrace.bundle_spec import open_bundle
from ptrace.compare import compare
from ptrace.monitor.canary import load_golden
from ptrace.monitor.metrics import CanaryMetrics
from ptrace.monitor.textfile import comparison_registry
from tests.conftest import GOLDEN, ROOT
from tests.monitor.servers import prometheus_binary

MONITORING = ROOT / "monitoring"
_SERIES = re.compile(r"\bptrace_[a-z_]+\b")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    _, promtool = prometheus_binary()
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=MONITORING, timeout=120)


def test_promtool_checks_and_unit_tests_the_rules():
    check = _promtool("check", "rules", "ptrace-alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 9 rules found" in check.stdout
    test = _promtool("test", "rules", "ptrace-alerts.test.yml")
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def _exported() -> set[str]:
    """Every sample name ptrace writes: the canary's registry and a comparison's metrics file."""
    with open_bundle(GOLDEN / "torch.zarr") as a, open_bundle(GOLDEN / "replay.teacher.zarr") as b:
        registries = [CanaryMetrics(load_golden(GOLDEN / "torch.zarr")).registry,
                      comparison_registry(compare(a, b))]
    return {sample.name for registry in registries for family in registry.collect() for sample in family.samples}


def test_rules_and_dashboard_read_only_exported_series():
    exported = _exported()
    rules = (MONITORING / "ptrace-alerts.yml").read_text()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = set(_SERIES.findall(rules)) | {name for expr in exprs for name in _SERIES.findall(expr)}
    assert {"ptrace_canary_up", "ptrace_token_agreement_ratio", "ptrace_layer_cosine_similarity",
            "ptrace_kl_divergence_nats_bucket", "ptrace_last_success_timestamp_seconds"} <= used
    assert used <= exported, f"not exported by ptrace: {sorted(used - exported)}"
    sources = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert sources == {"${datasource}"}, "every panel reads the data source picked on import"


def test_metric_names_follow_prometheus_conventions():
    exported = _exported()
    assert all(name.startswith("ptrace_") for name in exported)
    counters = {name for name in exported if "runs" in name}
    assert counters and all(name.endswith("_total") for name in counters)
    assert not [name for name in exported if name.endswith("_created")], "no *_created series"
    assert "ptrace_canary_runs_total" in exported and "ptrace_build_info" in exported
