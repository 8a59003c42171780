"""``ptrace --help`` and every other command start without the monitoring dependencies: only
``ptrace monitor`` and ``--metrics-file`` import prometheus_client."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_cli_starts_without_prometheus_client():
    probe = subprocess.run([sys.executable, "-c", "import sys, ptrace.cli; "
                            "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', "
                            "'ptrace.monitor', 'urllib.request'))))"], capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
