"""A chunk's stored bytes, encoded and decoded in one call each, on bytes only (no I/O).

Zarr's read path (an event loop, a thread hop per codec, a buffer per step) costs as much as
the decoding itself on ptrace's 4 MiB chunks, and compare reads every chunk of two bundles. So
the chunks of arrays whose metadata has ptrace's shape (:class:`~ptrace.bundle_spec.arrays.ArrayMeta`:
bytes, then blosc or nothing, then crc32c; chunks of whole rows) are coded here, as Zarr's
codec pipeline codes them, byte for byte (tests/bundle_spec/test_writer_bytes.py).

Decoding is bounded and stricter than Zarr (SPEC.md section 8): a stored chunk larger than its
codecs can produce is refused (:func:`stored_limit` says how large, so a store refuses it
before reading), its CRC-32C is verified before it is decoded, and a blosc header must declare
exactly the chunk's size and the bytes actually stored, so that the decoder neither allocates
nor reads what the header merely claims: it decodes into a buffer of the chunk's size, which
the reader has already bounded. Whatever the bytes, decoding raises :class:`ChunkError` only.
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np
from numcodecs import blosc

from ptrace.bundle_spec.arrays import ArrayMeta
from ptrace.errors import BundleCorruptError

#: c-blosc's header (version, codec version, flags, typesize, nbytes, blocksize, cbytes) and
#: the most its compressed form can exceed the data by (BLOSC_MAX_OVERHEAD).
_BLOSC_HEADER = struct.Struct("<BBBBIII")
_BLOSC_OVERHEAD = 16
_CHECKSUM = struct.Struct("<I")
_SHUFFLES = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}


class ChunkError(BundleCorruptError):
    """A stored chunk that does not decode as its array's metadata declares (the reader names it)."""


def stored_limit(meta: ArrayMeta) -> int:
    """The most bytes one stored chunk of ``meta`` can hold: its data, blosc's overhead, the checksum."""
    return meta.chunk_bytes + _CHECKSUM.size + (_BLOSC_OVERHEAD if meta.blosc else 0)


def decode(meta: ArrayMeta, stored: np.ndarray, out: np.ndarray) -> None:
    """Decode one stored chunk (uint8) into ``out`` (``meta.chunk_bytes`` contiguous uint8),
    or raise :class:`ChunkError` saying why it does not decode as declared."""
    if len(stored) > stored_limit(meta):
        raise ChunkError(f"holds {len(stored)} bytes, more than its codecs produce ({stored_limit(meta)})")
    if len(stored) < _CHECKSUM.size:
        raise ChunkError(f"holds {len(stored)} bytes, too few for its checksum")
    body = stored[:-_CHECKSUM.size]
    if google_crc32c.value(body) != _CHECKSUM.unpack(stored[-_CHECKSUM.size:].tobytes())[0]:
        raise ChunkError("stored and computed checksums do not match")
    if meta.blosc is None:
        if len(body) != out.nbytes:
            raise ChunkError(f"holds {len(body)} bytes, not {out.nbytes}")
        out[...] = body
        return
    if len(body) < _BLOSC_HEADER.size:
        raise ChunkError("is shorter than a blosc header")
    *_, size, _, compressed_size = _BLOSC_HEADER.unpack_from(body)
    if size != out.nbytes or compressed_size != len(body):
        raise ChunkError(f"has a blosc header that declares {size} bytes in {compressed_size}, "
                         f"the chunk holds {out.nbytes} in {len(body)}")
    try:
        blosc.decompress(body, out)
    except (RuntimeError, ValueError) as exc:  # c-blosc's own checks of the blocks
        raise ChunkError(f"does not decompress ({' '.join(str(exc).split())[:80]})") from None


def encode(meta: ArrayMeta, rows: np.ndarray) -> bytes:
    """The stored bytes of a chunk made of ``rows`` (storage dtype, at most a chunk's): as Zarr
    stores a chunk, whole, rows short of a full chunk padded with the fill value."""
    if rows.shape[0] < meta.chunks[0]:
        whole = np.full(meta.chunks, meta.fill_value, meta.dtype)
        whole[:rows.shape[0]] = rows
        rows = whole
    data = np.ascontiguousarray(rows, dtype=meta.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)
    body = blosc.compress(data, meta.blosc.cname.encode(), meta.blosc.clevel, _SHUFFLES[meta.blosc.shuffle],
                          meta.blosc.blocksize, meta.blosc.typesize) if meta.blosc else data.tobytes()
    return body + _CHECKSUM.pack(google_crc32c.value(body))
