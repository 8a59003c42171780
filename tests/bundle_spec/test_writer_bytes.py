"""The writer stores, byte for byte, the files Zarr's own write path would have stored.

The writer encodes chunks and writes ``zarr.json`` itself, without Zarr (Zarr's event loop cost
a capture more than the encoding, and Zarr is not a core dependency). Readers other than ptrace's must see nothing different, so here the same
arrays are written a second time through ``zarr`` (``create_array`` with the arguments the writer
declares, ``append`` in pieces that end inside chunks, so that Zarr rewrites partial chunks too),
and every file of the two bundles is compared (the arrays' contents read back, too, are the
rows written). The writer runs with small chunks and a small memory bound, so that it also
writes partial chunks out early and rewrites them.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from ptrace.bundle_spec import BundleWriter
from ptrace.bundle_spec import writer as writer_module
from ptrace.bundle_spec.layout import stats_array, tensor_array
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import ROOT_ATTRIBUTE, SPEC_VERSION
from ptrace.bundle_spec.stats import row_stats
from tests.bundle_spec.test_roundtrip import finish_minimal

CHUNK_ROWS = 16
ROWS = 53  # not a multiple of CHUNK_ROWS: every array ends in a partial chunk
#: A tensor of each kind of storage: bit-stored (bfloat16 as uint16, float8 as uint8), 1-byte
#: native dtypes (no byte order in their bytes codec), and wider ones.
TENSORS = {
    "x.bf16": (ml_dtypes.bfloat16, (6,)),
    "x.fp8": (ml_dtypes.float8_e4m3fn, (5,)),
    "x.int8": (np.int8, (3,)),
    "x.bool": (np.bool_, (2,)),
    "x.u8": (np.uint8, ()),
    "x.f32": (np.float32, (4, 3)),
}
REQUESTS = 3


def _tensor(name: str, request: int) -> np.ndarray:
    dtype, row_shape = TENSORS[name]
    values = np.random.default_rng(request).standard_normal((ROWS, *row_shape)) * 50
    return (values > 0) if dtype is np.bool_ else values.astype(dtype)


def _write_with_ptrace(path: Path) -> None:
    """A batched run: every request's prompt rows, then one row per request per step."""
    prompt = ROWS - 5
    with BundleWriter(path) as writer:
        for bounds in [(0, prompt), *((row, row + 1) for row in range(prompt, ROWS))]:
            for request in range(REQUESTS):
                for name in TENSORS:
                    rows = _tensor(name, request)[slice(*bounds)]
                    writer.append(tensor_array(name), request, rows)
                    if rows.dtype.kind == "f":
                        writer.append(stats_array(name), request, row_stats(rows))
        finish_minimal(writer, ROWS, requests=REQUESTS, mode="full", tensor_names=list(TENSORS))


def _arrays(bundle: Path) -> dict[str, dict]:
    """Array path -> its zarr.json, for every array of ``bundle``."""
    found = {}
    for meta in bundle.rglob("zarr.json"):
        document = json.loads(meta.read_text())
        if document["node_type"] == "array":
            found[meta.parent.relative_to(bundle).as_posix()] = document
    return found


def _zarr_compressors(dtype: np.dtype) -> list:
    """The compressors the writer declares, as Zarr's codecs."""
    blosc = writer_module._blosc(dtype)
    return [BloscCodec(cname=blosc.cname, clevel=blosc.clevel, shuffle=blosc.shuffle, typesize=blosc.typesize,
                       blocksize=blosc.blocksize), Crc32cCodec()]


def _write_with_zarr(source: Path, path: Path) -> None:
    """The arrays of ``source`` (read through Zarr), written again through Zarr with the
    arguments ptrace declares, data arrays by ``append`` in pieces that end inside chunks."""
    every_chunk = {"write_empty_chunks": True}
    root = zarr.open_group(LocalStore(path), mode="w", attributes={ROOT_ATTRIBUTE: {"spec_version": SPEC_VERSION}})
    for name, document in sorted(_arrays(source).items()):
        data = zarr.open_array(LocalStore(source, read_only=True), path=name, mode="r")[...]
        if name.startswith("meta/"):
            array = root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape,
                                      serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=0,
                                      config=every_chunk)
            array[...] = data
            continue
        row_shape = data.shape[1:]
        row_bytes = data.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        chunk_rows = writer_module._chunk_rows(row_bytes)
        array = root.create_array(
            name, shape=(0, *row_shape), dtype=data.dtype, chunks=(chunk_rows, *row_shape),
            serializer=BytesCodec(endian="little"), compressors=_zarr_compressors(data.dtype),
            fill_value=0, attributes=document["attributes"], config=every_chunk)
        for start in range(0, data.shape[0], chunk_rows // 2 + 3):
            array.append(data[start:start + chunk_rows // 2 + 3], axis=0)


def _files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def test_writer_stores_the_bytes_zarr_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "MAX_CHUNK_ROWS", CHUNK_ROWS)
    monkeypatch.setattr(writer_module, "PENDING_BYTES", 1024)
    rewritten = []
    read_back = writer_module._ChunkFiles.read
    monkeypatch.setattr(writer_module._ChunkFiles, "read",
                        lambda self, index, rows: rewritten.append(index) or read_back(self, index, rows))
    _write_with_ptrace(tmp_path / "ptrace.zarr")
    assert rewritten, "the memory bound never made the writer write out a partial chunk"
    _write_with_zarr(tmp_path / "ptrace.zarr", tmp_path / "zarr.zarr")

    mine, zarrs = _files(tmp_path / "ptrace.zarr"), _files(tmp_path / "zarr.zarr")
    assert sorted(mine) == sorted(zarrs)
    assert [name for name in mine if mine[name] != zarrs[name]] == []
    # What the comparison covered: partial last chunks of every kind of dtype.
    arrays = _arrays(tmp_path / "ptrace.zarr")
    assert {arrays[tensor_array(name)]["data_type"] for name in TENSORS} == \
        {"uint16", "uint8", "int8", "bool", "float32"}
    assert all(document["shape"][0] % document["chunk_grid"]["configuration"]["chunk_shape"][0]
               for name, document in arrays.items() if name.startswith("tensors/"))
    with Bundle(tmp_path / "ptrace.zarr") as bundle:  # the reader alone: the bundle has stats of floats only
        for request in range(REQUESTS):
            for name in TENSORS:
                assert bundle.tensor(request, name).tobytes() == _tensor(name, request).tobytes(), (name, request)
