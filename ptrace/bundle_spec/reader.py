"""Reading bundles, defensively: they travel with bug reports and are opened by strangers.

``open_bundle`` checks, before anything else is trusted: that the path is a ptrace bundle, that
its spec version is one this code reads, and that its writer finished (SPEC.md section 7).
Every array is checked when first opened against the spec's codecs and dtypes and against
limits derived from what is actually stored (SPEC.md section 8), so a declaration cannot make a
reader allocate or iterate without bound; every metadata document is bounded in size and depth
and typed strictly. Everything read afterwards is checksummed chunk by chunk by Zarr's
``crc32c`` codec; ``validate_bundle`` additionally re-computes every array's whole-content CRC-32C.
Whatever a bundle holds, a reader fails with a :class:`~ptrace.errors.BundleCorruptError` that
names the bundle and the node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c
import msgpack
import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.chunk_grids import RegularChunkGrid

from ptrace.bundle_spec import dtypes
from ptrace.bundle_spec.chunks import ChunkReader
from ptrace.bundle_spec.layout import request_array, stats_array, tensor_array
from ptrace.bundle_spec.names import tensor_positions
from ptrace.bundle_spec.schema import (
    ROOT_ATTRIBUTE,
    SPEC_VERSION,
    Document,
    EnvironmentInfo,
    Manifest,
    ModelInfo,
    ReplayInfo,
    RequestsInfo,
    RunInfo,
    WhatIfInfo,
)
from ptrace.bundle_spec.store import open_read_store
from ptrace.errors import (
    BundleCorruptError,
    BundleError,
    BundleIncompleteError,
    BundleVersionError,
    NotABundleError,
    PtraceError,
)

D = TypeVar("D", bound=Document)

#: The most one chunk may hold (logical bytes): what one chunk read allocates. ptrace writes
#: chunks of about 4 MiB (or one row, when a row is larger).
MAX_CHUNK_BYTES = 64 << 20
#: Chunks that are declared but not stored read as the fill value without costing a byte on
#: disk; a bundle may have a few (older writers skipped all-zero chunks), never more than this.
MAX_ABSENT_CHUNKS = 1024
MAX_ABSENT_BYTES = 256 << 20
#: The deepest nesting a metadata document may have (ptrace's own are about 5 deep).
MAX_METADATA_DEPTH = 64

_VALIDATE_HINT = "run `ptrace validate` on it for a full check"
#: What a metadata document may hold besides maps and lists.
_PLAIN = (str, bytes, int, float, bool, type(None))


def error_reason(exc: BaseException) -> str:
    """An exception as a short clause for an error line (library messages can be long)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 160 else text[:159] + "…"


def logical_dtype(node: zarr.Array) -> str:
    return node.attrs["ptrace"]["dtype"] if "ptrace" in node.attrs else np.dtype(node.dtype).name


def _array_problem(node: zarr.Array) -> str | None:
    """Why an array breaks SPEC.md section 4's rules for its metadata, or None."""
    if node.ndim < 1:
        return "has no axis"
    if not isinstance(node.metadata.chunk_grid, RegularChunkGrid):
        return "does not use a regular chunk grid"
    codecs = node.metadata.codecs
    if len(codecs) < 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[-1], Crc32cCodec) \
            or not all(isinstance(codec, BytesBytesCodec) for codec in codecs[1:]):
        return "does not use the codecs bytes -> compressors -> crc32c"
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return "is not little endian"
    attribute = node.attrs.get("ptrace", {"dtype": np.dtype(node.dtype).name})
    logical = attribute.get("dtype") if isinstance(attribute, dict) else None
    if not isinstance(logical, str) or not dtypes.is_logical(logical) \
            or dtypes.storage_dtype(logical) != np.dtype(node.dtype):
        return f"has dtype {np.dtype(node.dtype).name} tagged {logical!r}, not a logical dtype stored as such"
    chunk_bytes = math.prod(node.chunks) * np.dtype(node.dtype).itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        return f"declares chunks of {chunk_bytes} bytes (the most a reader accepts is {MAX_CHUNK_BYTES})"
    return None


def _unpack_document(payload: bytes) -> Any:
    """Decode one metadata document: plain msgpack values only, bounded in depth.

    The walk is iterative, so a document nested a thousand levels deep is refused here instead of
    exhausting Python's recursion in whatever reads it next.
    """
    def refuse_extension(code: int, data: bytes) -> Any:
        raise ValueError(f"msgpack extension type {code} is not allowed")

    data = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=refuse_extension)
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"nested more than {MAX_METADATA_DEPTH} levels deep")
        if isinstance(value, dict):
            pending.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            pending.extend((v, depth + 1) for v in value)
        elif not isinstance(value, _PLAIN):
            raise ValueError(f"msgpack value of type {type(value).__name__} is not allowed")
    return data


class Bundle:
    """A complete, readable bundle. Open with :func:`open_bundle`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._store = open_read_store(self.path)
        self._nodes: dict[str, zarr.Array] = {}
        self._absent_chunks = self._absent_bytes = 0
        try:
            self._root = zarr.open_group(self._store, mode="r", zarr_format=3)
        except PtraceError:
            raise
        except Exception as exc:  # any malformed root metadata: not something we can read
            raise NotABundleError(f"{self.path} is not a ptrace bundle "
                                  f"(no Zarr v3 group: {error_reason(exc)})") from None
        marker = self._root.attrs.get(ROOT_ATTRIBUTE)
        version = marker.get("spec_version") if isinstance(marker, dict) else None
        if type(version) is not int:
            raise NotABundleError(f"{self.path} is a Zarr store but not a ptrace bundle "
                                  f"(no integer {ROOT_ATTRIBUTE}.spec_version attribute)")
        self.spec_version: int = version
        if self.spec_version > SPEC_VERSION:
            raise BundleVersionError(
                f"{self.path} uses bundle spec version {self.spec_version}; this ptrace reads up to "
                f"version {SPEC_VERSION}", hint="upgrade ptrace: pip install -U ptrace")
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

    def _node(self, path: str) -> zarr.Array:
        """The array at ``path`` (KeyError if absent), checked once (opening reads metadata)."""
        node = self._nodes.get(path)
        if node is not None:
            return node
        if not self._has_node(path):
            raise KeyError(path)
        try:
            node = self._root[path]
        except PtraceError:
            raise
        except Exception as exc:
            raise self._corrupt(path, f"has malformed Zarr metadata ({error_reason(exc)})") from None
        if not isinstance(node, zarr.Array):
            raise self._corrupt(path, "is a group, expected an array")
        problem = _array_problem(node)
        if problem:
            raise self._corrupt(path, problem)
        self._count_absent_chunks(path, node)
        self._nodes[path] = node
        return node

    def _count_absent_chunks(self, path: str, node: zarr.Array) -> None:
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
        self._absent_bytes += absent * math.prod(node.chunks) * np.dtype(node.dtype).itemsize
        if self._absent_chunks > MAX_ABSENT_CHUNKS or self._absent_bytes > MAX_ABSENT_BYTES:
            raise self._corrupt(path, f"declares shape {list(node.shape)} in {node.nchunks} chunks but "
                                      f"stores {max(stored, 0)}: its declared size is corrupt")

    def _read(self, path: str, selection: Any = Ellipsis) -> np.ndarray:
        try:
            node = self._node(path)
        except KeyError:
            raise self._corrupt(path, "is missing") from None
        try:
            data = node[selection]
        except PtraceError:
            raise
        except Exception as exc:  # a checksum, a codec, a truncated chunk: all corruption
            raise self._corrupt(path, f"is corrupted ({error_reason(exc)})") from None
        return dtypes.from_storage(np.asarray(data), logical_dtype(node))

    def _read_document(self, kind: type[D]) -> D:
        if not self._has_node(kind.path):
            raise KeyError(kind.path)
        node = self._node(kind.path)
        if node.ndim != 1 or np.dtype(node.dtype) != np.uint8 or node.nchunks > 1:
            raise self._corrupt(kind.path, "is not a one-chunk uint8 array (a metadata document)")
        raw = self._read(kind.path)
        try:
            data = _unpack_document(raw.tobytes())
        except (ValueError, msgpack.UnpackException) as exc:
            raise self._corrupt(kind.path, f"is not a valid metadata document ({error_reason(exc)})") from None
        try:
            return kind.from_dict(data)
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

    # -- per request data --------------------------------------------------------------------
    def prompt_ids(self, request: int) -> np.ndarray:
        return self._read(request_array(request, "prompt_ids"))

    def output_ids(self, request: int) -> np.ndarray:
        return self._read(request_array(request, "output_ids"))

    def topk(self, request: int) -> tuple[np.ndarray, np.ndarray]:
        """Per decode step, the top-k token ids and their logprobs: two ``[N, k]`` arrays."""
        return (self._read(request_array(request, "topk_ids")),
                self._read(request_array(request, "topk_logprobs")))

    def positions(self, request: int) -> np.ndarray:
        """The captured positions: strictly increasing (SPEC.md section 6), else the bundle is corrupt."""
        path = request_array(request, "positions")
        positions = self._read(path)
        if positions.ndim != 1 or positions.dtype != np.int64 or (positions.size and positions[0] < 0) \
                or np.any(np.diff(positions) <= 0):
            raise self._corrupt(path, "is not a strictly increasing list of non-negative int64 positions")
        return positions

    def tensor_positions(self, request: int, name: str) -> np.ndarray:
        """The positions of the rows of tensor ``name``: the captured positions, or for the logits
        of a capture without prompt logprobs those from the last prompt position on (SPEC.md 6)."""
        path = stats_array(request, name)
        if path not in self.manifest.arrays:
            raise BundleError(self._missing_tensor_message(request, name), hint=f"capture with --tensors '{name}'")
        positions = self.positions(request)
        found = tensor_positions(name, positions, self.requests.requests[request].prompt_len,
                                 self.manifest.arrays[path].shape[0])
        if found is None:
            raise self._corrupt(path, f"has {self.manifest.arrays[path].shape[0]} rows, positions has {positions.size}")
        return found

    def input_ids(self, request: int) -> np.ndarray | None:
        """Tokens fed at every position, where they differ from prompt + outputs (teacher forcing)."""
        path = request_array(request, "input_ids")
        return self._read(path) if path in self.manifest.arrays else None

    def whatif_info(self) -> dict[str, Any] | None:
        """``meta/whatif`` if this run was perturbed on purpose (SPEC.md section 3.7)."""
        return self._read_document(WhatIfInfo).to_dict() if WhatIfInfo.path in self._root else None

    def replay_info(self) -> dict[str, Any] | None:
        """``meta/replay`` if this bundle is a replay of another one (SPEC.md section 3.6)."""
        return self._read_document(ReplayInfo).to_dict() if self._has_node(ReplayInfo.path) else None

    def has_tensor(self, request: int, name: str) -> bool:
        return tensor_array(request, name) in self.manifest.arrays

    def tensor(self, request: int, name: str) -> np.ndarray:
        """The full tensor ``[rows, ...]`` in its captured dtype (needs a ``--mode full`` capture)."""
        if not self.has_tensor(request, name):
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --mode full --tensors '{name}'")
        return self._read(tensor_array(request, name))

    def stats(self, request: int, name: str) -> np.ndarray:
        """Per-row statistics ``[rows, 7]`` (columns: ``bundle_spec.stats.COLUMNS``)."""
        path = stats_array(request, name)
        if path not in self.manifest.arrays:
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --tensors '{name}'")
        return self._read(path)

    def tensor_rows(self, request: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a full tensor (reads only the chunks they live in)."""
        if not self.has_tensor(request, name):
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --mode full --tensors '{name}'")
        return self._read(tensor_array(request, name), slice(start, stop))

    def verified_blocks(self, path: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """The whole array at ``path`` in blocks of about ``rows`` rows, ``(first row, block)``,
        its whole-content CRC-32C checked against the manifest after the last block: a chunk
        that is missing (it would read as zeros) or swapped with another (each passes its own
        checksum) is an error, never data.

        Arrays that ptrace wrote are read chunk by chunk (:mod:`~ptrace.bundle_spec.chunks`),
        in blocks of whole chunks decoded into one buffer that every block reuses: a block is
        valid until the next one is asked for, so copy what must outlive it."""
        record = self.manifest.arrays.get(path)
        if record is None:
            raise self._corrupt(path, "is not in the manifest")
        try:
            node = self._node(path)
        except KeyError:
            raise self._corrupt(path, "is missing") from None
        if tuple(node.shape) != tuple(record.shape):
            raise self._corrupt(path, f"has shape {list(node.shape)}, the manifest says {list(record.shape)}")
        reader = ChunkReader.of(self._store, node)
        blocks = self._sliced_blocks(path, rows) if reader is None else self._chunk_blocks(path, node, reader, rows)
        crc, logical = 0, logical_dtype(node)
        for start, block in blocks:
            crc = google_crc32c.extend(crc, np.ascontiguousarray(block).reshape(-1).view(np.uint8))
            yield start, dtypes.from_storage(block, logical)
        if crc != record.crc32c:
            raise BundleCorruptError(f"{self.path}: array {path}: content checksum {crc:#010x} != manifest "
                                     f"{record.crc32c:#010x} (a chunk is missing or was replaced)",
                                     hint="the bundle was damaged or tampered with: get a fresh copy")

    def _sliced_blocks(self, path: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Blocks of ``rows`` rows read through Zarr (in storage dtype)."""
        total = self._node(path).shape[0]
        for start in range(0, total, max(1, rows)):
            yield start, dtypes.to_storage(self._read(path, slice(start, min(start + rows, total))))

    def _chunk_blocks(self, path: str, node: zarr.Array, reader: ChunkReader,
                      rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Blocks of as many whole chunks as fit in ``rows`` rows (at least one), decoded into
        one reused buffer (in storage dtype)."""
        total, chunk_rows = node.shape[0], node.chunks[0]
        per_block = max(1, rows // chunk_rows)
        buffer = np.empty((per_block * chunk_rows, *node.chunks[1:]), node.dtype)
        chunks = buffer.reshape(per_block, -1).view(np.uint8)
        count = -(-total // chunk_rows)
        for first in range(0, count, per_block):
            taken = min(per_block, count - first)
            for offset in range(taken):
                try:
                    reader.read(first + offset, chunks[offset])
                except PtraceError:
                    raise
                except Exception as exc:  # a checksum, a header, a truncated chunk: all corruption
                    raise self._corrupt(path, f"is corrupted ({error_reason(exc)})") from None
            start = first * chunk_rows
            yield start, buffer[:min(taken * chunk_rows, total - start)]

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


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a complete bundle (directory or zip), or raise a :class:`~ptrace.errors.BundleError`."""
    return Bundle(path)
