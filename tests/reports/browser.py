"""Open a report in real headless Chromium: what a person's browser makes of it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


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


def open_in_chromium(path: Path, scratch: Path, screenshot_name: str) -> str:
    """Screenshot the page (kept under build/, ignored by git, for a person to look at), check
    that it logged nothing to the console and fetched nothing, and return its DOM."""
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-default-apps", f"--user-data-dir={scratch / 'profile'}"]
    screenshot = ROOT / "build" / screenshot_name
    screenshot.parent.mkdir(exist_ok=True)
    net_log = scratch / "net.json"
    shot = subprocess.run([*common, "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}",
                           f"--screenshot={screenshot}", "--window-size=1280,2400", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    console = [line for line in shot.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    assert _page_requests(net_log) == [], "the report must not fetch anything"
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    return dom.stdout
