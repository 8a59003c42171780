"""Hostile and broken bundles (SPEC.md section 8): bundles travel with bug reports, every reader is safe.

Each test forges one kind of bundle an attacker or an unlucky user could hand over, with the
checksums recomputed so that the payload reaches the parsers, and checks the SPEC's MUST: refused
with a one-line error naming the bundle and the node, quickly, without following links, without
allocating or writing what the bundle merely declares. Every reader refuses what ``validate``
refuses: each hostile bundle goes through both ``validate`` and ``compare`` (:func:`assert_refused`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import google_crc32c
import msgpack
import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from ptrace import compare_bundles
from ptrace.bundle_spec import open_bundle, pack, validate_bundle
from ptrace.bundle_spec.layout import segment_table
from ptrace.bundle_spec.reader import Bundle
from ptrace.errors import BundleCorruptError, BundleError, NotABundleError
from tests.bundle_spec.test_roundtrip import write_minimal
from tests.conftest import one_line_error, run_cli

SECRET = "TOP-SECRET-CONTENT-0123456789"


@pytest.fixture
def bundle(tmp_path) -> Path:
    tensor = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    write_minimal(tmp_path / "b.zarr", {"layers.0.out": tensor, "logits": tensor * 2})
    return tmp_path / "b.zarr"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET * 100)
    return path


# -- forging tools: change a bundle the way an attacker would, checksums and all ---------------------
def read_document(bundle: Path, path: str) -> dict:
    group = zarr.open_group(LocalStore(bundle, read_only=True), mode="r")
    return msgpack.unpackb(group[path][...].tobytes(), raw=False)


def forge_document(bundle: Path, path: str, data: dict | bytes) -> None:
    """Replace a metadata document by ``data`` (a map, or raw bytes), with a valid chunk checksum."""
    payload = np.frombuffer(data if isinstance(data, bytes) else msgpack.packb(data, use_bin_type=True), np.uint8)
    group = zarr.open_group(LocalStore(bundle), mode="r+")
    array = group.create_array(path, shape=payload.shape, dtype=np.uint8, chunks=payload.shape,
                               serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=0,
                               overwrite=True)
    array[...] = payload


def edit_manifest(bundle: Path, **changes) -> dict:
    manifest = read_document(bundle, "meta/manifest") | changes
    forge_document(bundle, "meta/manifest", manifest)
    return manifest


def forge_array(bundle: Path, path: str, data: np.ndarray) -> None:
    """Replace an array's content and its manifest record (shape, CRC), as a consistent forger
    would; a data array of these one-request bundles gets a segment table to match."""
    group = zarr.open_group(LocalStore(bundle), mode="r+")
    manifest = read_document(bundle, "meta/manifest")
    crc = google_crc32c.value(np.ascontiguousarray(data).tobytes())
    forged = {path: data}
    if segment_table(path) in manifest["arrays"]:
        forged[segment_table(path)] = np.array([[0, 0, data.shape[0], crc]], np.int64)
    for node, content in forged.items():
        array = group.create_array(node, shape=content.shape, dtype=content.dtype, chunks=tuple(max(1, size) for size in content.shape) or (1,),
                                   serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=0,
                                   attributes={"ptrace": {"dtype": content.dtype.name}}, overwrite=True)
        array[...] = content
        manifest["arrays"][node] = {"shape": list(content.shape), "dtype": content.dtype.name,
                                    "crc32c": google_crc32c.value(np.ascontiguousarray(content).tobytes())}
    forge_document(bundle, "meta/manifest", manifest)


def edit_zarr_json(bundle: Path, node: str, **changes) -> None:
    path = bundle / node / "zarr.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def assert_refused(bundle: Path, match: str) -> None:
    """``validate`` reports a problem matching ``match`` (or refuses to open the bundle with it),
    and ``compare`` refuses the bundle with it: an error, never a verdict."""
    try:
        problems = validate_bundle(bundle)
    except BundleError as exc:
        problems = [str(exc)]
    assert any(re.search(match, problem) for problem in problems), problems
    with pytest.raises(BundleError, match=match):
        with open_bundle(bundle) as a, open_bundle(bundle) as b:
            compare_bundles(a, b)
    try:  # opened by hand, without open_bundle's checks: compare runs them itself
        unchecked = Bundle(bundle)
    except BundleError:
        return  # refused before any structure could be read
    with unchecked, pytest.raises(BundleError, match=match):
        compare_bundles(unchecked, unchecked)


# -- symbolic links: never followed ------------------------------------------------------------------
def test_pack_refuses_a_link_and_leaks_nothing(bundle, secret, tmp_path):
    (bundle / "notes.txt").symlink_to(secret)
    with pytest.raises(BundleCorruptError, match="notes.txt is a symbolic link"):
        pack(bundle, tmp_path / "b.zarr.zip")
    assert not (tmp_path / "b.zarr.zip").exists()
    line = one_line_error(run_cli("pack", bundle, "-o", tmp_path / "c.zarr.zip"))
    assert "symbolic link" in line and SECRET not in line
    assert not (tmp_path / "c.zarr.zip").exists()


def test_readers_refuse_a_chunk_that_is_a_link(bundle, secret, tmp_path):
    chunk = bundle / "tensors/logits/c/0/0"
    outside = tmp_path / "outside-chunk"
    shutil.move(chunk, outside)  # the very same bytes: only the link is wrong
    chunk.symlink_to(outside)
    assert_refused(bundle, "tensors/logits/c/0/0 is a symbolic link")
    chunk.unlink()
    chunk.symlink_to(secret)  # a link to another file: its bytes must never be quoted
    for command in ("validate", "inspect"):
        line = one_line_error(run_cli(command, bundle))
        assert "tensors/logits/c/0/0 is a symbolic link" in line and SECRET not in line


def test_readers_refuse_a_node_that_is_a_link_inside_the_bundle(bundle):
    shutil.rmtree(bundle / "stats/logits")
    (bundle / "stats/logits").symlink_to(bundle / "stats/layers.0.out")
    assert_refused(bundle, "stats/logits is a symbolic link")


def test_readers_refuse_special_files_instead_of_blocking(bundle):
    chunk = bundle / "tensors/logits/c/0/0"
    chunk.unlink()
    os.mkfifo(chunk)  # reading a FIFO blocks forever
    line = one_line_error(run_cli("validate", bundle, timeout=60))
    assert "not a regular file" in line


def test_zip_member_that_is_a_link_is_refused(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.zarr.zip")
    with zipfile.ZipFile(archive, "a") as zipped:
        link = zipfile.ZipInfo("notes.txt")
        link.external_attr = 0o120777 << 16
        zipped.writestr(link, "/etc/passwd")
    assert_refused(archive, "'notes.txt' is a symbolic link")


# -- denial of service: declarations are weighed against what is stored ------------------------------
def test_enormous_declared_shape_is_refused_in_seconds(bundle):
    """A manifest and zarr.json that agree on ~10**11 rows of which nothing is stored."""
    rows = 10**11
    edit_zarr_json(bundle, "tensors/logits", shape=[rows, 8])
    manifest = read_document(bundle, "meta/manifest")
    manifest["arrays"]["tensors/logits"]["shape"] = [rows, 8]
    forge_document(bundle, "meta/manifest", manifest)
    started = time.monotonic()
    result = run_cli("validate", bundle, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tensors/logits declares shape [100000000000, 8]" in result.stderr
    assert "declared size is corrupt" in result.stderr
    assert_refused(bundle, "declared size is corrupt")


def test_huge_chunks_are_refused_before_allocation(bundle):
    node = json.loads((bundle / "tensors/logits/zarr.json").read_text())
    node["chunk_grid"]["configuration"]["chunk_shape"] = [2**31, 8]
    (bundle / "tensors/logits/zarr.json").write_text(json.dumps(node))
    assert_refused(bundle, "tensors/logits declares chunks of")


def test_many_absent_tiny_chunks_are_refused(bundle):
    node = json.loads((bundle / "tensors/logits/zarr.json").read_text())
    node["chunk_grid"]["configuration"]["chunk_shape"] = [1, 1]  # 96 declared, 1 stored ...
    node["shape"] = [200_000, 8]  # ... and now 1.6 million
    (bundle / "tensors/logits/zarr.json").write_text(json.dumps(node))
    started = time.monotonic()
    assert_refused(bundle, "declared size is corrupt")
    assert time.monotonic() - started < 5


def _forge_chunk(chunk: Path, body: bytes) -> None:
    """Store ``body`` as the chunk, with a valid CRC-32C: only the decoder can catch what is wrong."""
    chunk.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))


@pytest.mark.parametrize("form", ["directory", "zip"])
def test_a_blosc_header_that_misstates_the_chunk_size_is_refused_before_decoding(bundle, tmp_path, form):
    chunk = bundle / "tensors/logits/c/0/0"
    body = bytearray(chunk.read_bytes()[:-4])
    body[4:8] = (2**31 - 1).to_bytes(4, "little")  # the header's uncompressed size: 2 GiB
    _forge_chunk(chunk, bytes(body))
    path = bundle if form == "directory" else _rezip(bundle, tmp_path / "b.zarr.zip")
    with open_bundle(path) as opened, pytest.raises(BundleCorruptError,
                                                    match="tensors/logits is corrupted .*declares 2147483647 bytes"):
        for _ in opened.verified_blocks("tensors/logits", 4):
            pass
    assert_refused(path, "tensors/logits.* corrupted .*declares 2147483647 bytes")


@pytest.mark.parametrize("form", ["directory", "zip"])
def test_a_chunk_larger_than_its_codecs_can_produce_is_refused_before_reading(bundle, tmp_path, form):
    chunk = bundle / "tensors/logits/c/0/0"
    _forge_chunk(chunk, chunk.read_bytes()[:-4] + bytes(1 << 20))
    path = bundle if form == "directory" else _rezip(bundle, tmp_path / "b.zarr.zip")
    with open_bundle(path) as opened, pytest.raises(BundleCorruptError, match=r"logits/c/0/0 stores \d+ bytes, more than"):
        for _ in opened.verified_blocks("tensors/logits", 4):
            pass
    assert_refused(path, r"logits/c/0/0 stores \d+ bytes, more than")


def _rezip(bundle: Path, archive: Path, compression: int = zipfile.ZIP_STORED, extra: tuple = ()) -> Path:
    with zipfile.ZipFile(archive, "w", compression=compression) as zipped:
        for file in sorted(p for p in bundle.rglob("*") if p.is_file()):
            zipped.write(file, file.relative_to(bundle).as_posix())
        for name, data in extra:
            zipped.writestr(name, data)
    return archive


def test_deflated_zip_members_are_refused_and_never_unpacked(bundle, tmp_path):
    archive = _rezip(bundle, tmp_path / "b.zarr.zip", zipfile.ZIP_DEFLATED)
    assert_refused(archive, "is compressed")
    line = one_line_error(run_cli("unpack", archive, "-o", tmp_path / "out.zarr"))
    assert "is compressed" in line and str(archive) in line
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()


def _central_entry(data: bytes, name: str) -> int:
    """Where the zip's central directory entry for ``name`` starts (APPNOTE 4.3.12)."""
    at = data.index(b"PK\x01\x02")
    while data[at + 46:at + 46 + int.from_bytes(data[at + 28:at + 30], "little")] != name.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    return at


def test_zip_member_whose_declared_size_disagrees_is_refused(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.zarr.zip")
    data = bytearray(archive.read_bytes())
    entry = _central_entry(data, "tensors/logits/c/0/0")
    data[entry + 24:entry + 28] = (2**31).to_bytes(4, "little")  # uncompressed size: 2 GiB
    archive.write_bytes(bytes(data))
    assert_refused(archive, "declares 2147483648 bytes but stores")
    data[entry + 20:entry + 24] = (2**31).to_bytes(4, "little")  # and compressed size: past the end
    archive.write_bytes(bytes(data))
    assert_refused(archive, "sizes|past the end")


def test_zip_of_a_version_python_cannot_read_is_refused(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.zarr.zip")
    data = bytearray(archive.read_bytes())
    entry = _central_entry(data, "tensors/logits/c/0/0")
    data[entry + 6] = 64  # version needed to extract: 6.4 (found by tests/bundle_spec/test_fuzz.py)
    archive.write_bytes(bytes(data))
    assert_refused(archive, "is not a readable zip .*zip file version 6.4")


def test_deeply_nested_metadata_is_refused_without_recursion(bundle):
    model = read_document(bundle, "meta/model")
    nested: dict = {}
    for _ in range(1000):
        nested = {"x": nested}
    model["config"] = nested
    forge_document(bundle, "meta/model", model)
    with open_bundle(bundle) as opened, pytest.raises(BundleCorruptError, match="meta/model .*nested more than"):
        _ = opened.model
    assert_refused(bundle, "meta/model .*nested more than")
    line = one_line_error(run_cli("inspect", bundle))
    assert str(bundle) in line and "meta/model" in line


@pytest.mark.parametrize("value, message", [(msgpack.ExtType(42, b"payload"), "extension type 42"),
                                            (msgpack.Timestamp(0), "type Timestamp")])
def test_msgpack_extension_types_are_refused(bundle, value, message):
    model = read_document(bundle, "meta/model")
    model["config"] = {"when": value}
    forge_document(bundle, "meta/model", model)
    assert_refused(bundle, message)


# -- silent acceptance: types are strict, every invariant is checked --------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"complete": "false"}, "meta/manifest.complete is str 'false', expected bool"),
    ({"spec_version": True}, "meta/manifest.spec_version is bool True, expected int"),
    ({"tensor_names": "logits"}, "meta/manifest.tensor_names is str"),
    ({"arrays": {"requests/positions": {"shape": [12.0], "dtype": "int64", "crc32c": 0}}},
     r"meta/manifest.arrays.requests/positions.shape\[0\] is float 12.0, expected int"),
])
def test_metadata_types_are_strict(bundle, changes, message):
    edit_manifest(bundle, **changes)
    assert_refused(bundle, message)


def test_request_records_are_typed_strictly(bundle):
    requests = read_document(bundle, "meta/requests")
    requests["requests"][0]["prompt_len"] = True
    forge_document(bundle, "meta/requests", requests)
    assert_refused(bundle, re.escape("meta/requests.requests[0].prompt_len is bool True, expected int"))


def test_root_spec_version_must_be_an_integer(bundle):
    meta = json.loads((bundle / "zarr.json").read_text())
    meta["attributes"]["ptrace_bundle"]["spec_version"] = True
    (bundle / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(NotABundleError, match="spec_version"):
        open_bundle(bundle)
    assert_refused(bundle, "spec_version")


def test_duplicate_zip_members_are_refused(bundle, tmp_path):
    manifest_chunk = (bundle / "meta/manifest/c/0").read_bytes()
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = _rezip(bundle, tmp_path / "b.zarr.zip", extra=(("meta/manifest/c/0", manifest_chunk),))
    assert_refused(archive, "'meta/manifest/c/0' appears twice")


def test_positions_must_strictly_increase(bundle):
    other = bundle.with_name("other.zarr")
    shutil.copytree(bundle, other)
    positions = np.arange(12, dtype=np.int64)
    positions[[3, 4]] = positions[[4, 3]]
    forge_array(other, "requests/positions", positions)
    assert_refused(other, "requests/positions is not a strictly increasing")
    with pytest.raises(BundleCorruptError, match="requests/positions"):
        with open_bundle(bundle) as a, open_bundle(other) as b:
            compare_bundles(a, b)


def test_positions_past_the_fed_tokens_are_refused(bundle):
    forge_array(bundle, "requests/positions", np.arange(100, 112, dtype=np.int64))
    assert_refused(bundle, "reaches position 111")


def test_every_spec_invariant_of_a_request_is_checked(bundle):
    forge_array(bundle, "requests/prompt_ids", np.arange(3, dtype=np.int64))  # meta/requests says 11
    forge_array(bundle, "requests/topk_logprobs", np.zeros((2, 3), np.float64))  # float32 in the spec
    problems = validate_bundle(bundle)
    assert any("prompt_ids is int64[3], expected int64[11]" in p for p in problems), problems
    assert any("topk_logprobs is float64[2, 3], expected float32[2, 3]" in p for p in problems), problems
    assert_refused(bundle, r"prompt_ids is int64\[3\], expected int64\[11\]")


@pytest.mark.parametrize("entry", ["../../../etc/passwd", "requests/0/../../x", "meta/model"])
def test_manifest_paths_outside_the_requests_are_refused(bundle, entry):
    manifest = read_document(bundle, "meta/manifest")
    manifest["arrays"][entry] = {"shape": [1], "dtype": "uint8", "crc32c": 0}
    forge_document(bundle, "meta/manifest", manifest)
    assert_refused(bundle, re.escape(f"array path {entry!r} is not one of section 2's"))


# -- one line, not noise -----------------------------------------------------------------------------
def test_stray_file_prints_no_library_warning(bundle):
    (bundle / "notes.txt").write_text("hello")
    result = run_cli("validate", bundle)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("garbage", ["{not json", json.dumps({"zarr_format": 3, "node_type": "array",
                                                                "shape": "many"})])
def test_malformed_array_metadata_is_one_line_naming_the_node(bundle, garbage):
    (bundle / "stats/logits/zarr.json").write_text(garbage)
    for command in ("inspect", "compare"):
        args = (command, bundle) if command == "inspect" else (command, bundle, bundle)
        line = one_line_error(run_cli(*args))
        assert str(bundle) in line and "stats/logits" in line and "malformed Zarr metadata" in line
    result = run_cli("validate", bundle)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Task exception" not in result.stderr
    assert "stats/logits has malformed Zarr metadata" in result.stderr
    assert_refused(bundle, "stats/logits has malformed Zarr metadata")


def test_garbage_metadata_document_is_one_line_naming_it(bundle):
    forge_document(bundle, "meta/run", b"\xc1\xc1\xc1 not msgpack")
    line = one_line_error(run_cli("inspect", bundle))
    assert str(bundle) in line and "meta/run is not a valid metadata document" in line
    assert_refused(bundle, "meta/run is not a valid metadata document")


def test_truncated_zip_is_one_line(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.zarr.zip")
    archive.write_bytes(archive.read_bytes()[:-200])
    line = one_line_error(run_cli("inspect", archive))
    assert str(archive) in line
    assert_refused(archive, "not a zip")


def test_corrupt_zip_member_is_one_line_naming_the_member(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.zarr.zip")
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zipped:
        member = zipped.getinfo("stats/logits/c/0/0")
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    data[start + 20] ^= 0xFF  # the zip's own CRC-32 of the member now fails
    archive.write_bytes(bytes(data))
    line = one_line_error(run_cli("inspect", archive))
    assert "stats/logits" in line and str(archive) in line
    assert_refused(archive, "zip member stats/logits/c/0/0 cannot be read")
    line = one_line_error(run_cli("unpack", archive, "-o", tmp_path / "out.zarr"))
    assert not (tmp_path / "out.zarr").exists()


# -- segment tables (spec version 2): which rows are whose ------------------------------------------
@pytest.mark.parametrize("table, message", [
    ([[0, 0, 5, 0], [0, 6, 12, 0]], "does not cut the 12 rows"),  # a gap
    ([[0, 0, 12, 0], [0, 12, 12, 0]], "does not cut the 12 rows"),  # an empty segment
    ([[1, 0, 12, 0]], "names a request outside 0..0"),
])
def test_a_segment_table_that_misplaces_rows_is_refused(bundle, table, message):
    forge_array(bundle, "segments/tensors/logits", np.array(table, np.int64))
    assert_refused(bundle, f"segments/tensors/logits {message}")
    line = one_line_error(run_cli("compare", bundle, bundle))
    assert "segments/tensors/logits" in line


def test_a_data_array_without_its_segment_table_is_refused(bundle):
    manifest = read_document(bundle, "meta/manifest")
    del manifest["arrays"]["segments/tensors/logits"]
    forge_document(bundle, "meta/manifest", manifest)
    shutil.rmtree(bundle / "segments/tensors/logits")
    assert_refused(bundle, "has no segment table segments/tensors/logits")


def test_rows_moved_between_requests_fail_their_segment_checksum(tmp_path):
    """Each chunk passes its own checksum and the array's rows are all there, reordered: only the
    per-segment CRC-32C says that request 0 now reads request 1's rows."""
    from ptrace.testing.bundles import SyntheticRequest, write_bundle

    path = tmp_path / "two.zarr"
    write_bundle(path, [SyntheticRequest(prompt=[1, 2, 3], outputs=[4, 5]),
                        SyntheticRequest(prompt=[6, 7, 8], outputs=[9, 10])])
    with open_bundle(path) as opened:
        rows = opened.tensor(0, "layers.0.out"), opened.tensor(1, "layers.0.out")
    swapped = np.concatenate([rows[1], rows[0]])
    original = read_document(path, "meta/manifest")["arrays"]["segments/tensors/layers.0.out"]
    table = zarr.open_group(LocalStore(path, read_only=True), mode="r")["segments/tensors/layers.0.out"][...]
    forge_array(path, "tensors/layers.0.out", swapped)
    forge_array(path, "segments/tensors/layers.0.out", table)  # the genuine table, as it was
    assert read_document(path, "meta/manifest")["arrays"]["segments/tensors/layers.0.out"] == original
    problems = validate_bundle(path)
    assert any("tensors/layers.0.out rows 0:4: content checksum" in p for p in problems), problems
    assert_refused(path, "tensors/layers.0.out has the content checksum .* its segment table's checksums make")


# -- what a reader used to read a plausible answer out of (every checksum valid) ---------------------
def _two_requests(path: Path) -> Path:
    from ptrace.testing.bundles import SyntheticRequest, write_bundle

    write_bundle(path, [SyntheticRequest(prompt=[1, 2, 3], outputs=[4, 5]),
                        SyntheticRequest(prompt=[6, 7, 8], outputs=[9, 10])])
    return path


def test_rows_moved_by_one_between_two_requests_segments_are_refused(tmp_path):
    """The segment table says request 0 ends one row early and request 1 starts there: the
    array, its chunks and every checksum (segments recomputed, manifest) are consistent, only the
    rows no longer fit the requests' positions. compare used to call this a divergence."""
    path = _two_requests(tmp_path / "two.zarr")
    array = "tensors/layers.1.out"
    group = zarr.open_group(LocalStore(path, read_only=True), mode="r")
    data, table = group[array][...], group[segment_table(array)][...]
    assert table[:, 0].tolist() == [0, 1] and table[0, 2] == table[1, 1]
    table[0, 2] -= 1
    table[1, 1] -= 1
    for row in table:
        row[3] = google_crc32c.value(np.ascontiguousarray(data[row[1]:row[2]]).tobytes())
    forge_array(path, segment_table(array), table)
    assert_refused(path, "request 0: tensors/layers.1.out has 3 rows, positions has 4")
    line = one_line_error(run_cli("compare", path, path))
    assert "tensors/layers.1.out" in line and "PASS" not in line and "FAIL" not in line


def test_an_array_the_manifest_does_not_list_is_refused(bundle):
    extra = zarr.open_group(LocalStore(bundle), mode="r+").create_array(
        "tensors/x.extra", shape=(12, 8), dtype=np.float32, chunks=(12, 8), fill_value=0)
    extra[...] = 1
    assert_refused(bundle, "unexpected array tensors/x.extra")


@pytest.mark.parametrize("name", ["../../../etc/passwd", "layers/../logits", "x./"])
def test_a_tensor_name_that_is_a_path_is_refused(bundle, name):
    manifest = read_document(bundle, "meta/manifest")
    edit_manifest(bundle, tensor_names=[*manifest["tensor_names"], name])
    assert_refused(bundle, re.escape(f"tensor name {name!r} is neither canonical"))


def test_a_dtype_that_contradicts_the_manifest_is_refused(bundle):
    manifest = read_document(bundle, "meta/manifest")
    manifest["arrays"]["tensors/logits"]["dtype"] = "float16"
    forge_document(bundle, "meta/manifest", manifest)
    assert_refused(bundle, re.escape("array tensors/logits is float32[12, 8], the manifest says float16[12, 8]"))


def test_a_stale_manifest_checksum_is_refused(bundle):
    manifest = read_document(bundle, "meta/manifest")
    manifest["arrays"]["tensors/logits"]["crc32c"] ^= 1
    forge_document(bundle, "meta/manifest", manifest)
    problems = validate_bundle(bundle)
    assert any("array tensors/logits: content checksum" in p for p in problems), problems
    assert_refused(bundle, "tensors/logits has the content checksum .* in the manifest, its segment table's")


def test_a_stale_manifest_checksum_of_a_segment_table_is_refused(bundle):
    manifest = read_document(bundle, "meta/manifest")
    manifest["arrays"]["segments/stats/logits"]["crc32c"] ^= 1
    forge_document(bundle, "meta/manifest", manifest)
    assert_refused(bundle, "segments/stats/logits: content checksum")


def test_a_zero_row_tensor_is_refused(bundle):
    forge_array(bundle, "tensors/logits", np.zeros((0, 8), np.float32))
    forge_array(bundle, "segments/tensors/logits", np.zeros((0, 4), np.int64))
    assert_refused(bundle, "request 0: tensors/logits has 0 rows, positions has 12")

