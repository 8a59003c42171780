"""The "Stability across requests" section and the what-ifs against prompt length: shown from two
requests on, drawn from the Comparison alone (so from ``--json``), every string escaped."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from markupsafe import escape

from ptrace.bundle_spec import open_bundle
from ptrace.compare import Comparison, compare
from ptrace.compare.results import Stability
from ptrace.reports import stability, whatifs
from ptrace.reports.html import render
from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.reports.conftest import HOSTILE
from tests.reports.test_report import through_json

OUTPUTS = (4, 5, 6, 7, 8)


def _comparison(tmp_path: Path, flips: list[int | None]) -> Comparison:
    """Request i has a prompt of i + 2 tokens; B's tokens differ from step ``flips[i]`` on."""
    prompts = [tuple(range(1, i + 3)) for i in range(len(flips))]
    b_outputs = [OUTPUTS if f is None else OUTPUTS[:f] + (9,) * (len(OUTPUTS) - f) for f in flips]
    a = write_bundle(tmp_path / "a.zarr", [SyntheticRequest(p, OUTPUTS, text=f"prompt {i}") for i, p in enumerate(prompts)])
    b = write_bundle(tmp_path / "b.zarr", [SyntheticRequest(p, o) for p, o in zip(prompts, b_outputs)], noise=0.02)
    with open_bundle(a) as ra, open_bundle(b) as rb:
        return compare(ra, rb)


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> Comparison:
    """Two buckets (prompts of 2-5 and 6-9 tokens): one of the short four diverges, three of the long four."""
    return _comparison(tmp_path_factory.mktemp("eight"), [None, None, 2, None, 1, 3, None, 3])


def _section(html: str) -> str:
    start = html.index('<h2 id="stability">')
    return html[start:html.index('<h2 id="tokens">')]


def test_the_section_shows_divergence_per_length_and_kl_per_position(eight):
    html = render(eight)
    section = _section(html)
    assert '<a href="#stability">Stability</a>' in html
    assert "<strong>4/8 requests</strong> (50.0 %)" in section
    for label in ("divergence rate against prompt length", "distribution of first divergent steps",
                  "KL against position", "top-1 agreement against position"):
        assert f'aria-label="{label}"' in section
    assert "prompts of 2–5 tokens: 1/4 requests diverge" in section
    assert "prompts of 6–9 tokens: 3/4 requests diverge" in section
    assert "step 3: 2 request(s) first diverge" in section
    assert "From a free-running run: each request counts only up to its first divergence" in section
    assert "exact, from the full logits" in section
    charts = stability.section(eight.stability)["charts"]
    bars = charts[0].bars
    assert [b["h"] for b in bars] == sorted(b["h"] for b in bars) and bars[1]["h"] == 3 * bars[0]["h"]


def test_the_per_request_table_has_the_kl(eight):
    html = render(eight)
    table = html[html.index('<h2 id="requests">'):]
    assert "<th>mean KL</th><th>max KL</th>" in table
    r = eight.requests[5]
    assert f"({r.tokens_matched})" in table and r.tokens_matched == 3


def test_one_request_has_no_section(tmp_path):
    html = render(_comparison(tmp_path, [1]))
    assert 'id="stability"' not in html and "#stability" not in html


def test_the_section_renders_the_same_from_json(eight):
    assert render(through_json(eight)) == render(eight)


def test_a_replay_takes_positions_from_its_teacher_forced_run(replayed):
    c = replayed.primary
    data = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert data["stability"]["position_source"] == "teacher-forced"
    assert [r["prompt_len"] for r in data["requests"]] == [r.prompt_len for r in c.requests]
    assert all("mean_kl" in r and "first_divergent_step" in r for r in data["requests"])
    assert "From the teacher-forced run" in _section(render(c))


def _with_buckets(w, rates: list[float]) -> object:
    """``w`` with a stability of two prompt-length buckets diverging at ``rates``."""
    buckets = [{"min_len": 100 * (i + 1), "max_len": 100 * (i + 1) + 99, "requests": 4, "diverged": round(4 * r),
                "divergence_rate": r, "mean_kl": 0.01 * (i + 1), "max_kl": 0.1} for i, r in enumerate(rates)]
    return replace(w, stability=Stability.from_dict({
        "requests": 8, "diverged": 0, "divergence_rate": 0.0, "output_len_mean_a": 5, "output_len_mean_b": 5,
        "output_len_std_a": 0, "output_len_std_b": 0, "kl_source": "full logits", "position_source": "teacher-forced",
        "buckets": buckets, "positions": [], "div_index": []}))


def test_whatifs_against_prompt_length_draw_one_curve_per_value_through_the_mean_of_repeats(whatif_comparison):
    runs = whatif_comparison.whatifs
    assert all(w.stability is not None and w.stability.requests == 2 for w in runs), "measured on every what-if"
    assert whatifs.section(runs)["lengths"] == [], "one bucket: no curve against length"
    first = [_with_buckets(w, [0.25, 0.5]) for w in runs]
    again = [replace(_with_buckets(w, [0.75, 1.0]), repeat=1) for w in runs]
    rate, kl = whatifs.section(first + again)["lengths"]
    assert len(rate.lines) == len(runs) == 4 and len(rate.legend) == 4, "one curve per what-if and swept value"
    ys = {point.split(",")[1] for line in rate.lines for point in line["points"].split()}
    assert ys == {str(rate.y.px(0.5)), str(rate.y.px(0.75))}, "the mean over repeats per bucket"
    assert rate.x.names == ("100–199", "200–299")
    html = render(replace(whatif_comparison, whatifs=first + again))
    assert "Against prompt length" in html and 'aria-label="requests that diverge against prompt length, per what-if"' in html


def test_hostile_strings_in_the_stability_panels_are_escaped(eight, whatif_comparison):
    c = replace(eight, stability=replace(eight.stability, kl_source=HOSTILE))
    runs = [replace(_with_buckets(w, [0.0, 1.0]), label=HOSTILE) for w in whatif_comparison.whatifs]
    html = render(replace(c, whatifs=runs))
    assert "Against prompt length" in html and 'id="stability"' in html
    assert HOSTILE not in html and "<script" not in html.lower()
    assert escape(HOSTILE) in _section(html)
