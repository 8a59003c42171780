"""An array's chunks read straight from the store and decoded in one call each, and written
the same way.

Zarr's read path (an event loop, a thread hop per codec, a buffer per step) costs as much as
the decoding itself on ptrace's 4 MiB chunks, and compare reads every chunk of two bundles.
The reader therefore decodes arrays whose metadata has ptrace's own shape
(:func:`~ptrace.bundle_spec.arrays.parse_array`: bytes, then blosc or nothing, then crc32c;
chunks of whole rows) through :class:`ChunkReader`, and anything else the spec allows through Zarr.

The checks are Zarr's and stricter (SPEC.md section 8): a stored chunk larger than its codecs
can produce is refused before it is read, its CRC-32C is verified before it is decoded, and a
blosc header must declare exactly the chunk's size and the bytes actually stored, so that the
decoder neither allocates nor reads what the header merely claims: it decodes into a buffer
of the chunk's size, which the reader has already bounded.

Writing has the same cost in Zarr (and ``Array.append`` rewrites the array's metadata at every
call besides), which a capture pays at every flush of its rows: :class:`ChunkWriter` encodes and
stores the chunks of ptrace's own arrays the way Zarr's codec pipeline does, byte for byte.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
from numcodecs import blosc

from ptrace.bundle_spec.arrays import ArrayMeta
from ptrace.bundle_spec.store import BundleStore, DirectoryStore
from ptrace.errors import BundleError

if TYPE_CHECKING:  # the writer's metadata is Zarr's; reading never imports Zarr
    from zarr.core.metadata.v3 import ArrayV3Metadata

#: c-blosc's header (version, codec version, flags, typesize, nbytes, blocksize, cbytes) and
#: the most its compressed form can exceed the data by (BLOSC_MAX_OVERHEAD).
_BLOSC_HEADER = struct.Struct("<BBBBIII")
_BLOSC_OVERHEAD = 16
_CHECKSUM_BYTES = 4
_SHUFFLES = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}


class ChunkReader:
    """Decodes the chunks of one array (``meta.direct``), the ``index``-th along its first axis at a time."""

    def __init__(self, store: BundleStore, path: str, meta: ArrayMeta) -> None:
        self._store = store
        self._meta = meta
        self._prefix = f"{path}/" if path else ""
        self.chunk_bytes = meta.chunk_bytes
        #: Where each chunk's stored bytes are read: as large as its codecs can make a chunk.
        self._stored = np.empty(self.chunk_bytes + _CHECKSUM_BYTES + (_BLOSC_OVERHEAD if meta.compressed else 0),
                                np.uint8)

    def read(self, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` into ``out`` (``chunk_bytes`` contiguous uint8). A chunk that is
        not stored reads as the fill value (the bundle reader bounds how many may be absent).
        Raises ValueError, saying why, for a chunk that does not decode as declared."""
        key = self._prefix + self._meta.chunk_key(index)
        stored = self._store.read_stored(key, self._stored)
        if stored is None:
            out.view(self._meta.dtype)[...] = self._meta.fill_value
            return
        if len(stored) < _CHECKSUM_BYTES:
            raise ValueError(f"chunk {key} holds {len(stored)} bytes, too few for its checksum")
        body = stored[:-_CHECKSUM_BYTES]
        if google_crc32c.value(body) != int(stored[-_CHECKSUM_BYTES:].view("<u4")[0]):
            raise ValueError(f"chunk {key}: stored and computed checksums do not match")
        if not self._meta.compressed:
            if len(body) != out.nbytes:
                raise ValueError(f"chunk {key} holds {len(body)} bytes, not {out.nbytes}")
            out[...] = body
            return
        if len(body) < _BLOSC_HEADER.size:
            raise ValueError(f"chunk {key} is shorter than a blosc header")
        *_, size, _, compressed_size = _BLOSC_HEADER.unpack_from(body)
        if size != out.nbytes or compressed_size != len(body):
            raise ValueError(f"chunk {key}: its blosc header declares {size} bytes in {compressed_size}, "
                             f"the chunk holds {out.nbytes} in {len(body)}")
        blosc.decompress(body, out)


class ChunkWriter:
    """Encodes and stores the chunks of one array whose chunks span whole rows, the ``index``-th
    along its first axis at a time, as Zarr would: in the storage dtype little endian, blosc (or
    nothing), then the CRC-32C of the stored bytes, under the array's chunk key. Like Zarr, a
    chunk is stored whole: rows short of a full chunk are padded with the fill value. Every chunk
    written is stored, all-zero ones included (what Zarr's ``write_empty_chunks`` did for the
    writer): a chunk that is not stored reads as the fill value, indistinguishable from a deleted
    one, and readers bound how many may be absent.

    Files are written in place, not through a temporary file as Zarr's store does: the writer
    stages the whole bundle, which a rename makes visible only when it is complete.
    """

    def __init__(self, directory: Path, metadata: ArrayV3Metadata) -> None:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

        serializer, *middle, checksum = metadata.codecs
        if sys.byteorder != "little" or not isinstance(serializer, BytesCodec) \
                or not isinstance(checksum, Crc32cCodec) or len(middle) > 1 \
                or (middle and not isinstance(middle[0], BloscCodec)):
            raise BundleError(f"{directory}: chunks with codecs {metadata.codecs} are written through Zarr only")
        self._directory = directory
        self.chunk_shape = tuple(metadata.chunks)
        #: The reader's view of the array (its chunk keys; reading back a partial chunk)
        self._meta = ArrayMeta(tuple(metadata.shape), self.chunk_shape, np.dtype(metadata.dtype.to_native_dtype()),
                               metadata.fill_value, direct=True, compressed=bool(middle))
        self._made: Path | None = None  # the directory of the last chunk written
        self._blosc = None
        if middle:
            codec = middle[0]
            self._blosc = (codec.cname.value.encode(), codec.clevel, _SHUFFLES[codec.shuffle.value],
                           codec.blocksize, codec.typesize)

    def _path(self, index: int) -> Path:
        return self._directory / self._meta.chunk_key(index)

    def write(self, index: int, rows: np.ndarray) -> None:
        """Store chunk ``index``, made of ``rows`` (in the array's dtype, at most a chunk's)."""
        if rows.shape[0] < self.chunk_shape[0]:
            whole = np.full(self.chunk_shape, self._meta.fill_value, self._meta.dtype)
            whole[:rows.shape[0]] = rows
            rows = whole
        data = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
        body = blosc.compress(data, *self._blosc) if self._blosc else data
        path = self._path(index)
        if path.parent != self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made = path.parent
        with path.open("wb") as file:
            file.write(body)
            file.write(struct.pack("<I", google_crc32c.value(body)))

    def read(self, index: int, rows: int) -> np.ndarray:
        """The first ``rows`` rows of the stored chunk ``index``: a partial chunk written out
        earlier, which the rows that follow are about to complete (decoded as any reader does)."""
        chunk = np.empty(self.chunk_shape, self._meta.dtype)
        try:
            ChunkReader(DirectoryStore(self._directory), "", self._meta).read(index, chunk.reshape(-1).view(np.uint8))
        except ValueError as exc:
            raise BundleError(f"{self._directory}: the chunk written earlier no longer reads back ({exc})") from None
        return chunk[:rows]
