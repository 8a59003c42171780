"""Arithmetic settings across the real engines, each in its own environment (as
``test_cross_engine``): vLLM and MindSpore resolve and record what they used, planted config
differences are named where the runs part ways, and MindFormers' precision knobs are engine
options that a what-if can turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.schema import WhatIfSpec
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.compare import compare
from ptrace.compare.settings import recorded
from tests.compare.test_settings import PLANTS, model_copy
from tests.conftest import run_cli
from tests.replay.test_cross_engine import ms_env, vllm_env


def capture_on(backend: str, model: Path, output: Path, **kwargs) -> Path:
    return capture(CaptureConfig(backend=backend, model=model, output=output, random_input_ids=16, command=("test",),
                                 sampling=SamplingParams(seed=3, max_new_tokens=3),
                                 settings=CaptureSettings(tensors=("*",)), **kwargs))


@pytest.fixture(scope="module")
def vllm_reference(tmp_path_factory: pytest.TempPathFactory, example_model: Path) -> Path:
    return capture_on("vllm", example_model, tmp_path_factory.mktemp("vllm-settings") / "reference.zarr")


#: vLLM's Qwen2 MLP runs SiLU only (it refuses any other hidden_act at load).
VLLM_PLANTS = [p for p in PLANTS if p[0] != "activation"]


@vllm_env
@pytest.mark.parametrize("plant", VLLM_PLANTS, ids=[p[0] for p in VLLM_PLANTS])
def test_planted_config_difference_is_named_on_vllm(plant: tuple, vllm_reference: Path, example_model: Path,
                                                   tmp_path: Path) -> None:
    _, edit, key, expected_a, expected_b, site = plant
    planted = capture_on("vllm", model_copy(example_model, tmp_path / "model", edit), tmp_path / "planted.zarr")
    with open_bundle(vllm_reference) as a, open_bundle(planted) as b:
        result = compare(a, b)
    diff = {d["key"]: d for d in result.settings_diff}
    assert key in diff, result.settings_diff
    assert (diff[key]["a"], diff[key]["b"], diff[key]["acts_at"]) == (expected_a, expected_b, site)
    assert diff[key]["consistent"] is True, (result.first_divergent_tensor, result.first_divergent_position)
    assert f"{key} {expected_a!r} vs {expected_b!r}" in result.summary or \
        f"{key} {expected_a} vs {expected_b}" in result.summary


@vllm_env
@ms_env
def test_same_model_on_three_engines_has_no_model_level_difference(example_model: Path, tmp_path: Path) -> None:
    runs = {backend: capture_on(backend, example_model, tmp_path / f"{backend}.zarr")
            for backend in ("torch", "vllm", "ms")}
    reference = runs.pop("torch")
    for backend, path in runs.items():
        with open_bundle(reference) as a, open_bundle(path) as b:
            assert recorded(b)["source"] == "resolved"
            result = compare(a, b)
        model_level = [d for d in result.settings_diff if d["group"] != "engine"]
        assert model_level == [], (backend, model_level)
        cli = run_cli("settings", reference, path, "--json")
        assert [d["key"] for d in json.loads(cli.stdout)["settings_diff"]] == \
            [d["key"] for d in result.settings_diff]


@ms_env
def test_ms_softmax_in_float16_is_named_where_attention_changes(example_model: Path, tmp_path: Path) -> None:
    float32 = capture_on("ms", example_model, tmp_path / "f32.zarr",
                         engine_options={"softmax_compute_type": "float32"})
    # the what-if form of -E softmax_compute_type=float16
    float16 = capture_on("ms", example_model, tmp_path / "f16.zarr",
                         whatifs=(WhatIfSpec(kind="engine", params={"softmax_compute_type": "float16"}),))
    with open_bundle(float32) as a, open_bundle(float16) as b:
        result = compare(a, b)
        attention = next(t for t in result.tensors if t.name == "layers.0.attn")
        assert attention.max_abs_err > 0  # the softmax's rounding reaches the attention output
        assert all(t.max_abs_err == 0 for t in result.tensors if t.name in ("embed", "layers.0.attn_norm", "layers.0.q"))
    diff = {d["key"]: d for d in result.settings_diff}
    assert (diff["softmax_dtype"]["a"], diff["softmax_dtype"]["b"]) == ("float32", "float16")
    assert diff["softmax_dtype"]["acts_at"] == "layers.0.attn"
    assert diff["softmax_dtype"]["consistent"] is True, result.first_divergent_tensor
    assert "softmax_dtype float32 vs float16" in result.summary
