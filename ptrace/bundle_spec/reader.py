"""Reading bundles, defensively: they travel with bug reports and are opened by strangers.

A :class:`Bundle` checks, before anything else is trusted: that the path is a ptrace bundle,
that its spec version is one this code reads, and that its writer finished (SPEC.md section 7).
Every array is checked when first opened against the spec's codecs and dtypes and against
limits derived from what is actually stored (SPEC.md section 8), so a declaration cannot make a
reader allocate or iterate without bound; every metadata document is bounded in size and depth
and typed strictly. Everything read afterwards is checksummed chunk by chunk (the ``crc32c``
codec), and each request's rows against their segment's CRC-32C (or the manifest's, for an array
read whole). Readers open bundles through :func:`~ptrace.bundle_spec.structure.open_bundle`,
which also refuses what breaks the spec's structural rules; ``validate_bundle`` additionally
re-computes every array's whole-content CRC-32C.

The arrays ptrace writes are read without Zarr (:mod:`~ptrace.bundle_spec.arrays`,
:mod:`~ptrace.bundle_spec.chunks`). Arrays with other codecs the spec allows are read through
Zarr (:mod:`~ptrace.bundle_spec.zarr_fallback`), when the optional ``zarr`` extra is installed.
Whatever a bundle holds, a reader fails with a :class:`~ptrace.errors.BundleCorruptError` that
names the bundle and the node.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c
import numpy as np

from ptrace import DISTRIBUTION
from ptrace.bundle_spec import chunks, dtypes, layout
from ptrace.bundle_spec.arrays import (
    MAX_NODE_METADATA_BYTES,
    ArrayMeta,
    ForeignArrayError,
    GroupMeta,
    MetadataError,
)
from ptrace.bundle_spec.chunks import ChunkError
from ptrace.bundle_spec.layout import (
    request_array,
    segment_table,
    stats_array,
    tensor_array,
)
from ptrace.bundle_spec.names import tensor_positions
from ptrace.bundle_spec.schema import (
    ROOT_ATTRIBUTE,
    SPEC_VERSION,
    Document,
    DocumentError,
    EnvironmentInfo,
    Manifest,
    ModelInfo,
    ParallelInfo,
    ReplayInfo,
    RequestsInfo,
    RunInfo,
    ScheduleInfo,
    SettingsInfo,
    WhatIfInfo,
)
from ptrace.bundle_spec.store import BundleStore, open_read_store
from ptrace.errors import (
    BundleCorruptError,
    BundleError,
    BundleIncompleteError,
    BundleVersionError,
    NotABundleError,
    PtraceError,
)

D = TypeVar("D", bound=Document)
#: Where one request's rows of an array lie: the stored array, and its ``(start, stop, crc32c)``
#: row ranges in order.
Part = tuple[str, list[tuple[int, int, int]]]

#: Chunks that are declared but not stored read as the fill value without costing a byte on
#: disk; a bundle may have a few (older writers skipped all-zero chunks), never more than this.
MAX_ABSENT_CHUNKS = 1024
MAX_ABSENT_BYTES = 256 << 20

_VALIDATE_HINT = "run `ptrace validate` on it for a full check"


def error_reason(exc: BaseException) -> str:
    """An exception as a short clause for an error line (library messages can be long)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 160 else text[:159] + "…"


class SegmentTableError(BundleCorruptError):
    """A segment table that does not say which rows are whose (the reader names it)."""


def segments_by_request(table: np.ndarray, rows: int, requests: int) -> dict[int, list[tuple[int, int, int]]]:
    """A segment table (SPEC.md section 2) as each request's ``(start, stop, crc32c)`` row ranges,
    in order, checked: an int64 ``[segments, 4]`` array whose segments tile the ``rows`` rows of
    its data array in order, none empty, each naming one of ``requests`` requests, with a 32-bit
    CRC-32C. Raises :class:`SegmentTableError` otherwise."""
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != len(layout.SEGMENT_COLUMNS):
        raise SegmentTableError(f"is {table.dtype}{list(table.shape)}, not int64 [segments, "
                                f"{len(layout.SEGMENT_COLUMNS)}]")
    request, start, stop, crc = table.T
    tiles = rows == 0 if not stop.size else start[0] == 0 and stop[-1] == rows \
        and np.array_equal(start[1:], stop[:-1]) and bool(np.all(stop > start))
    if not tiles:
        raise SegmentTableError(f"does not cut the {rows} rows into consecutive, non-empty segments")
    if np.any((request < 0) | (request >= requests)) or np.any((crc < 0) | (crc >= 1 << 32)):
        raise SegmentTableError(f"names a request outside 0..{requests - 1} or a CRC-32C outside 32 bits")
    found: dict[int, list[tuple[int, int, int]]] = {}
    for r, first, last, checksum in table.tolist():
        found.setdefault(r, []).append((first, last, checksum))
    return found


class ZarrNotInstalledError(PtraceError, ImportError):
    """A bundle holds an array that only Zarr reads, and the optional ``zarr`` extra is not
    installed: not a problem of the bundle (no check reports it as one), of this installation."""


class Bundle:
    """A complete, readable bundle. Readers open one with :func:`~ptrace.bundle_spec.structure.open_bundle`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._store = open_read_store(self.path)
        self._nodes: dict[str, ArrayMeta] = {}
        #: The arrays that Zarr reads (codecs that ptrace does not decode itself), by path.
        self._zarr_arrays: dict[str, Any] = {}
        self._segment_tables: dict[str, dict[int, list[tuple[int, int, int]]]] = {}
        #: (array, chunk index, decoded bytes) of the last chunk a range ended inside
        self._kept_chunk: tuple[str, int, np.ndarray | None] = ("", -1, None)
        self._absent_chunks = self._absent_bytes = 0
        #: Whether the structural rules were found kept (:mod:`~ptrace.bundle_spec.structure`).
        self.structure_checked = False
        try:
            root = GroupMeta.from_json(self._node_metadata(""))
        except (MetadataError, KeyError) as exc:  # no or malformed root metadata: not something we can read
            reason = "no zarr.json" if isinstance(exc, KeyError) else f"its zarr.json {exc}"
            raise NotABundleError(f"{self.path} is not a ptrace bundle (no Zarr v3 group: {reason})") from None
        marker = root.attributes.get(ROOT_ATTRIBUTE)
        version = marker.get("spec_version") if isinstance(marker, dict) else None
        if type(version) is not int:
            raise NotABundleError(f"{self.path} is a Zarr store but not a ptrace bundle "
                                  f"(no integer {ROOT_ATTRIBUTE}.spec_version attribute)")
        self.spec_version: int = version
        if self.spec_version > SPEC_VERSION:
            raise BundleVersionError(
                f"{self.path} uses bundle spec version {self.spec_version}; this ptrace reads up to "
                f"version {SPEC_VERSION}", hint=f"upgrade ptrace: pip install -U {DISTRIBUTION}")
        if self.spec_version < 1:
            raise NotABundleError(f"{self.path} claims an invalid spec version {self.spec_version}")
        try:
            manifest = self._read_document(Manifest)
        except KeyError:
            raise BundleIncompleteError(
                f"{self.path} has no manifest: its capture was interrupted and it is incomplete",
                hint="capture it again") from None
        if not manifest.complete:
            raise BundleIncompleteError(f"{self.path} is marked incomplete", hint="capture it again")
        self.manifest: Manifest = manifest

    # -- low level ---------------------------------------------------------------------------
    def _corrupt(self, path: str, what: str, hint: str | None = _VALIDATE_HINT) -> BundleCorruptError:
        return BundleCorruptError(f"{self.path}: {path} {what}", hint=hint)

    def _has_node(self, path: str) -> bool:
        return self._store.is_stored(f"{path}/zarr.json")

    def _node_metadata(self, path: str) -> bytes:
        """The ``zarr.json`` of the node at ``path`` ("" for the root), bounded (KeyError if absent)."""
        key = f"{path}/zarr.json" if path else "zarr.json"
        payload = self._store.read_stored(key, np.empty(MAX_NODE_METADATA_BYTES, np.uint8))
        if payload is None:
            raise KeyError(path)
        return payload.tobytes()

    def _node(self, path: str) -> ArrayMeta:
        """The array at ``path`` (KeyError if absent), checked once when first opened."""
        meta = self._nodes.get(path)
        if meta is not None:
            return meta
        if not self._has_node(path):
            raise KeyError(path)
        problem = None
        try:
            meta = ArrayMeta.from_json(self._node_metadata(path))
        except MetadataError as exc:
            raise self._corrupt(path, f"has malformed Zarr metadata ({exc})") from None
        except ForeignArrayError:  # codecs ptrace does not decode itself: Zarr reads this array
            self._zarr_arrays[path], meta, problem = self._open_through_zarr(path)
        problem = problem or meta.problem()
        if problem:
            raise self._corrupt(path, problem)
        self._count_absent_chunks(path, meta)
        self._nodes[path] = meta
        return meta

    def _open_through_zarr(self, path: str) -> tuple[Any, ArrayMeta, str | None]:
        """An array of another writer's shape, opened by Zarr (the ``zarr`` extra)."""
        try:
            from ptrace.bundle_spec import zarr_fallback
        except ImportError:
            raise ZarrNotInstalledError(f"{self.path}: {path} uses codecs or chunks that ptrace reads only "
                                        "through Zarr, which is not installed",
                                        hint=f"pip install '{DISTRIBUTION}[zarr]'") from None
        try:
            return zarr_fallback.open_array(self._store, path)
        except PtraceError:
            raise
        except Exception as exc:
            raise self._corrupt(path, f"has malformed Zarr metadata ({error_reason(exc)})") from None

    def _count_absent_chunks(self, path: str, node: ArrayMeta) -> None:
        """Refuse declarations that the stored chunks do not back (SPEC.md section 8).

        A chunk that is declared but not stored reads as the fill value: cheap to declare
        (``shape: [10**11]``), costly to read. What a bundle may leave absent is bounded, over
        all its arrays together, before any chunk is read.
        """
        stored = self._store.count_stored(f"{path}/") - 1  # its zarr.json
        absent = node.nchunks - stored
        if absent <= 0:
            return
        self._absent_chunks += absent
        self._absent_bytes += absent * node.chunk_bytes
        if self._absent_chunks > MAX_ABSENT_CHUNKS or self._absent_bytes > MAX_ABSENT_BYTES:
            raise self._corrupt(path, f"declares shape {list(node.shape)} in {node.nchunks} chunks but "
                                      f"stores {max(stored, 0)}: its declared size is corrupt")

    def _read(self, path: str, rows: slice = slice(None), *, stored: bool = False) -> np.ndarray:
        """Rows ``rows`` of the array at ``path`` (all of them by default), in its logical dtype
        (``stored``: in its storage dtype)."""
        meta = self._node_or_missing(path)
        first, last, _ = rows.indices(meta.shape[0])
        if last <= first:
            data = np.zeros((0, *meta.shape[1:]), meta.dtype)
        elif meta.direct:
            blocks = [block.copy() for _, block in self._chunk_blocks(path, meta, first, last, last - first,
                                                                          keep=False)]
            data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        else:
            try:
                data = np.asarray(self._zarr_arrays[path][first:last])
            except PtraceError:
                raise
            except Exception as exc:  # a checksum, a codec, a truncated chunk: all corruption
                raise self._corrupt(path, f"is corrupted ({error_reason(exc)})") from None
        return data if stored else dtypes.from_storage(data, meta.logical_dtype)

    def _read_document(self, kind: type[D]) -> D:
        if not self._has_node(kind.path):
            raise KeyError(kind.path)
        node = self._node(kind.path)
        if node.ndim != 1 or node.dtype != np.uint8 or node.nchunks > 1:
            raise self._corrupt(kind.path, "is not a one-chunk uint8 array (a metadata document)")
        try:
            return kind.from_bytes(self._read(kind.path).tobytes())
        except DocumentError as exc:
            raise self._corrupt(kind.path, f"is not a valid metadata document ({exc})") from None
        except BundleCorruptError as exc:
            raise BundleCorruptError(f"{self.path}: {exc}", hint=_VALIDATE_HINT) from None

    def _document(self, kind: type[Document]) -> Any:
        try:
            return self._read_document(kind)
        except KeyError:
            raise self._corrupt(kind.path, "is missing") from None

    # -- metadata ----------------------------------------------------------------------------
    @cached_property
    def model(self) -> ModelInfo:
        return self._document(ModelInfo)

    @cached_property
    def run(self) -> RunInfo:
        return self._document(RunInfo)

    @cached_property
    def environment(self) -> EnvironmentInfo:
        return self._document(EnvironmentInfo)

    @cached_property
    def requests(self) -> RequestsInfo:
        return self._document(RequestsInfo)

    @property
    def num_requests(self) -> int:
        return len(self.requests.requests)

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.manifest.tensor_names

    # -- where a request's rows are ------------------------------------------------------
    def _part(self, array: str, request: int) -> Part | None:
        """Where ``request``'s rows of the data array ``array`` (an array path of
        :mod:`~ptrace.bundle_spec.layout`) are stored, or None if the bundle has no such array.

        Version 2 stores them as segments of one array over all requests; version 1 as a
        request's own array, which is then that request's one segment, checksummed by the
        manifest."""
        if self.spec_version == 1:
            path = self.stored_path(array, request)
            record = self.manifest.arrays.get(path)
            return None if record is None else (path, [(0, record.shape[0], record.crc32c)])
        if array not in self.manifest.arrays:
            return None
        segments = self._segments(array).get(request, [])
        if not segments and array.removeprefix("requests/") in layout.OPTIONAL_REQUEST_ARRAYS:
            return None  # an optional array that this request does not have (SPEC.md section 2)
        return array, segments

    def stored_path(self, array: str, request: int) -> str:
        """The stored array that holds ``request``'s part of ``array`` (for messages and checks)."""
        return layout.v1_array(array, request) if self.spec_version == 1 else array

    def _segments(self, array: str) -> dict[int, list[tuple[int, int, int]]]:
        """The segment table of ``array`` (SPEC.md section 2) by request, checked: segments
        tile the array in order and name requests of ``meta/requests``, or the bundle is corrupt."""
        found = self._segment_tables.get(array)
        if found is not None:
            return found
        self._node_or_missing(array)  # its declared size is weighed first
        path = segment_table(array)
        if path not in self.manifest.arrays:
            raise self._corrupt(array, f"has no segment table {path}")
        table = self._checked_rows(path, 0, self.manifest.arrays[path].shape[0], self.manifest.arrays[path].crc32c)
        try:
            found = segments_by_request(table, self.manifest.arrays[array].shape[0], self.num_requests)
        except SegmentTableError as exc:
            raise self._corrupt(path, str(exc)) from None
        self._segment_tables[array] = found
        return found

    def _rows_of(self, array: str, request: int) -> np.ndarray:
        """All of ``request``'s rows of ``array`` (corrupt if it is missing: callers ask for
        arrays that must be there)."""
        part = self._part(array, request)
        if part is None:
            raise self._corrupt(self.stored_path(array, request), "is missing")
        path, segments = part
        parts = [self._checked_rows(path, *segment) for segment in segments] or [self._checked_rows(path, 0, 0, 0)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _checked_rows(self, path: str, first: int, last: int, expected_crc: int) -> np.ndarray:
        """Rows ``first:last`` of the array at ``path`` (a copy, in its logical dtype), their
        CRC-32C checked against ``expected_crc`` (a segment's, or the manifest's for a whole array)."""
        blocks = [block.copy() for _, block in self._verified_range(path, first, last, expected_crc, last - first)]
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:
            node = self._node_or_missing(path)
            return dtypes.from_storage(np.zeros((0, *node.shape[1:]), node.dtype), node.logical_dtype)
        return np.concatenate(blocks)

    def _joined(self, path: str, ranges: list[tuple[int, int]], *, stored: bool = False) -> np.ndarray:
        """Rows ``first:last`` of the array at ``path`` for each range, one after another."""
        if len(ranges) == 1:
            return self._read(path, slice(*ranges[0]), stored=stored)
        if not ranges:
            return self._read(path, slice(0, 0), stored=stored)
        return np.concatenate([self._read(path, slice(first, last), stored=stored) for first, last in ranges])

    def part_shape(self, array: str, request: int) -> tuple[int, ...] | None:
        """The shape of ``request``'s part of ``array`` (its rows, then the row shape), None if
        the bundle has no such array."""
        part = self._part(array, request)
        if part is None:
            return None
        path, segments = part
        rows = sum(last - first for first, last, _ in segments)
        return (rows, *self.manifest.arrays[path].shape[1:])

    def array_dtype(self, array: str, request: int) -> str | None:
        """The logical dtype of ``array`` (as its manifest entry says), None if absent."""
        part = self._part(array, request)
        return None if part is None else self.manifest.arrays[part[0]].dtype

    # -- per request data --------------------------------------------------------------------
    def prompt_ids(self, request: int) -> np.ndarray:
        return self._rows_of(request_array("prompt_ids"), request)

    def output_ids(self, request: int) -> np.ndarray:
        return self._rows_of(request_array("output_ids"), request)

    def topk(self, request: int) -> tuple[np.ndarray, np.ndarray]:
        """Per decode step, the top-k token ids and their logprobs: two ``[N, k]`` arrays."""
        return (self._rows_of(request_array("topk_ids"), request),
                self._rows_of(request_array("topk_logprobs"), request))

    def positions(self, request: int) -> np.ndarray:
        """The captured positions: strictly increasing (SPEC.md section 6), else the bundle is corrupt."""
        positions = self._rows_of(request_array("positions"), request)
        if positions.ndim != 1 or positions.dtype != np.int64 or (positions.size and positions[0] < 0) \
                or np.any(np.diff(positions) <= 0):
            raise self._corrupt(self.stored_path(request_array("positions"), request), f"is not a strictly increasing list of non-negative int64 positions "
                                      f"(request {request})")
        return positions

    def tensor_positions(self, request: int, name: str) -> np.ndarray:
        """The positions of the rows of tensor ``name``: the captured positions, or for the logits
        of a capture without prompt logprobs those from the last prompt position on (SPEC.md 6)."""
        shape = self.part_shape(stats_array(name), request)
        if shape is None:
            raise BundleError(self._missing_tensor_message(request, name), hint=f"capture with --tensors '{name}'")
        positions = self.positions(request)
        found = tensor_positions(name, positions, self.requests.requests[request].prompt_len, shape[0])
        if found is None:
            raise self._corrupt(stats_array(name), f"has {shape[0]} rows of request {request}, "
                                                   f"its positions {positions.size}")
        return found

    def input_ids(self, request: int) -> np.ndarray | None:
        """Tokens fed at every position, where they differ from prompt + outputs (teacher forcing)."""
        array = request_array("input_ids")
        return None if self._part(array, request) is None else self._rows_of(array, request)

    def whatif_info(self) -> dict[str, Any] | None:
        """``meta/whatif`` if this run was perturbed on purpose (SPEC.md section 3.7)."""
        return self._read_document(WhatIfInfo).to_dict() if self._has_node(WhatIfInfo.path) else None

    def settings_info(self) -> SettingsInfo | None:
        """``meta/settings``: the arithmetic settings the engine used (SPEC.md section 3.8), if recorded."""
        return self._read_document(SettingsInfo) if self._has_node(SettingsInfo.path) else None
    def schedule_info(self) -> dict[str, Any] | None:
        """``meta/schedule`` if a batched engine recorded its steps (SPEC.md section 3.9)."""
        return self._read_document(ScheduleInfo).to_dict() if self._has_node(ScheduleInfo.path) else None

    def parallel_info(self) -> ParallelInfo | None:
        """``meta/parallel`` if the run was split over several ranks (SPEC.md section 3.10)."""
        return self._read_document(ParallelInfo) if self._has_node(ParallelInfo.path) else None

    def replay_info(self) -> dict[str, Any] | None:
        """``meta/replay`` if this bundle is a replay of another one (SPEC.md section 3.6)."""
        return self._read_document(ReplayInfo).to_dict() if self._has_node(ReplayInfo.path) else None

    def has_tensor(self, request: int, name: str) -> bool:
        return self._part(tensor_array(name), request) is not None

    def _tensor_part(self, request: int, name: str) -> Part:
        part = self._part(tensor_array(name), request)
        if part is None:
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --mode full --tensors '{name}'")
        return part

    def tensor(self, request: int, name: str) -> np.ndarray:
        """The full tensor ``[rows, ...]`` in its captured dtype (needs a ``--mode full`` capture)."""
        self._tensor_part(request, name)
        return self._rows_of(tensor_array(name), request)

    def tensor_row_shape(self, request: int, name: str) -> tuple[int, ...]:
        """The shape of one row of a full tensor."""
        return tuple(self.manifest.arrays[self._tensor_part(request, name)[0]].shape[1:])

    def stats(self, request: int, name: str) -> np.ndarray:
        """Per-row statistics ``[rows, 7]`` (columns: ``bundle_spec.stats.COLUMNS``)."""
        if self._part(stats_array(name), request) is None:
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --tensors '{name}'")
        return self._rows_of(stats_array(name), request)

    def stats_by_request(self, name: str) -> dict[int, np.ndarray]:
        """Every request's :meth:`stats` of tensor ``name``, by request: one read of the array
        (spec version 2) instead of one per request."""
        if self.spec_version == 1 or stats_array(name) not in self.manifest.arrays:
            return {r: self.stats(r, name) for r in range(self.num_requests)}
        record = self.manifest.arrays[stats_array(name)]
        whole = self._checked_rows(stats_array(name), 0, record.shape[0], record.crc32c)
        segments = self._segments(stats_array(name))
        empty = whole[:0]
        return {r: empty if not segments.get(r) else
                np.concatenate([whole[first:last] for first, last, _ in segments[r]])
                for r in range(self.num_requests)}

    def tensor_rows(self, request: int, name: str, start: int, stop: int, *, stored: bool = False) -> np.ndarray:
        """Rows ``start:stop`` of a request's full tensor (reads only the chunks they live in).
        ``stored``: in the storage dtype (bfloat16 and float8 as their bits, which
        :func:`~ptrace.bundle_spec.dtypes.to_float` decodes without importing ml_dtypes)."""
        path, segments = self._tensor_part(request, name)
        ranges, offset = [], 0
        for first, last, _ in segments:
            low, high = max(start, offset), min(stop, offset + last - first)
            if low < high:
                ranges.append((first + low - offset, first + high - offset))
            offset += last - first
        return self._joined(path, ranges, stored=stored)

    def tensor_blocks(self, request: int, name: str, rows: int, *,
                      stored: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """A request's full tensor in blocks of about ``rows`` rows, ``(first row, block)``, each
        segment's CRC-32C checked after its last block (see :meth:`verified_blocks`).
        ``stored``: in the storage dtype, as :meth:`tensor_rows`."""
        path, segments = self._tensor_part(request, name)
        offset = 0
        for first, last, crc in segments:
            for start, block in self._verified_range(path, first, last, crc, rows, stored=stored):
                yield offset + start - first, block
            offset += last - first

    def verified_blocks(self, path: str, rows: int, *, stored: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """The whole array at ``path`` in blocks of about ``rows`` rows, ``(first row, block)``,
        its whole-content CRC-32C checked against the manifest after the last block (``stored``:
        in the storage dtype, as :meth:`tensor_rows`)."""
        record = self.manifest.arrays.get(path)
        if record is None:
            raise self._corrupt(path, "is not in the manifest")
        return self._verified_range(path, 0, record.shape[0], record.crc32c, rows, stored=stored)

    def _node_or_missing(self, path: str) -> ArrayMeta:
        try:
            return self._node(path)
        except KeyError:
            raise self._corrupt(path, "is missing") from None

    def _verified_range(self, path: str, first: int, last: int, expected_crc: int, rows: int, *,
                        stored: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Rows ``first:last`` of the array at ``path`` in blocks of about ``rows`` rows, ``(first
        row, block)``, their CRC-32C checked against ``expected_crc`` after the last block: a chunk
        that is missing (it would read as zeros) or swapped with another (each passes its own
        checksum) is an error, never data.

        Arrays that ptrace wrote are read chunk by chunk (:mod:`~ptrace.bundle_spec.chunks`),
        in blocks of whole chunks decoded into one buffer that every block reuses: a block is
        valid until the next one is asked for, so copy what must outlive it."""
        node = self._node_or_missing(path)
        record = self.manifest.arrays[path]
        if tuple(node.shape) != tuple(record.shape):
            raise self._corrupt(path, f"has shape {list(node.shape)}, the manifest says {list(record.shape)}")
        blocks = self._chunk_blocks(path, node, first, last, rows) if node.direct \
            else self._sliced_blocks(path, first, last, rows)
        crc, logical = 0, node.logical_dtype
        for start, block in blocks:
            crc = google_crc32c.extend(crc, np.ascontiguousarray(block).reshape(-1).view(np.uint8))
            yield start, block if stored else dtypes.from_storage(block, logical)
        if crc != expected_crc:
            where = "" if (first, last) == (0, record.shape[0]) else f" rows {first}:{last}"
            raise BundleCorruptError(f"{self.path}: array {path}{where}: content checksum {crc:#010x} != "
                                     f"{expected_crc:#010x} recorded (a chunk is missing or was replaced)",
                                     hint="the bundle was damaged or tampered with: get a fresh copy")

    def _sliced_blocks(self, path: str, first: int, last: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Blocks of ``rows`` rows read through Zarr (in storage dtype)."""
        for start in range(first, last, max(1, rows)):
            yield start, dtypes.to_storage(self._read(path, slice(start, min(start + rows, last))))

    def _chunk_blocks(self, path: str, node: ArrayMeta, first: int, last: int, rows: int,
                      keep: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Blocks of as many whole chunks as fit in ``rows`` rows (at least one), decoded into
        one reused buffer (in storage dtype), cut to rows ``first:last``.

        Short requests share chunks: the chunk where a range ends, if more rows follow in it, is
        kept (decoded, verified; one slot, set unless not to ``keep``), so that reading the
        requests in order decodes each chunk once, not once per request. The kept chunk is the
        last block's own buffer (never written again), and a block that is just that chunk is
        served from it: no copy either way. Threads may share a bundle: the slot is read once."""
        reader = ChunkReader(self._store, path, node)
        chunk_rows = node.chunks[0]
        per_block = max(1, rows // chunk_rows)
        buffer: np.ndarray | None = None
        stop_chunk = -(-last // chunk_rows)
        for block_chunk in range(first // chunk_rows, stop_chunk, per_block):
            taken = min(per_block, stop_chunk - block_chunk)
            kept_path, kept_index, kept = self._kept_chunk
            if taken == 1 and (kept_path, kept_index) == (path, block_chunk):
                block = kept
            else:
                if buffer is None:
                    buffer = np.empty((per_block * chunk_rows, *node.chunks[1:]), node.dtype)
                block = buffer
                self._decode(path, reader, block_chunk, taken, block.reshape(per_block, -1).view(np.uint8))
            start = block_chunk * chunk_rows
            low, high = max(first, start), min(last, start + taken * chunk_rows)
            if keep and high == last and last % chunk_rows and last < node.shape[0]:
                # the last block: its buffer is not reused, so the chunk is kept as is
                self._kept_chunk = (path, block_chunk + taken - 1, block[(taken - 1) * chunk_rows:taken * chunk_rows])
            yield low, block[low - start:high - start]

    def _decode(self, path: str, reader: ChunkReader, first_chunk: int, count: int, out: np.ndarray) -> None:
        """Decode ``count`` chunks from ``first_chunk`` on into the rows of ``out`` (the kept
        chunk copied, not decoded again)."""
        kept_path, kept_index, kept = self._kept_chunk
        for offset in range(count):
            if (kept_path, kept_index) == (path, first_chunk + offset):
                out[offset] = kept.reshape(-1).view(np.uint8)
                continue
            try:
                reader.read(first_chunk + offset, out[offset])
            except ChunkError as exc:  # a checksum, a header, a truncated chunk: all corruption
                raise self._corrupt(path, f"is corrupted (chunk {reader.key(first_chunk + offset)} {exc})") from None

    def _missing_tensor_message(self, request: int, name: str) -> str:
        return f"{self.path}: request {request} has no tensor {name!r} (captured: " \
               f"{', '.join(self.tensor_names) or 'none'}; mode {self.mode})"

    # -- housekeeping ------------------------------------------------------------------------
    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkReader:
    """The chunks of one array that ptrace decodes itself (``meta.direct``), the ``index``-th
    along its first axis at a time, read into one buffer as large as its codecs make a chunk."""

    def __init__(self, store: BundleStore, path: str, meta: ArrayMeta) -> None:
        self._store = store
        self._meta = meta
        self._prefix = f"{path}/"
        self._stored = np.empty(chunks.stored_limit(meta), np.uint8)

    def key(self, index: int) -> str:
        return self._prefix + self._meta.chunk_key(index)

    def read(self, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` into ``out`` (``chunk_bytes`` contiguous uint8). A chunk that is
        not stored reads as the fill value (the bundle reader bounds how many may be absent)."""
        stored = self._store.read_stored(self.key(index), self._stored)
        if stored is None:
            out.view(self._meta.dtype)[...] = self._meta.fill_value
        else:
            chunks.decode(self._meta, stored, out)
