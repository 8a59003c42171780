"""The parsers of untrusted bytes, fuzzed: whatever they are given, they raise ptrace's
:class:`~ptrace.errors.BundleError` family or nothing (never a KeyError, a struct.error, a
RecursionError from deep inside), so that every reader reports one line naming the bundle.

Each parser gets arbitrary bytes, arbitrary well-typed input (JSON, msgpack) and valid input
with one part replaced at random, which reaches the checks deep inside. The examples are bounded
(``FUZZ``) so that this file runs in seconds inside the normal test run (set
``PTRACE_FUZZ_EXAMPLES`` for a longer hunt); a failure prints the example that reproduces it.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import google_crc32c
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptrace.bundle_spec import chunks, open_bundle
from ptrace.bundle_spec.arrays import ArrayMeta, Blosc, GroupMeta
from ptrace.bundle_spec.reader import segments_by_request
from ptrace.bundle_spec.schema import Manifest, ModelInfo, RequestsInfo, RunInfo
from ptrace.bundle_spec.store import check_archive, open_read_store
from ptrace.errors import BundleError
from tests.conftest import GOLDEN_ROOT

FUZZ = settings(max_examples=int(os.environ.get("PTRACE_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GOLDEN = GOLDEN_ROOT / "v2" / "torch.zarr"
#: JSON values, nested a few levels (what json.loads can give a parser).
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
#: msgpack values: JSON's, and bytes, and maps with keys of any kind.
MSGPACK_INT = st.integers(-2**63, 2**64 - 1)
MSGPACK = st.recursive(st.none() | st.booleans() | MSGPACK_INT | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8) | MSGPACK_INT, inner, max_size=4),
                       max_leaves=12)


def _replace_at_random(document: object, data: st.DataObject, values: st.SearchStrategy) -> object:
    """``document`` (nested maps and lists) with one value, anywhere, replaced by a drawn one, or
    one key removed."""
    if not isinstance(document, (dict, list)) or not document or data.draw(st.integers(0, 3)) == 0:
        return data.draw(values)
    copy = dict(document) if isinstance(document, dict) else list(document)
    key = data.draw(st.sampled_from(sorted(copy) if isinstance(copy, dict) else range(len(copy))))
    if isinstance(copy, dict) and data.draw(st.booleans()):
        del copy[key]
    else:
        copy[key] = _replace_at_random(copy[key], data, values)
    return copy


def _only_bundle_errors(parse, *args) -> None:
    try:
        parse(*args)
    except BundleError:
        pass


# -- zarr.json -------------------------------------------------------------------------------------
ARRAY_JSON = json.loads((GOLDEN / "tensors/layers.0.q/zarr.json").read_text())


@FUZZ
@given(payload=st.binary(max_size=300) | JSON.map(lambda value: json.dumps(value).encode()))
def test_node_metadata_of_any_bytes(payload):
    _only_bundle_errors(ArrayMeta.from_json, payload)
    _only_bundle_errors(GroupMeta.from_json, payload)


@FUZZ
@given(data=st.data())
def test_array_metadata_with_any_part_replaced(data):
    document = _replace_at_random(ARRAY_JSON, data, JSON)
    _only_bundle_errors(ArrayMeta.from_json, json.dumps(document).encode())


@FUZZ
@given(rows=st.integers(0, 10**6), row_shape=st.lists(st.integers(1, 100), max_size=2), chunk_rows=st.integers(1, 10**4),
       dtype=st.sampled_from(["bool", "int8", "uint16", "int64", "float16", "float32", "float64"]),
       blosc=st.none() | st.builds(Blosc, st.sampled_from(["lz4", "zstd", "blosclz"]), st.integers(0, 9),
                                   st.sampled_from(["noshuffle", "shuffle", "bitshuffle"]), st.integers(0, 8)),
       separator=st.sampled_from(["/", "."]))
def test_array_metadata_reads_back_what_it_writes(rows, row_shape, chunk_rows, dtype, blosc, separator):
    dtype = np.dtype(dtype)
    meta = ArrayMeta((rows, *row_shape), (chunk_rows, *row_shape), dtype, dtype.type(0).item(), {"ptrace": {"dtype": dtype.name}},
                     blosc, separator)
    assert ArrayMeta.from_json(meta.to_json()) == meta


# -- metadata documents ----------------------------------------------------------------------------
DOCUMENTS = (Manifest, ModelInfo, RunInfo, RequestsInfo)


@FUZZ
@given(payload=st.binary(max_size=300) | MSGPACK.map(lambda value: msgpack.packb(value, use_bin_type=True)),
       kind=st.sampled_from(DOCUMENTS))
def test_documents_of_any_bytes(payload, kind):
    _only_bundle_errors(kind.from_bytes, payload)


@pytest.fixture(scope="module")
def golden_documents() -> dict:
    with open_bundle(GOLDEN) as bundle:
        return {Manifest: bundle.manifest.to_dict(), ModelInfo: bundle.model.to_dict(),
                RunInfo: bundle.run.to_dict(), RequestsInfo: bundle.requests.to_dict()}


@FUZZ
@given(data=st.data(), kind=st.sampled_from(DOCUMENTS))
def test_documents_with_any_part_replaced(golden_documents, data, kind):
    document = _replace_at_random(golden_documents[kind], data, MSGPACK)
    _only_bundle_errors(kind.from_bytes, msgpack.packb(document, use_bin_type=True))


# -- segment tables --------------------------------------------------------------------------------
@FUZZ
@given(table=st.lists(st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(-3, 40), min_size=4, max_size=4),
                      max_size=6),
       rows=st.integers(0, 40), requests=st.integers(0, 4), dtype=st.sampled_from([np.int64, np.int32, np.float64]))
def test_segment_tables_of_any_values(table, rows, requests, dtype):
    array = np.array(table, dtype=np.int64).reshape(-1, 4).astype(dtype)
    _only_bundle_errors(segments_by_request, array, rows, requests)


@FUZZ
@given(shape=st.lists(st.integers(0, 5), max_size=3))
def test_segment_tables_of_any_shape(shape):
    _only_bundle_errors(segments_by_request, np.zeros(shape, np.int64), 0, 1)


# -- chunks ----------------------------------------------------------------------------------------
CHUNK_META = ArrayMeta((8, 4), (8, 4), np.dtype(np.float32), 0.0, blosc=Blosc("lz4", 5, "shuffle", 4))
CHUNK = chunks.encode(CHUNK_META, np.arange(32, dtype=np.float32).reshape(8, 4))


@FUZZ
@given(data=st.data(), meta=st.sampled_from([CHUNK_META, ArrayMeta((8, 4), (8, 4), np.dtype(np.float32), 0.0)]))
def test_chunks_of_any_bytes_with_a_valid_checksum(data, meta):
    """Mutate the stored chunk (or draw any bytes), then make its checksum valid: the decoder
    itself must refuse what is wrong."""
    body = bytearray(CHUNK[:-4])
    if data.draw(st.booleans()):
        body = bytearray(data.draw(st.binary(max_size=200)))
    for _ in range(data.draw(st.integers(0, 4))):
        if body:
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    stored = np.frombuffer(bytes(body) + google_crc32c.value(bytes(body)).to_bytes(4, "little"), np.uint8)
    _only_bundle_errors(chunks.decode, meta, stored, np.empty(meta.chunk_bytes, np.uint8))


# -- zip members -----------------------------------------------------------------------------------
GOLDEN_ZIP = (GOLDEN_ROOT / "v2" / "torch.zarr.zip").read_bytes()
#: Where the zip's headers start (local, central directory, end record): the bytes worth changing.
ZIP_HEADERS = [found.start() for found in re.finditer(b"PK", GOLDEN_ZIP)]


def _read_every_member(path: Path) -> None:
    check_archive(path)
    store = open_read_store(path)
    try:
        for key in store.stored_keys():
            store.read_stored(key, np.empty(1 << 16, np.uint8))
    finally:
        store.close()


@FUZZ
@given(data=st.data())
def test_zips_with_any_bytes_changed(tmp_path_factory, data):
    """A packed bundle with bytes of its headers and directory changed (or cut short): the archive
    checks and the member reads refuse it, or it reads."""
    archive = bytearray(GOLDEN_ZIP)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.sampled_from(ZIP_HEADERS)) + data.draw(st.integers(0, 46))
        if at < len(archive):
            archive[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        archive = archive[:data.draw(st.integers(0, len(archive)))]
    path = tmp_path_factory.mktemp("zip") / "b.zarr.zip"
    path.write_bytes(bytes(archive))
    if zipfile.is_zipfile(path):
        _only_bundle_errors(_read_every_member, path)


@FUZZ
@given(names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True), data=st.data())
def test_zips_of_any_member_names_and_methods(tmp_path_factory, names, data):
    path = tmp_path_factory.mktemp("zip") / "b.zarr.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            method = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]))
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            info.external_attr = data.draw(st.integers(0, 2**32 - 1))
            info.flag_bits |= data.draw(st.sampled_from([0, 0x01, 0x08, 0x800]))
            archive.writestr(info, data.draw(st.binary(max_size=40)))
    _only_bundle_errors(_read_every_member, path)
