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

Nothing is written through Zarr's store or codec pipeline (an event loop, thread hops, and the
array's metadata rewritten at every append: most of what writing cost a stats-mode capture).
Chunks are encoded by :class:`~ptrace.bundle_spec.chunks.ChunkWriter`, and each array's
``zarr.json`` is Zarr's own metadata object, written once at commit with the array's final shape
(not at every append); the files are byte for byte those Zarr's ``append`` would have left
(tests/bundle_spec/test_writer_bytes.py).
"""

from __future__ import annotations

import datetime as _dt
import functools
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import msgpack
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.dtype import parse_dtype

from ptrace.bundle_spec import dtypes, layout
from ptrace.bundle_spec.chunks import ChunkWriter
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


def _compressors() -> list:
    # blosc+lz4 with byte shuffle: the fastest codec measured (float activations shrink little
    # whatever the codec, but token ids and positions shrink several times, and the zero padding
    # of a last partial chunk is free). CRC-32C comes last so it checks the stored bytes.
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...], codecs: list,
                    attributes: dict | None = None) -> ArrayV3Metadata:
    """What Zarr's ``create_array`` declares for these arguments: a regular chunk grid, the default
    chunk key encoding, fill value 0 (the codecs fitted to the dtype, as Zarr does)."""
    return ArrayV3Metadata(
        shape=shape, data_type=_zarr_dtype(dtype),
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": chunks}},
        chunk_key_encoding={"name": "default", "separator": "/"}, fill_value=0, codecs=codecs,
        attributes=attributes, dimension_names=None,
    )


#: Zarr's data type for a numpy dtype: looked up in Zarr's registry of data types, by trying each.
_zarr_dtype = functools.cache(functools.partial(parse_dtype, zarr_format=3))


def _metadata_bytes(metadata: ArrayV3Metadata | GroupMetadata) -> bytes:
    return metadata.to_buffer_dict(default_buffer_prototype())[_ZARR_JSON].to_bytes()


@dataclass
class _Stream:
    """An array being written row block by row block; ``rows`` counts the rows received, the last
    ``pending_rows`` of which are held back until their chunk is whole (or memory is short)."""

    metadata: ArrayV3Metadata  # as created: its shape is that of no rows
    chunks: ChunkWriter
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
        return tuple(self.metadata.shape[1:])

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
            _metadata_bytes(GroupMetadata(attributes={ROOT_ATTRIBUTE: {"spec_version": SPEC_VERSION}})))
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
        self._write_msgpack(document.path, document.to_dict())

    def _write_msgpack(self, path: str, data: dict) -> None:
        payload = np.frombuffer(msgpack.packb(data, use_bin_type=True), dtype=np.uint8)
        metadata = _array_metadata(payload.shape, payload.dtype, payload.shape, [BytesCodec(), Crc32cCodec()])
        ChunkWriter(self.staging / path, metadata).write(0, payload)
        self._write_metadata(path, metadata)

    def _write_metadata(self, path: str, metadata: ArrayV3Metadata) -> None:
        """Write an array's zarr.json, and that of each group above it not written yet (empty
        groups, as Zarr creates them for an array's path)."""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            group = "/".join(parts[:depth])
            if group not in self._groups:
                (self.staging / group).mkdir(parents=True, exist_ok=True)
                (self.staging / group / _ZARR_JSON).write_bytes(_metadata_bytes(GroupMetadata()))
                self._groups.add(group)
        (self.staging / path).mkdir(parents=True, exist_ok=True)
        (self.staging / path / _ZARR_JSON).write_bytes(_metadata_bytes(metadata))

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
        metadata = _array_metadata(
            (0, *row_shape), dtypes.storage_dtype(logical), (chunk_rows, *row_shape),
            [BytesCodec(endian="little"), *_compressors()], attributes={"ptrace": {"dtype": logical}},
        )
        (self.staging / path).mkdir(parents=True)  # its zarr.json, with its shape, comes at commit
        return _Stream(metadata=metadata, chunks=ChunkWriter(self.staging / path, metadata), logical=logical,
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
            self._write_metadata(path, stream.metadata.update_shape(stream.shape))
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
