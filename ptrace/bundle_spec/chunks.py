"""An array's chunks read straight from the store and decoded in one call each.

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
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np
from numcodecs import blosc

from ptrace.bundle_spec.arrays import ArrayMeta
from ptrace.bundle_spec.store import BundleStore

#: c-blosc's header (version, codec version, flags, typesize, nbytes, blocksize, cbytes) and
#: the most its compressed form can exceed the data by (BLOSC_MAX_OVERHEAD).
_BLOSC_HEADER = struct.Struct("<BBBBIII")
_BLOSC_OVERHEAD = 16
_CHECKSUM_BYTES = 4


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
