"""Reading through Zarr the arrays that ptrace does not decode itself.

ptrace reads the arrays it writes without Zarr (:mod:`~ptrace.bundle_spec.arrays`); an array
whose metadata another writer chose within the spec (another compressor, chunks that split
rows) is opened by Zarr (:func:`open_array`) over these stores, which apply the checks of
:mod:`~ptrace.bundle_spec.store` to every key Zarr asks for. Importing this module imports Zarr.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import AsyncIterator, Iterable

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.abc.store import ByteRequest, Store
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore, ZipStore

from ptrace.bundle_spec.arrays import ArrayMeta
from ptrace.bundle_spec.store import ArchiveStore, DirectoryStore, member_unreadable


def open_array(store: Store, path: str) -> tuple[zarr.Array, ArrayMeta | None, str | None]:
    """The array at ``path`` opened by Zarr, its metadata, and why its metadata breaks SPEC.md
    section 4's codec rules (then the metadata may be None), or None."""
    node = zarr.open_array(store, path=path, mode="r", zarr_format=3)
    if not isinstance(node.metadata.chunk_grid, RegularChunkGrid):
        return node, None, "does not use a regular chunk grid"
    meta = ArrayMeta(tuple(node.shape), tuple(node.chunks), np.dtype(node.dtype), node.metadata.fill_value,
                     dict(node.attrs))
    codecs = node.metadata.codecs
    if len(codecs) < 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[-1], Crc32cCodec) \
            or not all(isinstance(codec, BytesBytesCodec) for codec in codecs[1:]):
        return node, meta, "does not use the codecs bytes -> compressors -> crc32c"
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return node, meta, "is not little endian"
    return node, meta, None


class CheckedLocalStore(LocalStore):
    """A read-only ``LocalStore`` that reads only what ``checked`` would: regular files, no link."""

    def __init__(self, checked: DirectoryStore) -> None:
        super().__init__(checked.root, read_only=True)
        self._checked = checked

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        if self._checked.file(key) is None:
            return None
        return super().get_sync(key, prototype=prototype, byte_range=byte_range)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if self._checked.file(key) is None:
            return None
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return self._checked.file(key) is not None

    async def getsize(self, key: str) -> int:
        path = self._checked.file(key)
        if path is None:
            raise FileNotFoundError(key)
        return os.stat(path).st_size

    async def list(self) -> AsyncIterator[str]:
        for key in self._checked.stored_keys():
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self._checked.stored_keys():
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        found = self._checked.lookup(prefix)
        if found is None or not stat.S_ISDIR(found[1]):
            return
        for entry in sorted(os.listdir(found[0])):
            yield entry


class CheckedZipStore(ZipStore):
    """A read-only ``ZipStore`` over an archive that :func:`~ptrace.bundle_spec.store.check_archive`
    accepted, whose unreadable members are corruption, named."""

    def __init__(self, checked: ArchiveStore) -> None:
        super().__init__(checked.path, mode="r", read_only=True)

    def _get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        try:
            return super()._get(key, prototype, byte_range)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise member_unreadable(self.path, key, exc) from None
