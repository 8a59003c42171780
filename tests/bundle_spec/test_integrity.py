"""Broken bundles are refused with a clear reason: corrupted, truncated, unfinished, too new."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ptrace.bundle_spec import BundleWriter, open_bundle, validate_bundle
from ptrace.errors import (
    BundleCorruptError,
    BundleIncompleteError,
    BundleNotFoundError,
    BundleVersionError,
    NotABundleError,
)
from tests.bundle_spec.test_roundtrip import write_minimal
from tests.conftest import run_cli


@pytest.fixture
def bundle(tmp_path) -> Path:
    tensor = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": tensor, "logits": tensor * 2})
    return tmp_path / "b.zarr"


def _chunk_files(bundle: Path, array: str) -> list[Path]:
    return sorted(p for p in (bundle / array / "c").rglob("*") if p.is_file())


def test_valid_bundle_validates(bundle):
    assert validate_bundle(bundle) == []
    result = run_cli("validate", bundle)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_flipped_byte_in_a_chunk_is_detected(bundle):
    chunk = _chunk_files(bundle, "tensors/layers.0.out")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    problems = validate_bundle(bundle)
    assert any("layers.0.out" in p and "corrupt" in p for p in problems), problems
    with open_bundle(bundle) as opened, pytest.raises(BundleCorruptError, match="layers.0.out"):
        opened.tensor(0, "layers.0.out")
    result = run_cli("validate", bundle)
    assert result.returncode == 1
    assert "corrupted chunk" in result.stderr and "Traceback" not in result.stderr


def test_missing_chunk_is_detected(bundle):
    """Zarr reads a missing chunk as fill values; the whole-array checksum catches it."""
    _chunk_files(bundle, "tensors/logits")[0].unlink()
    problems = validate_bundle(bundle)
    assert any("logits" in p and "checksum" in p for p in problems), problems


def test_missing_array_is_detected(bundle):
    shutil.rmtree(bundle / "stats/logits")
    assert any("stats/logits is missing" in p for p in validate_bundle(bundle))


def test_unfinished_bundle_is_refused(bundle):
    shutil.rmtree(bundle / "meta/manifest")
    with pytest.raises(BundleIncompleteError):
        open_bundle(bundle)


def test_writer_interrupted_by_an_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), BundleWriter(tmp_path / "x.zarr") as writer:
        writer.append("stats/logits", 0, np.zeros((2, 7)))
        raise RuntimeError("engine crashed")
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def test_newer_spec_version_is_refused_with_one_line(bundle):
    meta = json.loads((bundle / "zarr.json").read_text())
    meta["attributes"]["ptrace_bundle"]["spec_version"] = 99
    (bundle / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(BundleVersionError, match="version 99"):
        open_bundle(bundle)
    for command in ("inspect", "validate"):
        result = run_cli(command, bundle)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "spec version 99" in lines[0] and "upgrade ptrace" in lines[0]


def test_not_a_bundle(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotABundleError):
        open_bundle(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotABundleError):
        open_bundle(tmp_path / "empty")
    with pytest.raises(BundleNotFoundError):
        open_bundle(tmp_path / "nowhere.zarr")
    result = run_cli("inspect", tmp_path / "notes.txt")
    assert result.returncode != 0 and "not a ptrace bundle" in result.stderr
    assert "Traceback" not in result.stderr
