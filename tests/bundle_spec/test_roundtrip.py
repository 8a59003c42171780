"""Writing then reading a bundle gives back exactly what was written."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ptrace.bundle_spec import BundleWriter, open_bundle, pack, unpack, validate_bundle
from ptrace.bundle_spec.layout import request_array, stats_array, tensor_array
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import (
    EnvironmentInfo,
    ModelInfo,
    RequestRecord,
    RequestsInfo,
    RunInfo,
    SamplingParams,
)
from ptrace.bundle_spec.stats import row_stats

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16]


def _awkward_values(dtype: np.dtype, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Values that a lossy path would change: subnormals, extremes, NaN payloads, signed zeros."""
    info = ml_dtypes.finfo(dtype)
    data = (rng.standard_normal((rows, 3, 8)) * 10).astype(dtype)
    flat = data.reshape(-1)
    flat[:8] = np.array([info.max, -info.max, info.smallest_subnormal, -0.0, np.inf, -np.inf, np.nan, 1.0],
                        dtype=np.float64).astype(dtype)
    return data


def write_minimal(path, tensors: dict[str, np.ndarray], *, mode: str = "full") -> None:
    """A small but complete bundle with one request holding ``tensors`` (streamed row by row)."""
    rows = next(iter(tensors.values())).shape[0]
    with BundleWriter(path) as writer:
        for name, tensor in tensors.items():
            for start in range(0, rows, 3):  # several appends, not chunk-aligned
                block = tensor[start:start + 3]
                writer.append(stats_array(name), 0, row_stats(block))
                if mode == "full":
                    writer.append(tensor_array(name), 0, block)
        finish_minimal(writer, rows, requests=1, mode=mode, tensor_names=list(tensors))


def finish_minimal(writer: BundleWriter, rows: int, *, requests: int, mode: str,
                   tensor_names: list[str]) -> None:
    """Everything but the tensors, for ``requests`` requests of ``rows`` captured positions each."""
    for request in range(requests):
        writer.append(request_array("prompt_ids"), request, np.arange(rows - 1, dtype=np.int64))
        writer.append(request_array("output_ids"), request, np.array([5, 6], dtype=np.int64))
        writer.append(request_array("topk_ids"), request, np.zeros((2, 3), np.int64))
        writer.append(request_array("topk_logprobs"), request, np.full((2, 3), -1.5, np.float32))
        writer.append(request_array("positions"), request, np.arange(rows, dtype=np.int64))
    writer.write_document(ModelInfo(model_path="m", name="m", architecture="A",
                                    config={"num_hidden_layers": 1, "rope": float("nan"),
                                            "big": 2**63 - 1, "blob": b"\x00\xff"},
                                    weights={}, tokenizer={}, fingerprint="f", tokenizer_fingerprint="t"))
    writer.write_document(RunInfo(backend="torch", backend_version="0", dtype="float32", device="cpu",
                                  seeds={"python": 1}, sampling=SamplingParams(), capture={}))
    writer.write_document(EnvironmentInfo(python={}, os={}, hardware={}, packages={}, env={}))
    writer.write_document(RequestsInfo(tuple(RequestRecord(index=request, prompt="p", prompt_len=rows - 1,
                                                           output_len=2) for request in range(requests))))
    writer.commit(ptrace_version="test", command=["test"], mode=mode, tensor_names=tensor_names)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tensors_round_trip_bit_exact(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensor = _awkward_values(np.dtype(dtype), rows=11, rng=rng)
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": tensor})
    with open_bundle(tmp_path / "b.zarr") as bundle:
        back = bundle.tensor(0, "layers.0.out")
    assert back.dtype == tensor.dtype
    assert back.tobytes() == tensor.tobytes()


def test_metadata_round_trips_exactly(tmp_path):
    write_minimal(tmp_path / "b.zarr", {"logits": np.ones((4, 5), np.float32)})
    with open_bundle(tmp_path / "b.zarr") as bundle:
        config = bundle.model.config
        assert np.isnan(config["rope"]) and config["big"] == 2**63 - 1 and config["blob"] == b"\x00\xff"
        assert bundle.run.sampling == SamplingParams()
        assert bundle.requests.requests[0].prompt == "p"
        assert bundle.manifest.complete and bundle.manifest.mode == "full"


def test_stats_mode_has_stats_and_no_tensors(tmp_path):
    tensor = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    write_minimal(tmp_path / "b.zarr", {"logits": tensor}, mode="stats")
    with open_bundle(tmp_path / "b.zarr") as bundle:
        assert not bundle.has_tensor(0, "logits")
        np.testing.assert_allclose(bundle.stats(0, "logits"), row_stats(tensor))
        with pytest.raises(Exception, match="--mode full"):
            bundle.tensor(0, "logits")
    assert validate_bundle(tmp_path / "b.zarr") == []


def test_zip_form_reads_the_same_and_unpacks(tmp_path):
    tensor = np.arange(60, dtype=np.float32).reshape(12, 5)
    write_minimal(tmp_path / "b.zarr", {"logits": tensor})
    archive = pack(tmp_path / "b.zarr", tmp_path / "b.zarr.zip")
    with open_bundle(archive) as zipped:
        assert zipped.tensor(0, "logits").tobytes() == tensor.tobytes()
    assert validate_bundle(archive) == []
    restored = unpack(archive, tmp_path / "restored.zarr")
    with Bundle(restored) as bundle:
        assert bundle.manifest.bundle_id == open_bundle(tmp_path / "b.zarr").manifest.bundle_id


def test_tensor_rows_reads_any_slice(tmp_path):
    tensor = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": tensor})
    with open_bundle(tmp_path / "b.zarr") as bundle:
        blocks = [bundle.tensor_rows(0, "layers.0.out", start, min(start + 16, 50)) for start in range(0, 50, 16)]
    assert np.concatenate(blocks).tobytes() == tensor.tobytes()


def test_requests_sharing_a_chunk_read_in_order_decode_it_once(tmp_path, monkeypatch):
    from ptrace.bundle_spec.reader import ChunkReader
    from ptrace.testing.bundles import SyntheticRequest, write_bundle

    write_bundle(tmp_path / "b.zarr", [SyntheticRequest(prompt=[1, 2, 3 + r], outputs=[4, 5, 6]) for r in range(8)])
    decoded = []
    read = ChunkReader.read
    monkeypatch.setattr(ChunkReader, "read",
                        lambda self, index, out: (decoded.append((self._prefix, index)), read(self, index, out)))
    with open_bundle(tmp_path / "b.zarr") as bundle:
        for r in range(8):  # 5 rows each: all 8 requests lie in one chunk
            blocks = [block.copy() for _, block in bundle.tensor_blocks(r, "layers.0.out", 2)]
            assert np.concatenate(blocks).tobytes() == bundle.tensor(r, "layers.0.out").tobytes()
        assert bundle._node("tensors/layers.0.out").nchunks == 1
    assert [index for prefix, index in decoded if prefix == "tensors/layers.0.out/"] == [0]
