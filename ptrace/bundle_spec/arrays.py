"""A node's Zarr v3 metadata (``zarr.json``), read without Zarr.

Importing Zarr costs more than a whole small ``ptrace compare`` (0.15-0.3 s: all its codecs,
asyncio, its registry), and opening an array through it a few milliseconds of event-loop round
trips, for each of a bundle's arrays. The arrays ptrace writes have one shape of metadata: a
regular chunk grid whose chunks span whole rows, the default chunk key encoding, the codecs
``bytes`` (little endian) -> ``blosc`` or nothing -> ``crc32c``, and a plain fill value.
:func:`parse_array` reads exactly that shape, strictly, into an :class:`ArrayMeta` that
:class:`~ptrace.bundle_spec.chunks.ChunkReader` decodes. Anything else the spec allows (another
compressor, chunks that split rows, extension fields) parses as ``direct=False``, and the reader
opens that array through Zarr, which is imported only then.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptrace.bundle_spec import dtypes

#: The most one chunk may hold (logical bytes): what one chunk read allocates. ptrace writes
#: chunks of about 4 MiB (or one row, when a row is larger).
MAX_CHUNK_BYTES = 64 << 20
#: The largest ``zarr.json`` a reader accepts (ptrace's are under 1 KiB; attributes are small).
MAX_NODE_METADATA_BYTES = 1 << 20

#: Zarr v3 data type names of the storage dtypes (SPEC.md section 4).
_DATA_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                         "float16", "float32", "float64"})
_FLOAT_FILLS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_BLOSC_NAMES = frozenset({"lz4", "lz4hc", "blosclz", "zstd", "snappy", "zlib"})
_BLOSC_SHUFFLES = frozenset({"noshuffle", "shuffle", "bitshuffle"})
_ARRAY_KEYS = frozenset({"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                         "fill_value", "codecs", "attributes", "storage_transformers", "dimension_names"})


class MetadataError(ValueError):
    """A ``zarr.json`` that is not Zarr v3 node metadata (the reader names the node)."""


@dataclass(frozen=True)
class ArrayMeta:
    """What a reader needs of an array's metadata. ``direct`` says whether ptrace decodes its
    chunks itself (``compressed``: through blosc); otherwise Zarr reads it."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    attributes: dict[str, Any] = field(default_factory=dict)
    direct: bool = False
    compressed: bool = False
    separator: str = "/"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nchunks(self) -> int:
        return math.prod(-(-size // chunk) for size, chunk in zip(self.shape, self.chunks, strict=True))

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize

    @property
    def logical_dtype(self) -> Any:
        """The ``ptrace.dtype`` attribute (SPEC.md section 4), else the storage dtype's name;
        whatever the attribute holds (the reader checks it)."""
        attribute = self.attributes.get("ptrace", {"dtype": self.dtype.name})
        return attribute.get("dtype") if isinstance(attribute, dict) else None

    def chunk_key(self, index: int) -> str:
        """The key, under the array's node, of the ``index``-th chunk along the first axis
        (Zarr v3's default chunk key encoding; chunks span the other axes whole)."""
        return self.separator.join(("c", str(index), *("0" * (self.ndim - 1))))

    def problem(self) -> str | None:
        """Why this array breaks the dtype and size rules of SPEC.md sections 4 and 8, or None
        (the codec rules are checked by parsing, or for an array Zarr reads, when opening it)."""
        if self.ndim < 1:
            return "has no axis"
        logical = self.logical_dtype
        if not isinstance(logical, str) or not dtypes.is_logical(logical) or dtypes.storage_dtype(logical) != self.dtype:
            return f"has dtype {self.dtype.name} tagged {logical!r}, not a logical dtype stored as such"
        if self.chunk_bytes > MAX_CHUNK_BYTES:
            return f"declares chunks of {self.chunk_bytes} bytes (the most a reader accepts is {MAX_CHUNK_BYTES})"
        return None


def parse_json(payload: bytes) -> dict[str, Any]:
    """A ``zarr.json`` document: a JSON object (bounded by its caller), or :class:`MetadataError`."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MetadataError(f"not JSON: {' '.join(str(exc).split())[:80]}") from None
    if not isinstance(document, dict) or document.get("zarr_format") != 3:
        raise MetadataError("not Zarr v3 metadata")
    return document


def parse_array(document: dict[str, Any]) -> ArrayMeta | None:
    """The metadata of an array in ptrace's own shape, or None when it has another: Zarr then
    decides. Raises :class:`MetadataError` for a node that is not an array."""
    if document.get("node_type") != "array":
        raise MetadataError(f"is a {document.get('node_type')!r} node, expected an array")
    try:
        return _direct(document)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _direct(document: dict[str, Any]) -> ArrayMeta | None:
    """:func:`parse_array` for ptrace's shape of metadata; a lookup or type error means another."""
    if not set(document) <= _ARRAY_KEYS or document.get("storage_transformers", []) != [] \
            or sys.byteorder != "little":
        return None
    shape, chunks = _integers(document["shape"]), _integers(document["chunk_grid"]["configuration"]["chunk_shape"])
    grid, keys = document["chunk_grid"], document["chunk_key_encoding"]
    data_type, attributes = document["data_type"], document.get("attributes", {})
    if grid["name"] != "regular" or set(grid) != {"name", "configuration"} or keys["name"] != "default" \
            or data_type not in _DATA_TYPES or not isinstance(attributes, dict) \
            or len(shape) != len(chunks) or not shape or min(chunks) < 1 or min(shape) < 0 \
            or chunks[1:] != shape[1:]:
        return None
    separator = keys.get("configuration", {"separator": "/"})["separator"]
    dtype = np.dtype(data_type)
    compressed = _codecs(document["codecs"], dtype)
    fill = _fill_value(document["fill_value"], dtype)
    if separator not in ("/", ".") or compressed is None or fill is None:
        return None
    return ArrayMeta(tuple(shape), tuple(chunks), dtype, fill, attributes, direct=True,
                     compressed=compressed, separator=separator)


def _integers(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(type(value) is int for value in values):
        raise TypeError("not a list of integers")
    return values


def _codecs(codecs: Any, dtype: np.dtype) -> bool | None:
    """Whether the chain is bytes -> blosc -> crc32c (True) or bytes -> crc32c (False); None if
    it is any other."""
    if not isinstance(codecs, list) or len(codecs) not in (2, 3):
        return None
    first, *middle, last = codecs
    endian = first.get("configuration", {}).get("endian")
    if first["name"] != "bytes" or endian not in ("little", None) or (endian is None and dtype.itemsize > 1) \
            or last != {"name": "crc32c"} and last != {"name": "crc32c", "configuration": {}}:
        return None
    if not middle:
        return False
    blosc = middle[0]
    config = blosc["configuration"]
    valid = blosc["name"] == "blosc" and config["cname"] in _BLOSC_NAMES and config["shuffle"] in _BLOSC_SHUFFLES \
        and type(config["clevel"]) is int and 0 <= config["clevel"] <= 9 \
        and all(type(config.get(key, 0)) is int and config.get(key, 0) >= 0 for key in ("typesize", "blocksize"))
    return True if valid else None


def _fill_value(value: Any, dtype: np.dtype) -> Any:
    """The fill value as a Python scalar of ``dtype``'s kind, None if not a plain one."""
    if dtype.kind == "b":
        return value if type(value) is bool else None
    if dtype.kind in "iu":
        if type(value) is not int or not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
            return None
        return value
    if isinstance(value, str):
        return _FLOAT_FILLS.get(value)
    return float(value) if type(value) in (int, float) else None
