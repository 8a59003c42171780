"""The HTML report: self-contained, escaped, and it opens in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.compare import Comparison, compare
from ptrace.replay.session import ReplayConfig, replay
from ptrace.reports.html import render, write_report
from tests.conftest import ROOT
from ptrace.testing.bundles import SyntheticRequest, write_bundle

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory, example_model) -> tuple[Path, str]:
    """A bf16 replay of a capture whose prompt tries to inject a script."""
    tmp = tmp_path_factory.mktemp("report")
    source = capture(CaptureConfig(backend="torch", model=example_model, output=tmp / "src.zarr", prompts=(f"Hello {HOSTILE} world", "Second prompt"), command=("ptrace", "capture", HOSTILE), sampling=SamplingParams(max_new_tokens=6), settings=CaptureSettings(tensors=("*",))))
    result = replay(ReplayConfig(bundle=source, backend="torch", dtype="bfloat16", output=tmp / "r"))
    html = render(result.primary)
    assert "<title>ptrace: torch float32 vs torch bfloat16</title>" in html
    assert all(f"ptrace compare {source} {path}" in html for path in result.bundles.values())
    assert render(_through_json(result.primary)) == html, "the report renders from the --json output alone"
    path = tmp / "report.html"
    path.write_text(html)
    return path, html


def _through_json(comparison: Comparison) -> Comparison:
    """What a later reader of ``--json`` output gets back."""
    return Comparison.from_dict(json.loads(json.dumps(comparison.to_dict(), allow_nan=False)))


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_report_renders_the_same_from_the_json_output_alone(tmp_path, mode):
    """compare -> to_dict -> JSON -> from_dict -> write_report: the same HTML, with no bundle."""
    requests = [SyntheticRequest((1, 2, 3), (4, 5, 6, 7), text="first prompt"),
                SyntheticRequest((3, 2), (1, 5, 6), text="second prompt")]
    flipped = [requests[0], SyntheticRequest((3, 2), (1, 7, 7), text="second prompt")]
    with (open_bundle(write_bundle(tmp_path / "a.zarr", requests, mode=mode)) as a,
          open_bundle(write_bundle(tmp_path / "b.zarr", flipped, mode=mode, noise=0.05)) as b):
        comparison = compare(a, b)
    shutil.rmtree(tmp_path / "a.zarr")
    shutil.rmtree(tmp_path / "b.zarr")
    original = write_report(comparison, tmp_path / "original.html").read_text()
    again = write_report(_through_json(comparison), tmp_path / "again.html").read_text()
    assert again == original
    assert "first prompt" in original and "second prompt" in original
    assert "ptrace: a.zarr vs b.zarr" in original and f"ptrace compare {tmp_path / 'a.zarr'}" in original


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
