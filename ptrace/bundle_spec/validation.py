"""``validate_bundle``: every rule of SPEC.md that a bundle can break, one line per problem.

Opening problems (not a bundle, newer spec, incomplete, a symbolic link, a malformed zip) raise,
as they do for every reader. Everything else is collected: metadata documents, the manifest,
every node, every array's metadata, chunks and whole-content checksum, the segment tables
(spec version 2), and the per-request invariants of sections 2 and 6 (positions strictly
increasing included), in either version's layout. Declared sizes are
weighed against what is stored before any chunk is read (``Bundle._node``), so this returns in
time proportional to the bundle's bytes, whatever it declares.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import google_crc32c
import numpy as np

from ptrace.bundle_spec import layout, moe, names
from ptrace.bundle_spec.dtypes import is_logical
from ptrace.bundle_spec.layout import request_array, segment_table, stats_array, tensor_array
from ptrace.bundle_spec.arrays import MAX_CHUNK_BYTES
from ptrace.bundle_spec.reader import Bundle, error_reason, open_bundle
from ptrace.bundle_spec.schema import ArrayRecord, EnvironmentInfo, ModelInfo, ReplayInfo, RequestsInfo, RunInfo
from ptrace.bundle_spec.stats import COLUMNS
from ptrace.errors import BundleCorruptError, BundleError

#: How many bytes of rows the whole-content checksum reads at once (whole chunks at a time).
_READ_BYTES = 16 << 20
_BUNDLE_ID = re.compile(r"^[0-9a-f]{32}$")
#: Array paths of each version (SPEC.md section 2): a request's own arrays in version 1; in
#: version 2 one array per kind, each with its segment table.
_V1_ARRAY = re.compile(r"^requests/(0|[1-9][0-9]*)/(.+)$")
_V2_ARRAY = re.compile(r"^(?:segments/)?(?:requests|stats|tensors)/[^/]+$")


def validate_bundle(path: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a bundle, as one line each; an empty list means valid."""
    problems: list[str] = []
    with open_bundle(path) as bundle:
        for document in (ModelInfo, RunInfo, EnvironmentInfo, RequestsInfo):
            problems += _attempt(bundle, bundle._document, document)
        if bundle._has_node(ReplayInfo.path):
            problems += _attempt(bundle, bundle._document, ReplayInfo)
        problems += _check_manifest(bundle)
        problems += _check_nodes(bundle)
        for array_path, record in bundle.manifest.arrays.items():
            problems += _check_array(bundle, array_path, record)
        if not problems:
            problems += _check_requests(bundle)
    return problems


def _line(bundle: Bundle, exc: BundleError) -> str:
    """A reader's error as a problem line: its message without the bundle path or the hint."""
    return exc.args[0].removeprefix(f"{bundle.path}: ")


def _attempt(bundle: Bundle, check, *args: Any) -> list[str]:
    """Run one check, turning the error it raises into a problem line."""
    try:
        check(*args)
    except BundleError as exc:
        return [_line(bundle, exc)]
    return []


def _check_manifest(bundle: Bundle) -> list[str]:
    manifest, problems = bundle.manifest, []
    if manifest.spec_version != bundle.spec_version:
        problems.append(f"meta/manifest: spec_version {manifest.spec_version} differs from the root "
                        f"attribute's {bundle.spec_version}")
    if not _BUNDLE_ID.match(manifest.bundle_id):
        problems.append("meta/manifest: bundle_id is not 32 lowercase hex digits")
    if manifest.mode not in ("full", "stats"):
        problems.append(f"meta/manifest: mode {manifest.mode!r} is neither 'full' nor 'stats'")
    problems += [f"meta/manifest: tensor name {name!r} is neither canonical nor an x. extra"
                 for name in manifest.tensor_names if not names.is_recordable(name)]
    pattern = _V1_ARRAY if bundle.spec_version == 1 else _V2_ARRAY
    for path, record in manifest.arrays.items():
        if not pattern.match(path) or any(part in ("", ".", "..") for part in path.split("/")):
            problems.append(f"meta/manifest: array path {path!r} is not one of section 2's")
        elif any(size < 0 for size in record.shape) or not is_logical(record.dtype):
            problems.append(f"meta/manifest: array {path} declares {record.dtype}{list(record.shape)}")
        elif bundle.spec_version > 1 and not layout.is_segment_table(path) \
                and segment_table(path) not in manifest.arrays:
            problems.append(f"meta/manifest: array {path} has no segment table {segment_table(path)}")
        elif layout.is_segment_table(path) and path.removeprefix(layout.SEGMENTS + "/") not in manifest.arrays:
            problems.append(f"meta/manifest: segment table {path} is not of a listed array")
    return problems


def _check_nodes(bundle: Bundle) -> list[str]:
    """Node names, and arrays that exist but are not listed (section 2 and 4)."""
    problems = []
    nodes = [key.removesuffix("zarr.json").rstrip("/") for key in bundle._store.stored_keys()
             if key == "zarr.json" or key.endswith("/zarr.json")]
    for node in nodes:
        if any(part.startswith("__") for part in node.split("/")):
            problems.append(f"node {node} has a name beginning with __ (reserved)")
        if node and not layout.is_metadata(node) and node not in bundle.manifest.arrays:
            try:
                if bundle._node_document(node).get("node_type") == "array":
                    problems.append(f"unexpected array {node} (not in the manifest)")
            except BundleError as exc:
                problems.append(_line(bundle, exc))
            except Exception as exc:  # malformed metadata of a node nobody lists
                problems.append(f"unexpected node {node} with malformed metadata ({error_reason(exc)})")
    return problems


def _check_array(bundle: Bundle, path: str, record: ArrayRecord) -> list[str]:
    try:
        node = bundle._node(path)
    except KeyError:
        return [f"array {path} is missing"]
    except BundleError as exc:
        return [_line(bundle, exc)]
    logical = node.logical_dtype
    if tuple(node.shape) != tuple(record.shape) or logical != record.dtype:
        return [f"array {path} is {logical}{list(node.shape)}, the manifest says "
                f"{record.dtype}{list(record.shape)}"]
    row_bytes = math.prod(node.shape[1:]) * node.dtype.itemsize
    chunk_rows = node.chunks[0]
    if chunk_rows * row_bytes > MAX_CHUNK_BYTES:
        return [f"array {path}: one block of chunk rows holds {chunk_rows * row_bytes} bytes "
                f"(chunks do not span whole rows); a reader holds at most {MAX_CHUNK_BYTES} at once"]
    step = chunk_rows * max(1, _READ_BYTES // max(1, chunk_rows * row_bytes))
    try:
        _read_verified(bundle, path, record, step)
    except BundleError as exc:
        message = _line(bundle, exc)
        if message.startswith(f"{path} is corrupted "):  # a chunk failed its own checksum or did not decode
            message = f"array {path}: corrupted chunk {message.removeprefix(f'{path} is corrupted ')}"
        return [message]
    return []


def _read_verified(bundle: Bundle, path: str, record: ArrayRecord, step: int) -> None:
    """Read the whole array, checking its CRC-32C and, for a data array of spec version 2, each
    segment's (SPEC.md section 4): a segment swapped for another of the same length passes the
    chunks' checksums."""
    if bundle.spec_version == 1 or layout.is_segment_table(path) or not record.shape[0]:
        for _ in bundle.verified_blocks(path, step, stored=True):
            pass
        return
    segments = sorted(segment for parts in bundle._segments(path).values() for segment in parts)
    crc = 0
    for first, last, segment_crc in segments:
        for _, block in bundle._verified_range(path, first, last, segment_crc, step, stored=True):
            crc = google_crc32c.extend(crc, np.ascontiguousarray(block).reshape(-1).view(np.uint8))
    if crc != record.crc32c:
        raise BundleCorruptError(f"array {path}: content checksum {crc:#010x} != manifest {record.crc32c:#010x} "
                                 "(a chunk is missing or was replaced)")


def _check_requests(bundle: Bundle) -> list[str]:
    """The per-request invariants of sections 2 and 6 (run only on arrays that passed their own checks)."""
    problems = []
    records = bundle.requests.requests
    for position, record in enumerate(records):
        if record.index != position:
            problems.append(f"meta/requests: request {position} has index {record.index}")
    if bundle.spec_version == 1:
        known = {str(position) for position in range(len(records))}
        problems += [f"array {path} belongs to no request of meta/requests" for path in bundle.manifest.arrays
                     if _V1_ARRAY.match(path).group(1) not in known]
    else:
        for path in bundle.manifest.arrays:
            if not layout.is_segment_table(path):
                problems += _attempt(bundle, bundle._segments, path)
    if problems:
        return problems
    for record in records:
        problems += _check_request(bundle, record)
    return problems


def _check_request(bundle: Bundle, record: Any) -> list[str]:
    r, problems = record.index, []
    shapes = {leaf: bundle.part_shape(request_array(leaf), r)
              for leaf in (*layout.REQUIRED_REQUEST_ARRAYS, *layout.OPTIONAL_REQUEST_ARRAYS)}
    missing = [leaf for leaf in layout.REQUIRED_REQUEST_ARRAYS if shapes[leaf] is None]
    if missing:
        return [f"request {r}: array {leaf} is missing" for leaf in missing]
    prompt, generated = record.prompt_len, record.output_len
    topk_shape = shapes["topk_ids"]
    k = topk_shape[1] if len(topk_shape) == 2 else "k"
    rows = shapes["positions"][0]
    expected = {"prompt_ids": ("int64", [prompt]), "output_ids": ("int64", [generated]),
                "positions": ("int64", [rows]), "topk_ids": ("int64", [generated, k]),
                "topk_logprobs": ("float32", [generated, k]), "input_ids": ("int64", [prompt + generated - 1]),
                "prompt_logprobs": ("float32", [prompt]), "prompt_topk_ids": ("int64", [prompt, k]),
                "prompt_topk_logprobs": ("float32", [prompt, k])}
    for leaf, (dtype, shape) in expected.items():
        found, found_dtype = shapes[leaf], bundle.array_dtype(request_array(leaf), r)
        if found is not None and (found_dtype != dtype or list(found) != shape):
            problems.append(f"request {r}: {leaf} is {found_dtype}{list(found)}, expected {dtype}{shape} "
                            f"(meta/requests says {prompt} prompt and {generated} generated tokens)")
    positions_problems = _attempt(bundle, _check_positions, bundle, r, prompt + max(generated - 1, 0))
    problems += positions_problems
    allowed = {} if positions_problems else _rows_allowed(bundle, r)
    for name in bundle.tensor_names:
        for kind, array in ((layout.STATS, stats_array(name)), (layout.TENSORS, tensor_array(name))):
            found = bundle.part_shape(array, r)
            if found is None and (kind == layout.STATS or bundle.mode == "full"):
                problems.append(f"request {r}: {kind}/{name} is missing")
            elif found is not None and found[0] != allowed.get(name, rows):
                problems.append(f"request {r}: {kind}/{name} has {found[0]} rows, positions has {rows}")
            elif found is not None and kind == layout.STATS and \
                    (bundle.array_dtype(array, r) != "float64" or list(found) != [found[0], len(COLUMNS)]):
                problems.append(f"request {r}: stats/{name} is {bundle.array_dtype(array, r)}{list(found)}, "
                                f"expected float64{[found[0], len(COLUMNS)]}")
    return problems + _check_routing(bundle, r)


def _check_routing(bundle: Bundle, r: int) -> list[str]:
    """Expert ids (``layers.{i}.experts``, section 5) are int32, top-k wide, and name experts the
    model has (meta/model's config.json declares how many)."""
    problems = []
    experts, top_k = moe.num_experts(bundle.model.config), moe.top_k(bundle.model.config)
    for name in bundle.tensor_names:
        if not name.endswith(".experts") or names.layer_index(name) is None:
            continue
        where = f"request {r}: {name}"
        if not experts:
            problems.append(f"{where}: expert ids in a model whose config.json declares no experts")
            continue
        shape = bundle.part_shape(tensor_array(name), r)
        if shape is not None:
            dtype = bundle.array_dtype(tensor_array(name), r)
            if dtype != "int32" or len(shape) != 2 or (top_k and shape[1] != top_k):
                problems.append(f"{where} is {dtype}{list(shape)}, expected int32[rows, {top_k or 'top_k'}]")
                continue
            ids = bundle.tensor(r, name)
            low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
        else:  # a stats capture: the rows' min and max
            stats = bundle.stats(r, name)
            low, high = (int(stats[:, 0].min()), int(stats[:, 1].max())) if stats.size else (0, 0)
        if low < 0 or high >= experts:
            problems.append(f"{where} holds expert id {low if low < 0 else high} outside [0, {experts}) "
                            f"(meta/model's config.json declares {experts} experts)")
    return problems


def _rows_allowed(bundle: Bundle, request: int) -> dict[str, int]:
    """Tensors whose stats rows fit the positions otherwise (the logits from the last prompt
    position on, SPEC.md section 6): their row count, which the tensor itself must have too."""
    positions, prompt = bundle.positions(request), bundle.requests.requests[request].prompt_len
    allowed = {}
    for name in bundle.tensor_names:
        found = bundle.part_shape(stats_array(name), request)
        if found is not None and names.tensor_positions(name, positions, prompt, found[0]) is not None:
            allowed[name] = found[0]
    return allowed


def _check_positions(bundle: Bundle, request: int, fed: int) -> None:
    positions = bundle.positions(request)  # refuses positions that are not strictly increasing
    if positions.size and positions[-1] >= fed:
        raise bundle._corrupt(bundle.stored_path(request_array("positions"), request), f"of request {request} reaches position {positions[-1]}, "
                                    f"past the {fed} positions fed")
