"""Error-injection what-ifs on the real torch engine: each kind changes exactly what it says,
where it says, and nothing before it."""

from __future__ import annotations

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.names import sort_forward
from ptrace.bundle_spec.schema import WhatIfSpec
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.capture import whatif
from ptrace.errors import UsageError

SAMPLING = SamplingParams(max_new_tokens=4, seed=3)
SETTINGS = CaptureSettings(tensors=("*",))


def _run(model, out, *specs, source=None, tensors=SETTINGS):
    return capture(CaptureConfig(backend="torch", model=model, output=out, random_input_ids=12, num_requests=2,
                                 sampling=SAMPLING, settings=tensors, whatifs=tuple(specs),
                                 whatif_source=None if source is None else str(source), command=("t",)))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, example_model):
    return _run(example_model, tmp_path_factory.mktemp("whatif") / "base.zarr")


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
                diff = (ta[:n] != tb[:n]).reshape(n, -1).any(axis=1)
                rows.extend(x.positions(r)[:n][diff].tolist())
            if rows:
                found[name] = rows
    return found


def test_zero_noise_is_bit_identical(baseline, example_model, tmp_path):
    run = _run(example_model, tmp_path / "n0.zarr", whatif.parse("noise:layers.*.k,layers.*.v:std=0"))
    assert _differences(baseline, run) == {}
    with open_bundle(run) as bundle:
        assert bundle.whatif_info()["injections"][0]["kind"] == "noise"


def test_kv_noise_at_the_prefill_changes_later_steps_not_earlier_tensors(baseline, example_model, tmp_path):
    spec = whatif.parse("noise:layers.*.k,layers.*.v:std=1e-2:positions=0-3:steps=0")
    diffs = _differences(baseline, _run(example_model, tmp_path / "kv.zarr", spec))
    first = next(iter(diffs))
    assert first == "layers.0.k", diffs.keys()
    assert diffs["layers.0.k"] and max(diffs["layers.0.k"]) <= 3, "only positions 0-3 were perturbed"
    for untouched in ("embed", "layers.0.attn_norm", "layers.0.q"):
        assert untouched not in diffs
    prompt_len = 12
    assert any(p >= prompt_len for p in diffs["layers.3.out"]), "decode steps read the noisy cache"


def test_cast_to_bfloat16_starts_the_error_exactly_there(baseline, example_model, tmp_path):
    diffs = _differences(baseline, _run(example_model, tmp_path / "cast.zarr",
                                        whatif.parse("cast:layers.2.attn:dtype=bfloat16")))
    assert next(iter(diffs)) == "layers.2.attn"
    order = sort_forward(_names(baseline))
    before = order[: order.index("layers.2.attn")]
    assert not set(before) & set(diffs), "every tensor before the injection is bit-identical"


def _names(path):
    with open_bundle(path) as bundle:
        return bundle.tensor_names


def test_splicing_every_layer_output_reproduces_the_sources_logits(baseline, example_model, tmp_path):
    noise = whatif.parse("noise:layers.1.mlp:rel=0.1")
    noisy = _run(example_model, tmp_path / "noisy.zarr", noise)
    spliced = _run(example_model, tmp_path / "spliced.zarr", noise, whatif.parse("splice:layers.*.out"),
                   source=baseline)
    assert "logits" in _differences(baseline, noisy)
    with open_bundle(baseline) as a, open_bundle(spliced) as b:
        for r in range(a.num_requests):
            assert a.tensor(r, "logits").tobytes() == b.tensor(r, "logits").tobytes()
            assert a.output_ids(r).tolist() == b.output_ids(r).tolist()


def test_a_config_whatif_changes_the_first_norm_first(baseline, example_model, tmp_path):
    diffs = _differences(baseline, _run(example_model, tmp_path / "eps.zarr", whatif.parse("config:rms_norm_eps=0.1")))
    assert next(iter(diffs)) == "layers.0.attn_norm" and "embed" not in diffs
    with open_bundle(tmp_path / "eps.zarr") as bundle:
        assert bundle.model.config["rms_norm_eps"] == 0.1
        assert bundle.model.model_path == str(example_model)


def test_ulp_flips_the_last_bit_only(baseline, example_model, tmp_path):
    run = _run(example_model, tmp_path / "ulp.zarr", whatif.parse("ulp:embed:steps=0"))
    with open_bundle(baseline) as a, open_bundle(run) as b:
        x, y = a.tensor(0, "embed"), b.tensor(0, "embed")
        flipped = x[: 12].view(np.uint32) ^ y[: 12].view(np.uint32)
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


def test_bad_selectors_and_sources_are_refused_before_the_engine_starts(example_model, tmp_path, baseline):
    with pytest.raises(UsageError, match="matches no canonical tensor"):
        _run(example_model, tmp_path / "x.zarr", whatif.parse("noise:layers.99.k:std=1"))
    stats_only = _run(example_model, tmp_path / "stats.zarr", tensors=CaptureSettings(mode="stats"))
    with pytest.raises(UsageError, match="no full tensor layers.0.out"):
        _run(example_model, tmp_path / "y.zarr", whatif.parse("splice:layers.0.out"), source=stats_only)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_the_text_form_round_trips_through_the_document():
    spec = whatif.parse("noise:layers.*.k,layers.*.v:std=1e-3:positions=0-99:requests=0,2:seed=5")
    assert spec == WhatIfSpec("noise", ("layers.*.k", "layers.*.v"), {"std": 1e-3}, positions="0-99",
                              requests=(0, 2), seed=5)
    assert WhatIfSpec.from_dict(spec.to_dict()) == spec
    assert whatif.describe(spec) == "noise std=0.001 in layers.*.k,layers.*.v positions 0-99 requests 0,2"
