"""A capture is planned once: every check before an engine starts, and the plan crosses into an
engine environment whole."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from ptrace.bundle_spec.schema import CaptureSettings, ReplayInfo, SamplingParams
from ptrace.capture import CaptureConfig, capture, session, whatif
from ptrace.capture.plan import CapturePlan, plan_captures
from ptrace.errors import UsageError


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if an engine is started, here or in an engine environment."""
    def started(*_args, **_kwargs):
        raise AssertionError("an engine was started")
    monkeypatch.setattr(session, "create_backend", started)
    monkeypatch.setattr(session, "run_in_environment", started)


def _config(model, tmp_path, backend="torch", **changes) -> CaptureConfig:
    return replace(CaptureConfig(backend=backend, model=model, output=tmp_path / "b.zarr", random_input_ids=4,
                                 sampling=SamplingParams(max_new_tokens=2)), **changes)


@pytest.mark.parametrize("backend", ["torch", "vllm"])
@pytest.mark.parametrize("changes, message", [
    ({"settings": CaptureSettings(steps="4-1")}, "ends before it starts"),
    ({"settings": CaptureSettings(steps="two")}, "--steps: cannot read 'two'"),
    ({"settings": CaptureSettings(tensors=("layers.9.out",))}, "--tensors layers.9.out matches no canonical tensor"),
    ({"whatifs": (whatif.parse("noise:layers.7.k:std=1"),)}, "matches no canonical tensor of this model"),
    ({"whatifs": (whatif.parse("noise:layers.0.k:std=1:steps=x"),)}, "--steps: cannot read 'x'"),
    ({"whatifs": (whatif.parse("splice:layers.0.out"),)}, "needs the bundle to take values from"),
    ({"engine_options": {"no_such_option": "1"}}, "has no engine option no_such_option"),
    ({"output": "run.txt"}, "a bundle's name ends in .zarr"),
    ({"dtype": "int8"}, "does not support dtype int8"),
    ({"device": "tpu"}, "does not run on tpu"),
])
def test_a_bad_config_is_refused_before_any_engine_starts(example_model, tmp_path, no_engine, backend, changes, message):
    config = _config(example_model, tmp_path, backend, **changes)
    with pytest.raises(UsageError, match=message):
        capture(config)
    assert not (tmp_path / "b.zarr").exists()


def test_a_config_whatif_plans_with_the_config_the_engine_loads(example_model, tmp_path):
    """Tensors and what-if targets follow the patched config.json (here: two layers of four)."""
    plan = plan_captures([_config(example_model, tmp_path, whatifs=(whatif.parse("config:num_hidden_layers=2"),))])
    assert plan.model.num_layers == 2 and plan.config_overrides == {"num_hidden_layers": 2}
    assert "layers.1.out" in plan.runs[0].tensor_names and "layers.2.out" not in plan.runs[0].tensor_names
    with pytest.raises(UsageError, match="layers.3.out matches no canonical tensor"):
        plan_captures([_config(example_model, tmp_path, whatifs=(whatif.parse("config:num_hidden_layers=2"),),
                               settings=CaptureSettings(tensors=("layers.3.out",)))])


def test_the_plan_crosses_a_process_boundary_whole(example_model, tmp_path):
    """What an engine environment's process reads back is the plan the parent checked: selections
    parsed, what-ifs resolved, documents by node, floats exact (a NaN what-if parameter too)."""
    replay = ReplayInfo(source_bundle_id="0" * 32, source_path="a.zarr", mode="teacher-forced",
                        thresholds={"pass_mean_abs": math.inf})
    config = _config(example_model, tmp_path, settings=CaptureSettings(tensors=("layers.0.*", "logits"), steps="0,2-"),
                     whatifs=(whatif.parse("scale:layers.0.k:factor=nan:positions=1-3"),),
                     engine_options={"padded_batch": "0"})
    plan = plan_captures([config], [[replay]])
    back = CapturePlan.from_bytes(plan.to_bytes())
    assert back.to_bytes() == plan.to_bytes() and back.model == plan.model
    run = back.runs[0]
    assert run.steps == plan.runs[0].steps and 2 in run.steps and 1 not in run.steps
    assert run.tensor_names == plan.runs[0].tensor_names and "logits" in run.tensor_names
    (injection,) = run.injections
    assert injection.positions == (1, 3) and injection.names == ("layers.0.k",)
    assert math.isnan(injection.spec.params["factor"])
    assert ReplayInfo.from_dict(run.documents[ReplayInfo.path]) == replay
    with pytest.raises(UsageError, match="CapturePlan has no field 'extra'"):
        CapturePlan.from_dict({**plan.to_dict(), "extra": 1})
