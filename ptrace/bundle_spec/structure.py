"""The structural rules of SPEC.md that every reader enforces when it opens a bundle.

``open_bundle`` refuses a bundle that breaks any of them, so that ``compare``, ``replay``,
``inspect``, ``report`` and the canary refuse what ``validate`` refuses, instead of reading a
plausible answer out of it: a manifest path or tensor name outside section 2, an array nobody
lists, an array whose metadata contradicts its manifest record, a segment table that misplaces
rows, a request whose arrays do not have the rows its record and positions say (rows moved
between requests, a zero-row tensor), a manifest checksum the segment tables contradict.

These checks read metadata, segment tables and positions, never a data chunk: chunk checksums
and each segment's CRC-32C are verified as the data is read, and ``validate_bundle``
(:mod:`~ptrace.bundle_spec.validation`) reads everything besides.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from ptrace.bundle_spec import crc, layout, moe, names
from ptrace.bundle_spec.arrays import MetadataError, node_type
from ptrace.bundle_spec.dtypes import is_logical
from ptrace.bundle_spec.layout import (
    request_array,
    segment_table,
    stats_array,
    tensor_array,
)
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import ArrayRecord, RequestsInfo
from ptrace.bundle_spec.stats import COLUMNS
from ptrace.errors import BundleCorruptError, BundleError

_BUNDLE_ID = re.compile(r"^[0-9a-f]{32}$")
#: Array paths of each version (SPEC.md section 2): a request's own arrays in version 1; in
#: version 2 one array per kind, each with its segment table.
_V1_ARRAY = re.compile(r"^requests/(0|[1-9][0-9]*)/(.+)$")
_V2_ARRAY = re.compile(r"^(?:segments/)?(?:requests|stats|tensors)/[^/]+$")


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a complete bundle (directory or zip) that keeps the structural rules, or raise a
    :class:`~ptrace.errors.BundleError` naming the first rule it breaks."""
    bundle = Bundle(path)
    try:
        require_structure(bundle)
    except BaseException:
        bundle.close()
        raise
    return bundle


def require_structure(bundle: Bundle) -> None:
    """Raise a :class:`~ptrace.errors.BundleCorruptError` naming the first structural rule
    ``bundle`` breaks (once per bundle: a bundle from :func:`open_bundle` has passed already)."""
    if bundle.structure_checked:
        return
    problems = structural_problems(bundle)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise BundleCorruptError(f"{bundle.path}: {problems[0]}{more}",
                                 hint="run `ptrace validate` on it to see every problem")
    bundle.structure_checked = True


def structural_problems(bundle: Bundle) -> list[str]:
    """Every structural rule ``bundle`` breaks, one line each (empty: none)."""
    problems = _check_manifest(bundle) + _check_nodes(bundle)
    for path, record in bundle.manifest.arrays.items():
        problems += _check_array_metadata(bundle, path, record)
    problems += attempt(bundle, bundle._document, RequestsInfo)
    if not problems:
        problems += _check_requests(bundle)
    return problems


def problem_line(bundle: Bundle, exc: BundleError) -> str:
    """A reader's error as a problem line: its message without the bundle path or the hint."""
    return exc.args[0].removeprefix(f"{bundle.path}: ")


def attempt(bundle: Bundle, check: Callable[..., Any], *args: Any) -> list[str]:
    """Run one check, turning the error it raises into a problem line."""
    try:
        check(*args)
    except BundleError as exc:
        return [problem_line(bundle, exc)]
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
                if node_type(bundle._node_metadata(node)) == "array":
                    problems.append(f"unexpected array {node} (not in the manifest)")
            except MetadataError as exc:  # malformed metadata of a node nobody lists
                problems.append(f"unexpected node {node} with malformed metadata ({exc})")
    return problems


def _check_array_metadata(bundle: Bundle, path: str, record: ArrayRecord) -> list[str]:
    """The array is there, its metadata keeps SPEC.md section 4 and agrees with its record, and
    (spec version 2) the record's checksum is the one its segments' checksums make."""
    try:
        node = bundle._node(path)
    except KeyError:
        return [f"array {path} is missing"]
    except BundleError as exc:
        return [problem_line(bundle, exc)]
    logical = node.logical_dtype
    if tuple(node.shape) != tuple(record.shape) or logical != record.dtype:
        return [f"array {path} is {logical}{list(node.shape)}, the manifest says "
                f"{record.dtype}{list(record.shape)}"]
    return []


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
                problems += attempt(bundle, _check_segment_checksums, bundle, path)
    if problems:
        return problems
    for record in records:
        problems += _check_request(bundle, record)
    return problems


def _check_segment_checksums(bundle: Bundle, path: str) -> None:
    """The manifest's checksum of a data array is the one its segments' checksums make, in row
    order (a stale or forged record; each segment's own is checked as its rows are read)."""
    segments = sorted(segment for parts in bundle._segments(path).values() for segment in parts)
    node, record = bundle._node(path), bundle.manifest.arrays[path]
    row_bytes = math.prod(node.shape[1:]) * node.dtype.itemsize
    whole = 0
    for first, last, segment_crc in segments:
        whole = crc.combine(whole, segment_crc, (last - first) * row_bytes)
    if whole != record.crc32c:
        raise bundle._corrupt(path, f"has the content checksum {record.crc32c:#010x} in the manifest, its "
                                    f"segment table's checksums make {whole:#010x}")


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
    positions_problems = attempt(bundle, _check_positions, bundle, r, prompt + max(generated - 1, 0))
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
    model has (meta/model's config.json declares how many): a few int32 per position, read here."""
    routed = [name for name in bundle.tensor_names if name.endswith(".experts") and names.layer_index(name) is not None]
    if not routed:
        return []
    problems = []
    experts, top_k = moe.num_experts(bundle.model.config), moe.top_k(bundle.model.config)
    for name in routed:
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
