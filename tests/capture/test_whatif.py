"""Error-injection what-ifs on the real torch engine: each kind changes exactly what it says,
where it says, and nothing before it."""

from __future__ import annotations

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.names import sort_forward
from ptrace.bundle_spec.schema import WhatIfSpec
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, whatif
from ptrace.capture.session import capture_runs
from ptrace.errors import UsageError
from tests.replay.test_cross_engine import ms_env, vllm_env

SAMPLING = SamplingParams(max_new_tokens=4, seed=3)
SETTINGS = CaptureSettings(tensors=("*",))
#: The scenarios every engine runs: name -> (injections, whether they take values from "base").
SCENARIOS = {
    "base": "",
    "zero-noise": "noise:layers.*.k,layers.*.v:std=0",
    "kv-noise": "noise:layers.*.k,layers.*.v:std=1e-2:positions=0-3:steps=0",
    "cast": "cast:layers.2.attn:dtype=bfloat16",
    "noisy": "noise:layers.1.mlp:rel=0.1",
    "ulp": "ulp:embed:steps=0",
}
SPLICED = "noise:layers.1.mlp:rel=0.1+splice:layers.*.out"
ENGINES = [pytest.param("torch"), pytest.param("vllm", marks=vllm_env), pytest.param("ms", marks=ms_env)]


def _config(model, out, text, source=None, tensors=SETTINGS, backend="torch"):
    specs = tuple(whatif.parse(part) for part in whatif.split_joined(text)) if text else ()
    return CaptureConfig(backend=backend, model=model, output=out, random_input_ids=12, num_requests=2,
                         sampling=SAMPLING, settings=tensors, whatifs=specs,
                         whatif_source=None if source is None else str(source), command=("t",))


@pytest.fixture(scope="module", params=ENGINES)
def runs(request, tmp_path_factory, example_model):
    """Every scenario on one engine: one engine load for the tensor what-ifs (two for the splice,
    which needs the baseline first), one for the config what-if."""
    backend = request.param
    folder = tmp_path_factory.mktemp(f"whatif-{backend}")
    paths = dict(zip(SCENARIOS, capture_runs([_config(example_model, folder / f"{name}.zarr", text, backend=backend)
                                              for name, text in SCENARIOS.items()])))
    paths["spliced"] = capture(_config(example_model, folder / "spliced.zarr", SPLICED, source=paths["base"],
                                       backend=backend))
    paths["eps"] = capture(_config(example_model, folder / "eps.zarr", "config:rms_norm_eps=0.1", backend=backend))
    return paths


def _fed(bundle, request):
    return np.concatenate([bundle.prompt_ids(request), bundle.output_ids(request)[:-1]])


def _differences(a, b) -> dict[str, list[int]]:
    """Per tensor (forward order): the positions where the two bundles' rows differ at all,
    among the positions both runs were fed the same tokens up to."""
    found = {}
    with open_bundle(a) as x, open_bundle(b) as y:
        for name in sort_forward(x.tensor_names):
            rows = []
            for r in range(x.num_requests):
                ta, tb = x.tensor(r, name), y.tensor(r, name)
                fed_a, fed_b = _fed(x, r), _fed(y, r)
                n = int(np.argmax(fed_a != fed_b)) if (fed_a != fed_b).any() else len(fed_a)
                positions = x.tensor_positions(r, name)  # the logits MAY start at the last prompt position
                fed_same = positions < n
                diff = (ta[fed_same] != tb[fed_same]).reshape(int(fed_same.sum()), -1).any(axis=1)
                rows.extend(positions[fed_same][diff].tolist())
            if rows:
                found[name] = rows
    return found


def _names(path):
    with open_bundle(path) as bundle:
        return bundle.tensor_names


def test_zero_noise_is_bit_identical(runs):
    assert _differences(runs["base"], runs["zero-noise"]) == {}
    with open_bundle(runs["zero-noise"]) as bundle:
        assert bundle.whatif_info()["injections"][0]["kind"] == "noise"


def test_kv_noise_at_the_prefill_changes_later_steps_not_earlier_tensors(runs):
    diffs = _differences(runs["base"], runs["kv-noise"])
    assert next(iter(diffs)) == "layers.0.k", diffs.keys()
    assert diffs["layers.0.k"] and max(diffs["layers.0.k"]) <= 3, "only positions 0-3 were perturbed"
    for untouched in ("embed", "layers.0.attn_norm", "layers.0.q"):
        assert untouched not in diffs
    prompt_len = 12
    assert any(p >= prompt_len for p in diffs["layers.3.out"]), "decode steps read the noisy cache"


def test_cast_to_bfloat16_starts_the_error_exactly_there(runs):
    diffs = _differences(runs["base"], runs["cast"])
    assert next(iter(diffs)) == "layers.2.attn"
    order = sort_forward(_names(runs["base"]))
    assert not set(order[: order.index("layers.2.attn")]) & set(diffs), "every tensor before it is bit-identical"


def test_splicing_every_layer_output_reproduces_the_sources_logits(runs):
    assert "logits" in _differences(runs["base"], runs["noisy"])
    with open_bundle(runs["base"]) as a, open_bundle(runs["spliced"]) as b:
        for r in range(a.num_requests):
            assert a.tensor(r, "logits").tobytes() == b.tensor(r, "logits").tobytes()
            assert a.output_ids(r).tolist() == b.output_ids(r).tolist()


def test_a_config_whatif_changes_the_first_norm_first(runs, example_model):
    diffs = _differences(runs["base"], runs["eps"])
    assert next(iter(diffs)) == "layers.0.attn_norm" and "embed" not in diffs
    with open_bundle(runs["eps"]) as bundle:
        assert bundle.model.config["rms_norm_eps"] == 0.1
        assert bundle.model.model_path == str(example_model)


def test_ulp_flips_the_last_bit_only(runs):
    with open_bundle(runs["base"]) as a, open_bundle(runs["ulp"]) as b:
        x, y = a.tensor(0, "embed"), b.tensor(0, "embed")
        flipped = x[:12].view(np.uint32) ^ y[:12].view(np.uint32)
        assert (flipped == 1).all()


@pytest.mark.parametrize("text, message", [
    ("blur:layers.0.out", "unknown what-if kind 'blur'"),
    ("noise:layers.0.out:sigma=1", "has no parameter sigma"),
    ("cast:layers.0.out", "needs dtype"),
    ("cast:layers.0.out:dtype=int4", "unknown dtype"),
    ("noise:layers.0.k:std=1:positions=9-2", "ends before it starts"),
])
def test_bad_specs_are_refused_in_one_line(text, message):
    with pytest.raises(UsageError, match=message):
        whatif.check([whatif.parse(text)], num_layers=4, source=None)


def test_bad_selectors_and_sources_are_refused_before_the_engine_starts(example_model, tmp_path):
    with pytest.raises(UsageError, match="matches no canonical tensor"):
        capture(_config(example_model, tmp_path / "x.zarr", "noise:layers.99.k:std=1"))
    stats_only = capture(_config(example_model, tmp_path / "stats.zarr", "", tensors=CaptureSettings(mode="stats")))
    with pytest.raises(UsageError, match="no full tensor layers.0.out"):
        capture(_config(example_model, tmp_path / "y.zarr", "splice:layers.0.out", source=stats_only))
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_the_text_form_round_trips_through_the_document():
    spec = whatif.parse("noise:layers.*.k,layers.*.v:std=1e-3:positions=0-99:requests=0,2:seed=5")
    assert spec == WhatIfSpec("noise", ("layers.*.k", "layers.*.v"), {"std": 1e-3}, positions="0-99",
                              requests=(0, 2), seed=5)
    assert WhatIfSpec.from_dict(spec.to_dict()) == spec
    assert whatif.describe(spec) == "noise std=0.001 in layers.*.k,layers.*.v positions 0-99 requests 0,2"
