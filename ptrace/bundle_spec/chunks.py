"""A tensor's chunks read straight from the store and decoded in one call each.

Zarr's read path (an event loop, a thread hop per codec, a buffer per step) costs as much as
the decoding itself on ptrace's 4 MiB chunks, and compare reads every chunk of two bundles.
:meth:`~ptrace.bundle_spec.reader.Bundle.verified_blocks` therefore reads arrays whose codecs
are the ones ptrace writes (bytes, then blosc or nothing, then crc32c; chunks of whole rows)
through :class:`ChunkReader`, and anything else the spec allows through Zarr.

The checks are Zarr's and stricter (SPEC.md section 8): a stored chunk larger than its codecs
can produce is refused before it is read, its CRC-32C is verified before it is decoded, and a
blosc header must declare exactly the chunk's size and the bytes actually stored, so that the
decoder neither allocates nor reads what the header merely claims: it decodes into a buffer
of the chunk's size, which the reader has already bounded.
"""

from __future__ import annotations

import math
import struct
import sys

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec

from ptrace.bundle_spec.store import BundleStore

#: c-blosc's header (version, codec version, flags, typesize, nbytes, blocksize, cbytes) and
#: the most its compressed form can exceed the data by (BLOSC_MAX_OVERHEAD).
_BLOSC_HEADER = struct.Struct("<BBBBIII")
_BLOSC_OVERHEAD = 16
_CHECKSUM_BYTES = 4


class ChunkReader:
    """Decodes the chunks of one array, the ``index``-th along its first axis at a time."""

    def __init__(self, store: BundleStore, node: zarr.Array, compressed: bool) -> None:
        self._store = store
        self._metadata = node.metadata
        self._prefix = f"{node.path}/" if node.path else ""
        self._trailing = (0,) * (node.ndim - 1)
        self._dtype = np.dtype(node.dtype)
        self._fill = node.metadata.fill_value
        self._compressed = compressed
        self.chunk_bytes = math.prod(node.chunks) * self._dtype.itemsize
        #: Where each chunk's stored bytes are read: as large as its codecs can make a chunk.
        self._stored = np.empty(self.chunk_bytes + _CHECKSUM_BYTES + (_BLOSC_OVERHEAD if compressed else 0), np.uint8)

    @classmethod
    def of(cls, store: BundleStore, node: zarr.Array) -> ChunkReader | None:
        """A reader for ``node`` (whose metadata the bundle reader has checked), or None where
        Zarr must read it: other compressors, or chunks that split rows."""
        middle = node.metadata.codecs[1:-1]
        if sys.byteorder != "little" or tuple(node.chunks[1:]) != tuple(node.shape[1:]) or len(middle) > 1 \
                or (middle and not isinstance(middle[0], BloscCodec)):
            return None
        return cls(store, node, compressed=bool(middle))

    def read(self, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` into ``out`` (``chunk_bytes`` contiguous uint8). A chunk that is
        not stored reads as the fill value (the bundle reader bounds how many may be absent).
        Raises ValueError, saying why, for a chunk that does not decode as declared."""
        key = self._prefix + self._metadata.encode_chunk_key((index, *self._trailing))
        stored = self._store.read_stored(key, self._stored)
        if stored is None:
            out.view(self._dtype)[...] = self._fill
            return
        if len(stored) < _CHECKSUM_BYTES:
            raise ValueError(f"chunk {key} holds {len(stored)} bytes, too few for its checksum")
        body = stored[:-_CHECKSUM_BYTES]
        if google_crc32c.value(body) != int(stored[-_CHECKSUM_BYTES:].view("<u4")[0]):
            raise ValueError(f"chunk {key}: stored and computed checksums do not match")
        if not self._compressed:
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
