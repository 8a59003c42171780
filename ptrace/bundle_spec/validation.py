"""``validate_bundle``: every rule of SPEC.md that a bundle can break, one line per problem.

Opening problems (not a bundle, newer spec, incomplete, a symbolic link, a malformed zip) raise,
as they do for every reader. Everything else is collected: the structural rules every reader
enforces when it opens a bundle (:mod:`~ptrace.bundle_spec.structure`: the manifest, every node,
every array's metadata, the segment tables, the per-request invariants of sections 2 and 6),
then what only a full read shows: the metadata documents, and every array's chunks and
whole-content checksum (each segment's too). Declared sizes are weighed against what is stored
before any chunk is read (``Bundle._node``), so this returns in time proportional to the
bundle's bytes, whatever it declares.
"""

from __future__ import annotations

import math
import os

import google_crc32c
import numpy as np

from ptrace.bundle_spec import layout
from ptrace.bundle_spec.arrays import MAX_CHUNK_BYTES
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import (
    ArrayRecord,
    EnvironmentInfo,
    ModelInfo,
    ReplayInfo,
    RunInfo,
)
from ptrace.bundle_spec.structure import attempt, problem_line, structural_problems
from ptrace.errors import BundleCorruptError, BundleError

#: How many bytes of rows the whole-content checksum reads at once (whole chunks at a time).
_READ_BYTES = 16 << 20


def validate_bundle(path: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a bundle, as one line each; an empty list means valid."""
    with Bundle(path) as bundle:
        problems = structural_problems(bundle)
        for document in (ModelInfo, RunInfo, EnvironmentInfo):
            problems += attempt(bundle, bundle._document, document)
        if bundle._has_node(ReplayInfo.path):
            problems += attempt(bundle, bundle._document, ReplayInfo)
        for array_path, record in bundle.manifest.arrays.items():
            problems += _check_content(bundle, array_path, record)
    return list(dict.fromkeys(problems))  # a broken segment table is found by both kinds of check


def _check_content(bundle: Bundle, path: str, record: ArrayRecord) -> list[str]:
    """Every chunk of the array decodes, and its content has the checksums recorded."""
    try:
        node = bundle._node(path)
    except (KeyError, BundleError):
        return []  # a structural problem, already said
    if tuple(node.shape) != tuple(record.shape) or node.logical_dtype != record.dtype:
        return []  # the same
    row_bytes = math.prod(node.shape[1:]) * node.dtype.itemsize
    chunk_rows = node.chunks[0]
    if chunk_rows * row_bytes > MAX_CHUNK_BYTES:
        return [f"array {path}: one block of chunk rows holds {chunk_rows * row_bytes} bytes "
                f"(chunks do not span whole rows); a reader holds at most {MAX_CHUNK_BYTES} at once"]
    step = chunk_rows * max(1, _READ_BYTES // max(1, chunk_rows * row_bytes))
    try:
        _read_verified(bundle, path, record, step)
    except BundleError as exc:
        message = problem_line(bundle, exc)
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
