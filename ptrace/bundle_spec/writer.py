"""Writing a bundle: staged in ``OUT.partial``, made visible by one rename at ``commit``.

Every kind of per-request data is one array over all requests (SPEC.md section 2), so the
number of arrays and files does not grow with the number of requests. Rows arrive a few at a
time and, in a batched engine, for every request at once: they are **staged** per request and
appended to the array a request at a time, each append one segment of the array's segment
table; consecutive appends of one request merge into one segment. What is held back, staged
rows and the partial last chunk of every array together, is bounded (``PENDING_BYTES``): past
it, the arrays staging the most are appended, then partial chunks are written out (the next rows
rewrite them whole). Whole-content CRC-32Cs are extended as rows are appended. A writer that is
killed leaves only ``OUT.partial``, which has no manifest and so never reads as a complete bundle.

Nothing is written through Zarr (its event loop, thread hops, and the array's metadata rewritten
at every append were most of what writing cost a stats-mode capture; and Zarr is not a core
dependency). Chunks are encoded by :func:`~ptrace.bundle_spec.chunks.encode`, and each array's
``zarr.json`` by :meth:`~ptrace.bundle_spec.arrays.ArrayMeta.to_json`, written once at commit
with the array's final shape (not at every append); the files are byte for byte those Zarr's
``append`` would have left (tests/bundle_spec/test_writer_bytes.py).
"""

from __future__ import annotations

import datetime as _dt
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np

from ptrace.bundle_spec import chunks, dtypes, layout
from ptrace.bundle_spec.arrays import ArrayMeta, Blosc, GroupMeta
from ptrace.bundle_spec.schema import (
    ROOT_ATTRIBUTE,
    SPEC_VERSION,
    ArrayRecord,
    Document,
    Manifest,
)
from ptrace.bundle_spec.store import claim_output, replace_path
from ptrace.errors import BundleError

#: Target size of one chunk. Big enough to amortise per-chunk overhead, small enough that a
#: reader streams tensors in bounded memory.
CHUNK_BYTES = 4 << 20
#: Rows per chunk at most: small-row arrays (stats: 56 bytes a row) get chunks of 448 KiB, cheap
#: to rewrite when a partial one is written out under the memory bound, and cheap to decode for
#: the few rows of one short request.
MAX_CHUNK_ROWS = 8192
#: Bytes of rows held back, all arrays together, before some are appended. A batched engine
#: adds a row of every request to every array at every step, so an unbounded writer holds
#: requests x tensors x positions rows until the end (670 MB of stats for 100 requests x 30
#: tensors x 4000 positions). The larger this is, the fewer segments a request's rows make.
PENDING_BYTES = 64 << 20
#: What holding one staged block costs beyond its rows (the numpy array object and its list
#: slot), counted against ``PENDING_BYTES``: a decode step stages one row per request and
#: tensor, so a long batched decode holds millions of small blocks.
_BLOCK_OVERHEAD = 128
#: Zarr's name for an array's or a group's metadata document.
_ZARR_JSON = "zarr.json"


def _chunk_rows(row_bytes: int) -> int:
    return int(max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(row_bytes, 1))))


def _blosc(dtype: np.dtype) -> Blosc:
    # blosc+lz4 with byte shuffle: the fastest codec measured (float activations shrink little
    # whatever the codec, but token ids and positions shrink several times, and the zero padding
    # of a last partial chunk is free). CRC-32C comes after it, so it checks the stored bytes.
    return Blosc(cname="lz4", clevel=5, shuffle="shuffle", typesize=dtype.itemsize)


def _array_meta(shape: tuple[int, ...], dtype: np.dtype, chunk_shape: tuple[int, ...], *, compressed: bool,
                attributes: dict | None = None) -> ArrayMeta:
    """An array as ptrace writes it: a regular chunk grid, the default chunk key encoding, fill
    value 0, the codecs bytes (little endian) -> blosc (if ``compressed``) -> crc32c."""
    return ArrayMeta(tuple(shape), tuple(chunk_shape), dtype, dtype.type(0).item(), attributes or {},
                     _blosc(dtype) if compressed else None)


class _ChunkFiles:
    """Stores the chunks of one array under its directory, the ``index``-th along its first axis
    at a time (:func:`~ptrace.bundle_spec.chunks.encode`). Every chunk written is stored,
    all-zero ones included (what Zarr's ``write_empty_chunks`` does): a chunk that is not stored
    reads as the fill value, indistinguishable from a deleted one, and readers bound how many
    may be absent.

    Files are written in place, not through a temporary file as Zarr's store does: the writer
    stages the whole bundle, which a rename makes visible only when it is complete.
    """

    def __init__(self, directory: Path, meta: ArrayMeta) -> None:
        self._directory = directory
        self._meta = meta
        self._made: Path | None = None  # the directory of the last chunk written

    def write(self, index: int, rows: np.ndarray) -> None:
        """Store chunk ``index``, made of ``rows`` (in the array's dtype, at most a chunk's)."""
        path = self._directory / self._meta.chunk_key(index)
        if path.parent != self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made = path.parent
        path.write_bytes(chunks.encode(self._meta, rows))

    def read(self, index: int, rows: int) -> np.ndarray:
        """The first ``rows`` rows of the stored chunk ``index``: a partial chunk written out
        earlier, which the rows that follow are about to complete (decoded as any reader does)."""
        chunk = np.empty(self._meta.chunks, self._meta.dtype)
        stored = np.fromfile(self._directory / self._meta.chunk_key(index), np.uint8)
        try:
            chunks.decode(self._meta, stored, chunk.reshape(-1).view(np.uint8))
        except chunks.ChunkError as exc:
            raise BundleError(f"{self._directory}: the chunk written earlier no longer reads back ({exc})") from None
        return chunk[:rows]


@dataclass
class _Stream:
    """An array being written row block by row block; ``rows`` counts the rows received, the last
    ``pending_rows`` of which are held back until their chunk is whole (or memory is short)."""

    meta: ArrayMeta  # as created: its shape is that of no rows
    chunks: _ChunkFiles
    logical: str
    chunk_rows: int
    row_bytes: int
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    crc: int = 0
    rows: int = 0

    @property
    def pending_bytes(self) -> int:
        return self.pending_rows * self.row_bytes

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.meta.shape[1:])

    @property
    def _written(self) -> int:
        return self.rows - self.pending_rows

    def add(self, block: np.ndarray) -> None:
        """Append rows (C-contiguous, in the storage dtype), writing every chunk they complete."""
        self.crc = google_crc32c.extend(self.crc, block.reshape(-1).view(np.uint8))
        self.rows += block.shape[0]
        self.pending.append(block)
        self.pending_rows += block.shape[0]
        if self.rows // self.chunk_rows > self._written // self.chunk_rows:  # a chunk became whole
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        """Write the held rows: all of them, or those up to the last chunk boundary.

        Rows that go on a partial last chunk (written out earlier under the memory bound) are
        written with the rows it holds, read back, as Zarr's ``append`` rewrites it: the chunk
        grid stays regular, every chunk stored.
        """
        if not self.pending_rows:
            return
        data = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        cut = (self.rows // self.chunk_rows) * self.chunk_rows - self._written if whole_chunks_only \
            else data.shape[0]
        first, held = divmod(self._written, self.chunk_rows)
        rows = data[:cut] if not held else np.concatenate([self.chunks.read(first, held), data[:cut]])
        for index, start in enumerate(range(0, rows.shape[0], self.chunk_rows), first):
            self.chunks.write(index, rows[start:start + self.chunk_rows])
        rest = data[cut:].copy()  # a copy: the view would keep the whole of ``data`` alive
        self.pending = [rest] if rest.shape[0] else []
        self.pending_rows = rest.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    def record(self) -> ArrayRecord:
        return ArrayRecord(shape=self.shape, dtype=self.logical, crc32c=self.crc)


class BundleWriter:
    """Builds one bundle. Use as a context manager: an exception aborts and removes the staging.

    ``append(array, request, rows)`` adds a request's rows to a data array (an array path of
    :mod:`~ptrace.bundle_spec.layout`): in any order across requests, in row order within one.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        claim_output(self.path, overwrite)
        self.staging = self.path.with_name(self.path.name + ".partial")
        if self.staging.exists():  # left by an earlier killed run of the same output
            shutil.rmtree(self.staging)
        self.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.bundle_id = uuid.uuid4().hex
        self.staging.mkdir(parents=True)
        (self.staging / _ZARR_JSON).write_bytes(
            GroupMeta({ROOT_ATTRIBUTE: {"spec_version": SPEC_VERSION}}).to_json())
        self._groups = {""}  # the groups whose zarr.json is written
        self._streams: dict[str, _Stream] = {}
        #: array -> request -> rows staged (storage dtype), and the bytes staged per array
        self._staged: dict[str, dict[int, list[np.ndarray]]] = {}
        self._staged_bytes: dict[str, int] = {}
        #: array -> its segment table so far: [request, start, stop, crc32c] rows
        self._segments: dict[str, list[list[int]]] = {}
        self._held = 0  # staged bytes and partial chunks, all arrays together

    # -- documents ---------------------------------------------------------------------------
    def write_document(self, document: Document) -> None:
        payload = np.frombuffer(document.to_bytes(), dtype=np.uint8)
        meta = _array_meta(payload.shape, payload.dtype, payload.shape, compressed=False)
        _ChunkFiles(self.staging / document.path, meta).write(0, payload)
        self._write_metadata(document.path, meta)

    def _write_metadata(self, path: str, meta: ArrayMeta) -> None:
        """Write an array's zarr.json, and that of each group above it not written yet (empty
        groups, as Zarr creates them for an array's path)."""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            group = "/".join(parts[:depth])
            if group not in self._groups:
                (self.staging / group).mkdir(parents=True, exist_ok=True)
                (self.staging / group / _ZARR_JSON).write_bytes(GroupMeta().to_json())
                self._groups.add(group)
        (self.staging / path).mkdir(parents=True, exist_ok=True)
        (self.staging / path / _ZARR_JSON).write_bytes(meta.to_json())

    # -- arrays ------------------------------------------------------------------------------
    def append(self, array: str, request: int, rows: np.ndarray) -> None:
        """Add ``rows`` (first axis) of ``request`` to the data array ``array``, creating it on
        first use: its logical dtype and row shape are those of the first rows."""
        stream = self._streams.get(array)
        if stream is None:
            stream = self._streams[array] = self._create_stream(array, rows)
            self._staged[array], self._staged_bytes[array], self._segments[array] = {}, 0, []
        elif rows.shape[1:] != stream.row_shape or dtypes.logical_name(rows.dtype) != stream.logical:
            raise BundleError(f"{self.path}: {array} gets {dtypes.logical_name(rows.dtype)} rows of shape "
                              f"{rows.shape[1:]} after {stream.logical} rows of {stream.row_shape}")
        if not rows.shape[0]:
            return
        block = np.ascontiguousarray(dtypes.to_storage(rows))
        if not block.flags.owndata:  # a view would keep the caller's whole buffer alive, unaccounted
            block = block.copy()
        self._staged[array].setdefault(request, []).append(block)
        self._staged_bytes[array] += block.nbytes + _BLOCK_OVERHEAD
        self._held += block.nbytes + _BLOCK_OVERHEAD
        if self._held > PENDING_BYTES:
            self._relieve()

    def _relieve(self) -> None:
        """Append the arrays staging the most, then write out the largest partial chunks, until
        half the bound is held: down to half, so that this runs in batches rather than at every
        row, and whole arrays at a time, so that each batch makes one segment per request."""
        for array in sorted(self._staged_bytes, key=self._staged_bytes.__getitem__, reverse=True):
            if self._held <= PENDING_BYTES // 2 or not self._staged_bytes[array]:
                break
            self._append_staged(array)
        for stream in sorted(self._streams.values(), key=lambda s: s.pending_bytes, reverse=True):
            if self._held <= PENDING_BYTES // 2:
                break
            self._held -= stream.pending_bytes
            stream.flush()

    def _append_staged(self, array: str) -> None:
        """Append what ``array`` stages, request by request: one segment each (or the growth of
        the request's last segment, when it ends the array)."""
        stream, segments = self._streams[array], self._segments[array]
        self._held -= self._staged_bytes[array] + stream.pending_bytes
        for request, blocks in sorted(self._staged[array].items()):
            data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
            crc_start = segments[-1][3] if segments and segments[-1][0] == request else None
            crc = google_crc32c.extend(crc_start or 0, data.reshape(-1).view(np.uint8))
            if crc_start is None:
                segments.append([request, stream.rows, stream.rows + data.shape[0], crc])
            else:
                segments[-1][2:] = [stream.rows + data.shape[0], crc]
            stream.add(data)
        self._staged[array], self._staged_bytes[array] = {}, 0
        self._held += stream.pending_bytes

    def _create_stream(self, path: str, rows: np.ndarray) -> _Stream:
        logical = dtypes.logical_name(rows.dtype)
        row_shape = tuple(rows.shape[1:])
        row_bytes = rows.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        chunk_rows = _chunk_rows(row_bytes)
        meta = _array_meta((0, *row_shape), dtypes.storage_dtype(logical), (chunk_rows, *row_shape),
                           compressed=True, attributes={"ptrace": {"dtype": logical}})
        (self.staging / path).mkdir(parents=True)  # its zarr.json, with its shape, comes at commit
        return _Stream(meta=meta, chunks=_ChunkFiles(self.staging / path, meta), logical=logical,
                       chunk_rows=chunk_rows, row_bytes=row_bytes)

    # -- finishing ---------------------------------------------------------------------------
    def commit(self, *, ptrace_version: str, command: list[str], mode: str,
               tensor_names: list[str]) -> Path:
        """Flush everything, write the manifest last, and move the bundle into place."""
        for array in list(self._streams):
            self._append_staged(array)
            self._streams[array].flush()
            table = np.array(self._segments[array], dtype=np.int64).reshape(-1, len(layout.SEGMENT_COLUMNS))
            tables = self._streams[layout.segment_table(array)] = self._create_stream(layout.segment_table(array), table)
            tables.add(table)
            tables.flush()
        for path, stream in self._streams.items():
            self._write_metadata(path, stream.meta.with_shape(stream.shape))
        self._held = 0
        manifest = Manifest(
            spec_version=SPEC_VERSION, ptrace_version=ptrace_version, bundle_id=self.bundle_id,
            created=self.created, command=tuple(command), complete=True, mode=mode,
            tensor_names=tuple(tensor_names),
            arrays={path: s.record() for path, s in sorted(self._streams.items())},
        )
        self.write_document(manifest)
        replace_path(self.staging, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
