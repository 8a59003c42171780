"""``compare`` verifies what it reads: a damaged bundle is an error, never a verdict, refused by
``validate`` too; bundles of different weights are said to be so, and refused for CI on request."""

from __future__ import annotations

import shutil

from ptrace.bundle_spec import validate_bundle
from ptrace.bundle_spec.layout import tensor_array
from tests.conftest import run_cli


def _chunks(bundle, name):
    return sorted((bundle / tensor_array(name)).rglob("c/*/*"))


def test_a_missing_or_swapped_chunk_is_an_error_not_a_verdict(full_bundle, tmp_path):
    missing, swapped = tmp_path / "missing.zarr", tmp_path / "swapped.zarr"
    shutil.copytree(full_bundle, missing)
    shutil.copytree(full_bundle, swapped)
    _chunks(missing, "layers.1.out")[0].unlink()
    shutil.copy(_chunks(full_bundle, "layers.0.out")[0], _chunks(swapped, "layers.1.out")[0])
    for damaged in (missing, swapped):
        problems = validate_bundle(damaged)
        assert any("tensors/layers.1.out" in p and "content checksum" in p for p in problems), problems
        result = run_cli("compare", full_bundle, damaged)
        assert result.returncode != 0, result.stdout
        assert "content checksum" in result.stderr and "tensors/layers.1.out" in result.stderr
        assert "PASS" not in result.stdout and "FAIL" not in result.stdout


def test_different_weights_are_stated_and_refused_on_request(fp32_bundle, tmp_path, example_model):
    other_model = tmp_path / "model"
    shutil.copytree(example_model, other_model)
    with open(other_model / "model.safetensors", "r+b") as weights:  # one byte of one weight
        weights.seek(-2, 2)
        last = weights.read(1)
        weights.seek(-2, 2)
        weights.write(bytes([last[0] ^ 1]))
    replayed = tmp_path / "r"
    assert run_cli("replay", fp32_bundle, "-b", "torch", "--model", other_model, "--allow-model-mismatch",
                   "--mode", "teacher-forced", "-o", replayed).returncode == 0
    other = replayed.with_name("r.teacher.zarr")
    stated = run_cli("compare", fp32_bundle, other)
    assert "the runs used different weights" in stated.stdout.replace("\n", " ")
    refused = run_cli("compare", fp32_bundle, other, "--require-same-model")
    assert refused.returncode == 2 and "other weights" in refused.stderr
