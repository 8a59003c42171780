"""Reading through Zarr the arrays that ptrace does not decode itself (the optional ``zarr`` extra).

ptrace reads the arrays it writes without Zarr (:mod:`~ptrace.bundle_spec.arrays`,
:mod:`~ptrace.bundle_spec.chunks`); an array whose metadata another writer chose within the
spec (another compressor, chunks that split rows) is opened by Zarr (:func:`open_array`), when
it is installed, through its public API only: a :class:`zarr.abc.store.Store` over the bundle's
own store, so that the checks of :mod:`~ptrace.bundle_spec.store` apply to every key Zarr reads.
Importing this module imports Zarr: the reader imports it when such an array is opened, never
before, and without Zarr turns the ImportError into one line saying what to install.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest

from ptrace.bundle_spec.arrays import MAX_CHUNK_BYTES, ArrayMeta
from ptrace.bundle_spec.store import BundleStore

#: The most bytes Zarr may read under one key: a chunk of the largest size a reader accepts,
#: with room for any codec's overhead (the reader bounds the chunks once the array is open).
_MAX_STORED_BYTES = MAX_CHUNK_BYTES + (1 << 20)


def open_array(store: BundleStore, path: str) -> tuple[Any, ArrayMeta, str | None]:
    """The array at ``path`` opened by Zarr, its metadata, and why its metadata breaks SPEC.md
    section 4's codec rules, or None."""
    node = zarr.open_array(CheckedStore(store), path=path, mode="r", zarr_format=3)
    document = node.metadata.to_dict()
    meta = ArrayMeta(tuple(node.shape), tuple(node.chunks), np.dtype(node.dtype), node.fill_value,
                     dict(node.attrs), direct=False)
    return node, meta, _codec_problem(document)


def _codec_problem(document: dict[str, Any]) -> str | None:
    """Why an array's metadata (as Zarr reads it back) breaks SPEC.md section 4's rules, or None."""
    if document["chunk_grid"]["name"] != "regular":
        return "does not use a regular chunk grid"
    codecs = json.loads(json.dumps(document["codecs"], default=str))
    names = [codec.get("name") for codec in codecs]
    if len(names) < 2 or names[0] != "bytes" or names[-1] != "crc32c":
        return "does not use the codecs bytes -> compressors -> crc32c"
    if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
        return "is not little endian"
    return None


class CheckedStore(Store):
    """Zarr's view of a bundle: every key read through ptrace's checked store."""

    supports_writes = supports_deletes = False
    supports_listing = True

    def __init__(self, store: BundleStore) -> None:
        super().__init__(read_only=True)
        self._store = store

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedStore) and other is self

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        stored = self._store.read_stored(key, np.empty(_MAX_STORED_BYTES, np.uint8))
        if stored is None:
            return None
        data = stored.tobytes()
        if isinstance(byte_range, RangeByteRequest):
            data = data[byte_range.start:byte_range.end]
        elif isinstance(byte_range, OffsetByteRequest):
            data = data[byte_range.offset:]
        elif isinstance(byte_range, SuffixByteRequest):
            data = data[len(data) - byte_range.suffix:]
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return self._store.is_stored(key)

    async def set(self, key: str, value: Any) -> None:
        raise PermissionError("a bundle is read only")

    async def delete(self, key: str) -> None:
        raise PermissionError("a bundle is read only")

    async def list(self) -> AsyncIterator[str]:
        for key in self._store.stored_keys():
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self._store.stored_keys():
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix.rstrip("/") else ""
        seen = set()
        for key in self._store.stored_keys():
            if key.startswith(prefix):
                entry = key[len(prefix):].split("/", 1)[0]
                if entry not in seen:
                    seen.add(entry)
                    yield entry

