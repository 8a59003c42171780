"""The HTML report: self-contained, escaped, and it opens in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.replay.session import TEACHER, ReplayConfig, replay
from ptrace.reports.html import render
from tests.conftest import ROOT

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory, example_model) -> tuple[Path, str]:
    """A bf16 replay of a capture whose prompt tries to inject a script."""
    tmp = tmp_path_factory.mktemp("report")
    source = capture(CaptureConfig(backend="torch", model=example_model, output=tmp / "src.zarr", prompts=(f"Hello {HOSTILE} world", "Second prompt"), command=("ptrace", "capture", HOSTILE), sampling=SamplingParams(max_new_tokens=6), settings=CaptureSettings(tensors=("*",))))
    result = replay(ReplayConfig(bundle=source, backend="torch", dtype="bfloat16", output=tmp / "r"))
    html = render(result.primary, title="test", prompts=[f"Hello {HOSTILE} world", "Second prompt"],
                  commands=[f"ptrace compare {source} {result.bundles[TEACHER]}"])
    path = tmp / "report.html"
    path.write_text(html)
    return path, html


def test_everything_from_a_bundle_is_escaped(hostile_report):
    _, html = hostile_report
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower(), "the report has no script at all"


def test_report_is_self_contained(hostile_report):
    _, html = hostile_report
    for reference in ("http://", "https://", "src=\"//", "@import", "url("):
        assert reference not in html.replace("http-equiv", ""), reference


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is needed for this test: apt-get install chromium (make test installs it)")


def _page_requests(net_log: Path) -> list[str]:
    """URLs the *page* asked for. Chromium's own background traffic (update checks, network
    time) is marked with the initiator "not an origin" and is not the report's doing."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"].get("url") for e in log["events"] if e["type"] == start_job
            and e["params"].get("initiator") != "not an origin"
            and not e["params"].get("url", "file:").startswith(("file:", "data:"))]


def test_report_opens_in_headless_chromium(hostile_report, tmp_path):
    path, html = hostile_report
    browser = _chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-default-apps", f"--user-data-dir={tmp_path / 'profile'}"]
    # The screenshot is kept (build/ is ignored by git) so that a person can look at it.
    screenshot = ROOT / "build" / "report-screenshot.png"
    screenshot.parent.mkdir(exist_ok=True)
    net_log = tmp_path / "net.json"
    shot = subprocess.run([*common, "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}",
                           f"--screenshot={screenshot}", "--window-size=1280,1400", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    console = [line for line in shot.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    assert _page_requests(net_log) == [], "the report must not fetch anything"
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'id="verdict"' in dom.stdout and "first divergent tensor" in dom.stdout
    assert HOSTILE not in dom.stdout
