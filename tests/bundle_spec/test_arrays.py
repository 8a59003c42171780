"""Array metadata read and written without Zarr (``bundle_spec.arrays``), and the arrays Zarr reads instead.

ptrace's own arrays must all parse as its own shape (else reading them would need Zarr, an
optional extra that costs more to import than a small compare), to what Zarr itself reads from
the same ``zarr.json``, and write back to the same bytes; an array another writer compressed
differently must still read, through Zarr, to the same values, and without Zarr be refused
with one line saying what to install.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

import ptrace.bundle_spec
from ptrace import DISTRIBUTION
from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.bundle_spec.arrays import ArrayMeta, ForeignArrayError, MetadataError
from ptrace.bundle_spec.layout import stats_array, tensor_array
from tests.bundle_spec.test_roundtrip import write_minimal
from tests.conftest import GOLDEN_ROOT


def _arrays(bundle):
    return sorted(path.parent for path in bundle.rglob("zarr.json") if json.loads(path.read_text())["node_type"] == "array")


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", ["torch.zarr", "stats.zarr", "replay.teacher.zarr"])
def test_every_array_ptrace_wrote_parses_as_zarr_reads_it_and_writes_back_the_same_bytes(version, name):
    bundle = GOLDEN_ROOT / version / name
    group = zarr.open_group(LocalStore(bundle, read_only=True), mode="r")
    arrays = _arrays(bundle)
    assert len(arrays) > 10
    for path in arrays:
        payload = (path / "zarr.json").read_bytes()
        meta = ArrayMeta.from_json(payload)
        node = group[path.relative_to(bundle).as_posix()]
        assert meta.direct and meta.to_json() == payload, path
        assert (meta.shape, meta.chunks, meta.dtype, meta.attributes) == \
            (node.shape, node.chunks, np.dtype(node.dtype), dict(node.attrs)), path
        assert meta.fill_value == node.metadata.fill_value
        assert meta.nchunks == node.nchunks
        stored = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
        assert stored == [meta.chunk_key(i) for i in range(meta.nchunks)], path


@pytest.mark.parametrize("change", [
    lambda doc: doc["codecs"].insert(2, {"name": "zstd", "configuration": {"level": 1, "checksum": False}}),
    lambda doc: doc.update(dimension_names=None, extra_field={"must_understand": False}),
    lambda doc: doc["chunk_grid"]["configuration"].update(chunk_shape=[4, 4]),
    lambda doc: doc.update(fill_value="0x00000000"),
])
def test_metadata_of_another_shape_is_left_to_zarr(change):
    document = json.loads((GOLDEN_ROOT / "v2/torch.zarr/tensors/layers.0.out/zarr.json").read_text())
    assert ArrayMeta.from_json(json.dumps(document).encode()).direct
    change(document)
    with pytest.raises(ForeignArrayError):
        ArrayMeta.from_json(json.dumps(document).encode())


@pytest.mark.parametrize("payload", [
    b"{not json", b"[1, 2]", b'{"zarr_format": 2}', b"[" * 100_000, b'{"zarr_format": 3, "node_type": "group"}',
    b'{"zarr_format": 3, "node_type": "array", "shape": "many"}',
    b'{"zarr_format": 3, "node_type": "array", "shape": [4], "data_type": "int8", "fill_value": 0,'
    b' "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [0]}},'
    b' "chunk_key_encoding": {"name": "default"}, "codecs": [{"name": "bytes"}]}',
])
def test_what_is_not_v3_array_metadata_is_refused(payload):
    with pytest.raises(MetadataError):
        ArrayMeta.from_json(payload)


def test_an_array_compressed_by_another_writer_reads_through_zarr(tmp_path):
    """Rewrite one tensor with zstd and chunks that split its rows: the spec allows both, ptrace
    does not decode them itself, and the values and checksums still read and validate."""
    rng = np.random.default_rng(1)
    tensor = rng.standard_normal((12, 8)).astype(np.float32)
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": tensor, "logits": tensor * 2})
    group = zarr.open_group(LocalStore(tmp_path / "b.zarr"), mode="r+")
    for path in (tensor_array("logits"), stats_array("logits")):
        data, attrs = group[path][...], dict(group[path].attrs)
        del group[path]
        rewritten = group.create_array(path, shape=data.shape, dtype=data.dtype, chunks=(5, *data.shape[1:-1], 3),
                                       compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()],
                                       fill_value=0, attributes=attrs)
        rewritten[...] = data
    with open_bundle(tmp_path / "b.zarr") as bundle:
        assert not bundle._node(tensor_array("logits")).direct and bundle._node(tensor_array("layers.0.out")).direct
        assert np.array_equal(bundle.tensor(0, "logits"), tensor * 2)
        assert np.array_equal(np.concatenate([b.copy() for _, b in bundle.tensor_blocks(0, "logits", 4)]), tensor * 2)
        assert bundle.stats(0, "logits").shape == (12, 7)
    assert validate_bundle(tmp_path / "b.zarr") == []


def test_without_zarr_another_writers_array_is_refused_with_what_to_install(tmp_path, monkeypatch):
    write_minimal(tmp_path / "b.zarr", {"logits": np.zeros((12, 8), np.float32)})
    group = zarr.open_group(LocalStore(tmp_path / "b.zarr"), mode="r+")
    data, attrs = group["stats/logits"][...], dict(group["stats/logits"].attrs)
    del group["stats/logits"]
    group.create_array("stats/logits", shape=data.shape, dtype=data.dtype, chunks=data.shape, fill_value=0,
                       compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()], attributes=attrs)
    group["stats/logits"][...] = data
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if Zarr were not installed: importing it fails
    monkeypatch.delitem(sys.modules, "ptrace.bundle_spec.zarr_fallback", raising=False)
    monkeypatch.delattr(ptrace.bundle_spec, "zarr_fallback", raising=False)
    with pytest.raises(ImportError, match=r"stats/logits uses codecs .* through Zarr, which is not installed") as raised:
        open_bundle(tmp_path / "b.zarr")
    assert f"pip install '{DISTRIBUTION}[zarr]'" in str(raised.value)
