"""Mixture-of-experts routing compared between runs of the real torch engine on the MoE example:
flips (expert sets that differ) with their margins, the ``route`` what-if that forces the
source's choices, the summary naming a flip as the cause, and the refusals around routing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.validation import validate_bundle
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, whatif
from ptrace.capture.session import capture_runs
from ptrace.compare import compare
from ptrace.compare.routing import margins, sentence
from ptrace.errors import UsageError
from tests.backends.test_moe import MOE_MODEL
from tests.bundle_spec.test_hostile import forge_document, read_document
from tests.conftest import run_cli

TENSORS = CaptureSettings(tensors=("layers.*.router", "layers.*.experts", "layers.*.expert_weights",
                                   "layers.*.mlp", "layers.*.out", "logits"))
NOISE = "noise:layers.*.router:std=0.3"


def _config(out, text="", source=None):
    specs = tuple(whatif.parse(part) for part in whatif.split_joined(text)) if text else ()
    return CaptureConfig(backend="torch", model=MOE_MODEL, output=out, random_input_ids=24, num_requests=2,
                         sampling=SamplingParams(max_new_tokens=4, seed=1), settings=TENSORS, whatifs=specs,
                         whatif_source=None if source is None else str(source), command=("t",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The baseline and the noisy routers on one engine load; then the noise with the baseline's
    routing forced back (``route``), which reads the baseline."""
    folder = tmp_path_factory.mktemp("moe")
    base, noisy = capture_runs([_config(folder / "base.zarr"), _config(folder / "noisy.zarr", NOISE)])
    routed, weighted = capture_runs([_config(folder / "routed.zarr", f"{NOISE}+route", source=base),
                                     _config(folder / "weighted.zarr", f"{NOISE}+route:weights=1", source=base)])
    return {"base": base, "noisy": noisy, "routed": routed, "weighted": weighted}


def _compare(a, b):
    with open_bundle(a) as x, open_bundle(b) as y:
        return compare(x, y)


def test_a_run_against_itself_has_no_flips(runs):
    result = _compare(runs["base"], runs["base"])
    routing = result.routing
    assert routing["flip_count"] == 0 and routing["flips"] == []
    assert routing["choices"] == 2 * 4 * (24 + 3)  # requests x MoE layers x positions
    assert set(routing["flip_rate_per_layer"]) == {"0", "1", "2", "3"}
    assert "expert choices identical" in result.summary
    assert not any(t.name.endswith(".experts") for t in result.tensors), "ids are not compared as numbers"


def test_noise_on_the_routers_flips_experts_with_their_margins(runs):
    routing = _compare(runs["base"], runs["noisy"]).routing
    assert routing["flip_count"] > 0 and routing["flip_rate"] == routing["flip_count"] / routing["choices"]
    with open_bundle(runs["base"]) as base:
        for flip in routing["flips"]:
            assert set(flip["a"]) != set(flip["b"])
            positions = base.tensor_positions(flip["request"], f"layers.{flip['layer']}.router")
            row = int(np.searchsorted(positions, flip["position"]))
            ids = base.tensor(flip["request"], f"layers.{flip['layer']}.experts")[row]
            logits = base.tensor(flip["request"], f"layers.{flip['layer']}.router")[row: row + 1]
            assert ids.tolist() == flip["a"]
            assert flip["margin"] == pytest.approx(float(margins(logits, 2)[0]))
            assert flip["near_tie"] is False  # a float32 run: only large perturbations flip


def test_route_forces_the_sources_choices_and_lowers_the_mlp_error(runs):
    noisy, routed = _compare(runs["base"], runs["noisy"]), _compare(runs["base"], runs["routed"])
    assert routed.routing["flip_count"] == 0
    error = {name: {t.name: t.rel_err for t in c.tensors} for name, c in (("noisy", noisy), ("routed", routed))}
    for layer in range(4):
        assert error["routed"][f"layers.{layer}.mlp"] < error["noisy"][f"layers.{layer}.mlp"], layer


def test_route_with_weights_reproduces_the_sources_moe_blocks_exactly(runs):
    """Forced experts and weights: each MoE block computes exactly what the source's did, so the
    noise on the router logits reaches nothing after them."""
    result = _compare(runs["base"], runs["weighted"])
    errors = {t.name: t.max_abs_err for t in result.tensors}
    assert errors["layers.0.router"] > 0
    assert all(errors[f"layers.{i}.{part}"] == 0 for i in range(4) for part in ("expert_weights", "mlp", "out"))


def test_the_summary_names_a_flip_that_precedes_the_divergence():
    flip = {"request": 0, "layer": 1, "position": 17, "a": [1, 5], "b": [1, 2], "margin": 2e-4, "near_tie": True}
    routing = {"flips": [flip], "flip_count": 1, "choices": 100}
    assert sentence(routing, 0, "layers.3.mlp", 17) == \
        "expert choice differs at layers.1, position 17: experts [1, 5] vs [1, 2], margin 0.0002, a near-tie"
    # a flip after the divergent tensor's layer, or at another position, is no cause
    later = sentence(routing, 0, "layers.0.mlp", 17)
    assert later.startswith("1 of 100 expert choices differ")
    assert sentence(routing, 0, "layers.3.mlp", 16).startswith("1 of 100")


def test_router_globs_on_a_dense_model_are_refused(example_model, tmp_path):
    result = run_cli("capture", "-b", "torch", "-m", example_model, "--random-input-ids", "8",
                     "--tensors", "layers.*.router", "-o", tmp_path / "dense.zarr")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "matches no canonical tensor" in result.stderr and "a dense model" in result.stderr
    with pytest.raises(UsageError, match="matches no canonical tensor"):
        whatif.check([whatif.parse("route")], num_layers=4, source=None)


def test_route_takes_no_tensor_names():
    with pytest.raises(UsageError, match="takes no tensor names"):
        whatif.parse("route:layers.*.mlp")


def test_validation_refuses_expert_ids_beyond_the_expert_count(runs, tmp_path):
    forged = shutil.copytree(runs["base"], tmp_path / "forged.zarr")
    model = read_document(forged, "meta/model")
    model["config"]["num_local_experts"] = 4  # the ids go up to 7
    forge_document(forged, "meta/model", model)
    problems = validate_bundle(forged)
    assert any("layers.0.experts holds expert id" in p and "outside [0, 4)" in p for p in problems), problems
    assert validate_bundle(runs["base"]) == []


def test_whatif_results_carry_routing_and_the_report_shows_it(runs, tmp_path):
    """``ptrace whatif`` on the MoE example: noisy routers flip expert choices against the
    baseline replay, forcing the source's routing back removes every flip, and the report's
    routing panel shows both."""
    import json

    result = run_cli("whatif", runs["base"], "-b", "torch", "-i", NOISE, "-i", f"{NOISE}+route",
                     "-o", tmp_path / "w", "--json", tmp_path / "w.json", "--report", tmp_path / "w.html",
                     timeout=600)
    assert result.returncode == 0, result.stderr
    noisy, routed = json.loads((tmp_path / "w.json").read_text())["whatifs"]
    assert noisy["routing"]["flip_count"] > 0 and routed["routing"]["flip_count"] == 0
    assert f"{noisy['routing']['flip_count']}/{noisy['routing']['choices']} expert choices differ" in noisy["sentence"]
    html = (tmp_path / "w.html").read_text()
    assert 'id="routing"' in html and "What the what-ifs did to the routing" in html
    assert f"{noisy['routing']['flip_count']} / {noisy['routing']['choices']}" in html


def test_the_routing_panel_lists_flips_per_layer_and_position(runs):
    from dataclasses import replace

    from ptrace.reports.html import render

    noisy = _compare(runs["base"], runs["noisy"])
    html = render(noisy)
    routing = noisy.routing
    assert 'id="routing"' in html and "<code>layers.3</code>" in html
    assert f"{routing['flip_count']} of {routing['choices']} expert choices differ" in html
    assert 'id="routing"' not in render(replace(noisy, routing=None)), "no panel without routing"
