"""Each panel of the report appears when its data exists, shows that data, and not otherwise."""

from __future__ import annotations

import math
import re
from dataclasses import replace

from markupsafe import escape

from ptrace.bundle_spec import open_bundle
from ptrace.compare import compare
from ptrace.reports import heatmap, whatifs
from ptrace.reports.html import render
from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.reports.conftest import HOSTILE
from tests.reports.handmade import bisected, calibrated, diverging, localized


def _banner(html: str) -> str:
    start = html.index('id="verdict"')
    return html[start:html.index("</div>", start)]


def test_the_verdict_banner_shows_the_verdict_and_the_limit_that_tripped(replayed):
    c = replayed.primary
    banner = _banner(render(c))
    assert f'<span class="word">{c.verdict.upper()}</span>' in banner
    clauses = c.summary.split(": ", 1)[1].split("; ")
    assert all(f"<li>{escape(clause)}</li>" in banner for clause in clauses), (clauses, banner)


def test_the_whatif_section_appears_only_with_whatifs(replayed, whatif_comparison):
    plain = render(replayed.primary)
    assert 'id="whatifs"' not in plain and "Sweep over" not in plain
    html = render(whatif_comparison)
    assert all(escape(w.sentence) in html for w in whatif_comparison.whatifs)
    assert html.count('<td class="label">') == len(whatif_comparison.whatifs) == 4
    for label in ("requests that diverge against std", "mean KL per step against std", "error propagation of every what-if"):
        assert f'aria-label="{label}"' in html
    cast_only = replace(whatif_comparison, whatifs=[w for w in whatif_comparison.whatifs if w.sweep_value is None])
    html = render(cast_only)
    assert 'id="whatifs"' in html and "Sweep over" not in html, "no sweep, no sweep plot"


def test_a_sweep_draws_one_curve_through_the_mean_of_its_repeats(whatif_comparison):
    swept = [w for w in whatif_comparison.whatifs if w.sweep_value is not None]
    again = [replace(w, repeat=1, divergence_rate=1.0 - w.divergence_rate) for w in swept]
    rate, kl = whatifs.section(swept + again)["sweeps"]
    assert len(rate.dots) == 2 * len(swept), "every run is a dot"
    assert len(rate.lines) == 1 and len(rate.legend) == 1, "one family, one curve"
    whiskers = [r for r in rate.rules if r["y1"] != r["y2"]]
    assert len(whiskers) == sum(w.divergence_rate != 0.5 for w in swept), "a whisker where repeats differ"
    middle = rate.y.px(0.5)
    assert all(point.endswith(f",{middle}") for point in rate.lines[0]["points"].split()), "the mean of r and 1 - r"


def test_propagation_starts_at_each_whatifs_injection_point(whatif_comparison):
    section = whatifs.section(whatif_comparison.whatifs)
    chart = section["propagation"]
    cast = next(w for w in whatif_comparison.whatifs if w.sweep_value is None)
    assert cast.first_affected_tensor == "layers.2.attn"
    first_x = float(chart.lines[-1]["points"].split()[0].split(",")[0])
    assert first_x == chart.x.px("layers.2.attn")
    assert chart.x.names[0] == "layers.0.k", "the KV noise starts at the first layer's k"


def test_the_error_plot_uses_relative_error_over_the_noise_floor(replayed):
    c = diverging(replayed.primary, request=1, tensor="layers.2.mlp", position=5)
    html = render(c)
    assert "relative error ‖B−A‖ / ‖A‖" in html and "noise floor (rounding)" in html
    assert "first divergent: layers.2.mlp" in html
    assert "calibration:" not in html, "no calibration band without a calibration"
    assert "NaN or Inf" not in html
    overflowed = replace(c, tensors=[replace(t, rel_err=math.nan) if t.name == "logits" else t for t in c.tensors])
    assert "<title>logits: NaN or Inf</title>" in render(overflowed), "an overflow is drawn, not dropped"


def test_the_calibration_panel(replayed):
    c = replayed.primary
    assert "Calibration:" not in render(c)
    html = render(calibrated(c, outside="layers.2.mlp"))
    assert "Calibration: is it more than bfloat16 explains?" in html
    assert "torch adds 9x the error of torch at layers.2.mlp" in html
    assert "calibration: torch bfloat16 against A" in html, "the band under the error curve"
    outside = re.findall(r'<tr class="out"><td><code>([^<]+)</code>', html)
    assert set(outside) == {"layers.2.mlp"}, outside


def test_local_errors_say_whether_they_were_measured(replayed):
    c = replayed.primary
    assert "Local against propagated error" not in render(c)
    measured = render(localized(c, "measured"))
    assert "Local against propagated error (measured)" in measured
    assert 'aria-label="local and propagated error per layer"' in measured
    assert "own error (input spliced from A)" in measured
    assert "Local against propagated error (heuristic)" in render(localized(c, "heuristic"))


def test_the_bisection_sentence(replayed):
    c = replayed.primary
    assert "Bisection:" not in render(c)
    assert "restoring layers 2 and 3 to the reference&#39;s output fixes 2/2 requests" in render(bisected(c))


def test_one_heatmap_per_request_with_its_own_divergence(replayed):
    """Request 1 parts at layers.2.mlp, position 5; request 0 not at all: its map stays neutral."""
    c = diverging(replayed.primary, request=1, tensor="layers.2.mlp", position=5, nan_at=7)
    maps = heatmap.heatmaps(c)
    first, second = maps["maps"]
    assert (first["index"], second["index"]) == (0, 1)
    assert first["marker"] is None and second["marker"] is not None
    above = {heatmap.ramp(heatmap.ABOVE, k / heatmap.SHADES) for k in range(heatmap.SHADES + 1)} | {heatmap.NONFINITE}
    # hatched (None) = not compared: only the logits, which start at the last prompt position
    assert all(cell["title"].startswith("logits,") for cell in first["cells"] if cell["color"] is None)
    assert not {cell["color"] for cell in first["cells"]} & above, "request 1's error does not leak into request 0"
    hot = [cell for cell in second["cells"] if cell["color"] in above]
    assert hot and all(int(re.search(r"positions? (\d+)", cell["title"]).group(1)) >= 5 for cell in hot)
    assert any(cell["color"] == heatmap.NONFINITE and cell["title"].startswith("logits, position 7") for cell in hot)
    assert second["marker"]["row"] == [label["text"] for label in second["labels"]].index("L2")
    assert second["marker"]["column"] == 5, "one column per position in a short request"
    assert first["prompt_end"] is not None, "the prompt's end is marked"
    assert maps["legend"][-1]["label"] == "1e3x", "the scale reaches the largest ratio (1200x) in the data"
    html = render(c)
    assert 'aria-label="error by layer and position, request 0"' in html and "prompt ends" in html
    assert "parts at <span class=\"mono\">layers.2.mlp</span>, position 5" in html


def test_a_stats_only_comparison_plots_per_layer(tmp_path):
    requests = [SyntheticRequest((1, 2, 3), (4, 5, 6, 7), text="first prompt"),
                SyntheticRequest((3, 2), (1, 5, 6), text="second prompt")]
    with (open_bundle(write_bundle(tmp_path / "a.zarr", requests, mode="stats")) as a,
          open_bundle(write_bundle(tmp_path / "b.zarr", requests, mode="stats", noise=0.05)) as b):
        c = compare(a, b)
    assert all(t.stats_only for t in c.tensors)
    html = render(c)
    assert 'aria-label="relative error of every tensor in forward order"' in html
    assert "relative change of scale" in html and "Stats-only capture" in html
    assert 'aria-label="error by layer and position, request 1"' in html
    assert "No tensors were compared" not in html and "No tensor has per-position errors" not in html


def test_the_free_running_timeline_is_shown_next_to_the_teacher_forced_one(replayed):
    c = replayed.primary
    html = render(c)
    assert "<span>B free-running</span>" in html and "<span>B teacher-forced</span>" in html
    forced = replayed.comparisons["teacher-forced"]
    assert all(r.teacher_forced is not None and r.teacher_forced.tokens_b == f.tokens_b
               for r, f in zip(c.requests, forced.requests))
    alone = render(forced)
    assert "<span>B teacher-forced</span>" in alone and "B free-running" not in alone


def test_a_long_prompt_is_folded(replayed):
    c = replayed.primary
    long = "many words " * 500
    html = render(replace(c, a={**c.a, "prompts": [long, "a short prompt"]}))
    assert html.count('<details class="prompt">') == 1
    assert '<div class="prompt mono">a short prompt</div>' in html
    assert f"({len(long)} characters: show all)" in html


def test_hostile_strings_in_every_new_panel_are_escaped(whatif_comparison):
    hostile = [replace(w, label=HOSTILE, sentence=HOSTILE, sweep_param=HOSTILE,
                       vs_source={"verdict": HOSTILE, "summary": HOSTILE, "first_divergent_tensor": HOSTILE})
               for w in whatif_comparison.whatifs]
    c = replace(whatif_comparison, whatifs=hostile, summary=f"FAIL: {HOSTILE}; {HOSTILE}",
                requests=[replace(r, first_divergent_tensor=HOSTILE) for r in whatif_comparison.requests])
    c = bisected(localized(calibrated(c, label=HOSTILE, sentence=HOSTILE), name_prefix=HOSTILE),
                 sentence=HOSTILE, tried=[{HOSTILE: HOSTILE}])
    html = render(c)
    assert "Sweep over" in html and "Calibration:" in html and "Bisection:" in html
    assert HOSTILE not in html and "<script" not in html.lower()
    assert html.count(escape(HOSTILE)) >= 10


def test_a_whatif_report_and_summary_lead_with_the_whatifs(whatif_comparison):
    lines = whatif_comparison.summary.split("\n")
    assert len(lines) == len(whatif_comparison.whatifs) + 1
    assert all(line == f"what-if {w.sentence}" for line, w in zip(lines, whatif_comparison.whatifs))
    assert lines[-1].startswith("baseline (torch float32, no injection) against the source: PASS")
    html = render(whatif_comparison)
    first_whatif = html.index(str(escape(whatif_comparison.whatifs[0].sentence)))
    assert first_whatif < html.index('id="verdict"') < html.index('id="tokens"'), "what-ifs first, baseline below"
    assert html.count('class="whatif-tokens"') == len(whatif_comparison.whatifs), "a token view per what-if"


def test_propagation_curves_have_distinct_colours(whatif_comparison):
    chart = whatifs.section(whatif_comparison.whatifs)["propagation"]
    colours = [line["color"] for line in chart.lines]
    assert len(colours) == len(set(colours)) == len(whatif_comparison.whatifs)


def test_the_report_states_the_limits_it_applied_and_fails_only_failing_rows(replayed):
    c = replayed.primary
    assert c.thresholds_dtype == "bfloat16"
    assert all(t.first_fail_position is None for t in c.tensors if t.verdict == "pass")
    html = render(c)
    assert f"size limits ({c.thresholds_dtype})" in html and f"mean abs &lt; {c.thresholds['pass_mean_abs']}" in html
    assert "not calibrated (--no-calibrate)" in html
    assert "(within" not in _banner(html).split("<li>")[1], "the first clause is a whole clause"


def test_a_map_of_rounding_alone_still_shows_its_data_and_marks_the_floor(replayed):
    maps = heatmap.heatmaps(replayed.primary)
    assert any(stop["label"].endswith("= noise floor") for stop in maps["legend"])
    colours = {cell["color"] for m in maps["maps"] for cell in m["cells"]}
    assert len(colours) >= 4, f"rounding within the floor must not be one grey: {colours}"


def test_the_parallel_panel_shows_each_split_runs_layout_and_its_replica_findings(replayed):
    from ptrace.bundle_spec.schema import ParallelInfo, ReplicaFinding, TensorLayout

    plain = render(replayed.primary)
    assert 'id="parallel"' not in plain
    layout = ParallelInfo(2, heads=4, kv_heads=2, executor="mp", thread_binding="0|1", thread_binding_source="ptrace",
                          tensors=(TensorLayout("layers.0.q", "t h(tp) d", "concat_heads", ("heads 0-1", "heads 2-3")),),
                          replica_findings=(ReplicaFinding("layers.2.mlp_norm", (0, 1), 1, 0, (3, 4), 0.25),))
    c = replayed.primary
    html = render(replace(c, b={**c.b, "parallel": layout.to_dict()}))
    panel = html[html.index('id="parallel"'):html.index('id="runs"')]
    assert "tensor parallel 2" in panel and "threads bound 0|1 (ptrace)" in panel
    assert "t h(tp) d" in panel and "heads 0-1, heads 2-3" in panel
    assert "Replicas disagree</b> (1)" in panel and "layers.2.mlp_norm" in panel and "3, 4" in panel
    agreeing = render(replace(c, b={**c.b, "parallel": replace(layout, replica_findings=()).to_dict()}))
    assert "agreed bit for bit" in agreeing
