"""The HTML report: self-contained, escaped, and it opens in a real browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.compare import Comparison, compare
from ptrace.reports.html import render, write_report
from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.reports.browser import open_in_chromium
from tests.reports.conftest import HOSTILE


@pytest.fixture(scope="module")
def hostile_report(replayed, hostile_source, tmp_path_factory) -> tuple[Path, str]:
    """The report of a bf16 replay of a capture whose prompt tries to inject a script."""
    html = render(replayed.primary)
    assert "<title>ptrace: torch float32 vs torch bfloat16</title>" in html
    assert all(f"ptrace compare {hostile_source} {path}" in html for path in replayed.bundles.values())
    assert render(through_json(replayed.primary)) == html, "the report renders from the --json output alone"
    path = tmp_path_factory.mktemp("hostile") / "report.html"
    path.write_text(html)
    return path, html


def through_json(comparison: Comparison) -> Comparison:
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
    again = write_report(through_json(comparison), tmp_path / "again.html").read_text()
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
        assert reference not in html.replace("http-equiv", "").replace("url(#hatch-", ""), reference


def test_report_opens_in_headless_chromium(hostile_report, tmp_path):
    path, _ = hostile_report
    dom = open_in_chromium(path, tmp_path, "report-screenshot.png")
    assert 'id="verdict"' in dom and "first divergent tensor" in dom
    assert HOSTILE not in dom


def test_whatif_report_opens_in_headless_chromium(whatif_comparison, tmp_path):
    """A sweep's report: the what-if section with its curves, in a real browser, from its JSON."""
    html = render(whatif_comparison)
    assert render(through_json(whatif_comparison)) == html, "the report renders from the --json output alone"
    path = write_report(whatif_comparison, tmp_path / "whatif.html")
    dom = open_in_chromium(path, tmp_path, "whatif-report-screenshot.png")
    assert 'id="whatifs"' in dom and "Sweep over std" in dom
    assert 'aria-label="requests that diverge against std"' in dom
