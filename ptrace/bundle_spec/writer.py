"""Writing a bundle: staged in ``OUT.partial``, made visible by one rename at ``commit``.

Tensors arrive a few rows at a time (one per decode step), so arrays are streamed: rows are
buffered until a whole chunk is ready, and the whole-content CRC-32C is extended as rows
arrive. A batched engine feeds every request's arrays at once, so the rows held back, all arrays
together, are bounded (``PENDING_BYTES``): past it, the arrays holding the most are written out,
partial chunks included, and the next rows complete those chunks. A writer that is killed
leaves only ``OUT.partial``, which has no manifest and so never reads as a complete bundle.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import msgpack
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from ptrace.bundle_spec import dtypes
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
MAX_CHUNK_ROWS = 8192
#: Rows per chunk of a streamed array at most. A partial chunk written out under the memory bound
#: is rewritten whole (read, merged, encoded) when its next rows arrive, so small-row arrays
#: (stats: 56 bytes a row) get small chunks (56 KiB), which keeps that rewrite cheap, while a
#: 4K-position request still needs only a few chunk files per array.
STREAM_CHUNK_ROWS = 1024
#: Bytes of rows held back, all arrays together, before some are written out. A batched engine
#: appends a row to every request's arrays at every step (thousands of arrays), so an unbounded
#: writer holds requests x tensors x positions rows until the end (670 MB of stats for 100
#: requests x 30 tensors x 4000 positions). The larger this is, the larger each write-out and the
#: fewer partial chunks get rewritten.
PENDING_BYTES = 64 << 20


#: Store every chunk, all-zero ones included: a chunk that is not stored reads as the fill
#: value, indistinguishable from a deleted one, and readers bound how many may be absent.
_EVERY_CHUNK = {"write_empty_chunks": True}


def _chunk_rows(row_bytes: int, max_rows: int) -> int:
    return int(max(1, min(max_rows, CHUNK_BYTES // max(row_bytes, 1))))


def _compressors(compress: bool) -> list:
    # blosc+lz4 with byte shuffle: the fastest codec measured (float activations shrink little
    # whatever the codec, but compression makes the zero padding of a last partial chunk free).
    # CRC-32C comes last so it checks the stored bytes.
    if compress:
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    return [Crc32cCodec()]


@dataclass
class _Stream:
    """An array being written row block by row block; ``rows`` counts the rows received, the last
    ``pending_rows`` of which are held back until their chunk is whole (or memory is short)."""

    array: zarr.Array
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
    def _written(self) -> int:
        return self.rows - self.pending_rows

    def add(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(dtypes.to_storage(block))
        self.crc = google_crc32c.extend(self.crc, block.reshape(-1).view(np.uint8))
        if not block.flags.owndata:  # a view would keep the caller's whole buffer alive, unaccounted
            block = block.copy()
        self.rows += block.shape[0]
        self.pending.append(block)
        self.pending_rows += block.shape[0]
        if self.rows // self.chunk_rows > self._written // self.chunk_rows:  # a chunk became whole
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        """Append the held rows: all of them, or those up to the last chunk boundary.

        Appending into a partial last chunk (written out earlier under the memory bound) makes
        Zarr rewrite that chunk with the new rows: the chunk grid stays regular, every chunk stored.
        """
        if not self.pending_rows:
            return
        data = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        cut = (self.rows // self.chunk_rows) * self.chunk_rows - self._written if whole_chunks_only \
            else data.shape[0]
        self.array.append(data[:cut], axis=0)
        rest = data[cut:].copy()  # a copy: the view would keep the whole of ``data`` alive
        self.pending = [rest] if rest.shape[0] else []
        self.pending_rows = rest.shape[0]

    def record(self) -> ArrayRecord:
        return ArrayRecord(shape=tuple(self.array.shape), dtype=self.logical, crc32c=self.crc)


class BundleWriter:
    """Builds one bundle. Use as a context manager: an exception aborts and removes the staging."""

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        claim_output(self.path, overwrite)
        self.staging = self.path.with_name(self.path.name + ".partial")
        if self.staging.exists():  # left by an earlier killed run of the same output
            shutil.rmtree(self.staging)
        self.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.bundle_id = uuid.uuid4().hex
        self._root = zarr.open_group(
            LocalStore(self.staging), mode="w",
            attributes={ROOT_ATTRIBUTE: {"spec_version": SPEC_VERSION}},
        )
        self._streams: dict[str, _Stream] = {}
        self._pending_bytes = 0  # what the streams hold back, all together

    # -- documents ---------------------------------------------------------------------------
    def write_document(self, document: Document) -> None:
        self._write_msgpack(document.path, document.to_dict())

    def _write_msgpack(self, path: str, data: dict) -> None:
        payload = np.frombuffer(msgpack.packb(data, use_bin_type=True), dtype=np.uint8)
        array = self._root.create_array(
            path, shape=payload.shape, dtype=np.uint8, chunks=payload.shape,
            serializer=BytesCodec(), compressors=[Crc32cCodec()], fill_value=0, config=_EVERY_CHUNK,
        )
        array[...] = payload

    # -- arrays ------------------------------------------------------------------------------
    def write_array(self, path: str, data: np.ndarray, *, compress: bool = False) -> None:
        """Write a whole array at once (token ids, logprobs): one chunk of exactly its rows."""
        stream = self._streams[path] = self._create_stream(path, data, compress,
                                                           min(MAX_CHUNK_ROWS, max(1, data.shape[0])))
        stream.add(data)
        stream.flush()

    def append_rows(self, path: str, rows: np.ndarray, *, compress: bool = True) -> None:
        """Append rows (first axis) to the array at ``path``, creating it on first use."""
        stream = self._streams.get(path)
        if stream is None:
            stream = self._streams[path] = self._create_stream(path, rows, compress, STREAM_CHUNK_ROWS)
        elif rows.shape[1:] != stream.array.shape[1:]:
            raise BundleError(f"{self.path}: {path} gets rows of shape {rows.shape[1:]} after "
                              f"{stream.array.shape[1:]}")
        held = stream.pending_bytes
        stream.add(rows)
        self._pending_bytes += stream.pending_bytes - held
        if self._pending_bytes > PENDING_BYTES:
            self._write_out_largest()

    def _write_out_largest(self) -> None:
        """Write out the streams holding the most until half the bound is held.

        Largest first, because a write-out costs about the same whatever it holds (a partial chunk
        rewritten, metadata updated); down to half, so that write-outs come in batches rather than
        one at every appended row.
        """
        for stream in sorted(self._streams.values(), key=lambda s: s.pending_bytes, reverse=True):
            if self._pending_bytes <= PENDING_BYTES // 2:
                break
            self._pending_bytes -= stream.pending_bytes
            stream.flush()

    def _create_stream(self, path: str, rows: np.ndarray, compress: bool, max_rows: int) -> _Stream:
        logical = dtypes.logical_name(rows.dtype)
        row_shape = tuple(rows.shape[1:])
        row_bytes = rows.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        chunk_rows = _chunk_rows(row_bytes, max_rows)
        array = self._root.create_array(
            path, shape=(0, *row_shape), dtype=dtypes.storage_dtype(logical),
            chunks=(chunk_rows, *row_shape) if row_shape else (chunk_rows,),
            serializer=BytesCodec(endian="little"), compressors=_compressors(compress),
            fill_value=0, attributes={"ptrace": {"dtype": logical}}, config=_EVERY_CHUNK,
        )
        return _Stream(array=array, logical=logical, chunk_rows=chunk_rows, row_bytes=row_bytes)

    # -- finishing ---------------------------------------------------------------------------
    def commit(self, *, ptrace_version: str, command: list[str], mode: str,
               tensor_names: list[str]) -> Path:
        """Flush everything, write the manifest last, and move the bundle into place."""
        for stream in self._streams.values():
            stream.flush()
        self._pending_bytes = 0
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
