"""A node's Zarr v3 metadata (``zarr.json``): the one place that reads and writes it. No I/O.

ptrace writes its arrays' ``zarr.json`` itself, as the Zarr v3 core specification defines it
and byte for byte as Zarr would write it (tests/bundle_spec/test_writer_bytes.py keeps Zarr as
the oracle), and reads them without Zarr: importing Zarr costs more than a whole small
``ptrace compare``, and ptrace's arrays have one shape of metadata. That shape (SPEC.md section
4): a regular chunk grid whose chunks span whole rows, the default chunk key encoding, the
codecs ``bytes`` (little endian) -> ``blosc`` or nothing -> ``crc32c``, a plain fill value.

:meth:`ArrayMeta.from_json` reads exactly that shape, strictly, into an :class:`ArrayMeta` that
:mod:`~ptrace.bundle_spec.chunks` decodes. Metadata that is well-formed Zarr v3 but of another
shape (another compressor, chunks that split rows, extension fields) raises
:class:`ForeignArrayError`: the reader then opens that array through Zarr, if it is installed.
Anything else raises :class:`MetadataError`. Both are :class:`~ptrace.errors.BundleError`\\ s:
nothing else escapes these parsers, whatever the bytes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptrace.bundle_spec import dtypes
from ptrace.errors import BundleCorruptError, BundleError

#: The most one chunk may hold (logical bytes): what one chunk read allocates. ptrace writes
#: chunks of about 4 MiB (or one row, when a row is larger).
MAX_CHUNK_BYTES = 64 << 20
#: The largest ``zarr.json`` a reader accepts (ptrace's are under 1 KiB; attributes are small).
MAX_NODE_METADATA_BYTES = 1 << 20
#: How Zarr lays out ``zarr.json`` (its ``json_indent`` default): the writer's bytes must be Zarr's.
_JSON_INDENT = 2

#: Zarr v3 data type names of the storage dtypes (SPEC.md section 4).
_DATA_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                         "float16", "float32", "float64"})
_FLOAT_FILLS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_BLOSC_NAMES = frozenset({"lz4", "lz4hc", "blosclz", "zstd", "snappy", "zlib"})
_BLOSC_SHUFFLES = frozenset({"noshuffle", "shuffle", "bitshuffle"})
#: The keys the core specification defines for an array, and those it requires.
_ARRAY_KEYS = frozenset({"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                         "fill_value", "codecs", "attributes", "storage_transformers", "dimension_names"})
_REQUIRED_ARRAY_KEYS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs")
_CRC32C = {"name": "crc32c"}


class MetadataError(BundleCorruptError):
    """A ``zarr.json`` that is not Zarr v3 node metadata (the reader names the node)."""


class ForeignArrayError(BundleError):
    """Well-formed Zarr v3 array metadata of a shape ptrace does not decode itself (only Zarr does)."""


@dataclass(frozen=True)
class Blosc:
    """The ``blosc`` codec's configuration (Zarr v3's blosc codec), key order as Zarr writes it."""

    cname: str
    clevel: int
    shuffle: str
    typesize: int
    blocksize: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": "blosc", "configuration": {"typesize": self.typesize, "cname": self.cname,
                                                   "clevel": self.clevel, "shuffle": self.shuffle,
                                                   "blocksize": self.blocksize}}

    @classmethod
    def from_json(cls, codec: dict[str, Any]) -> Blosc | None:
        """The configuration of a ``blosc`` codec ptrace decodes, or None for any other codec."""
        config = codec.get("configuration")
        if codec["name"] != "blosc" or not isinstance(config, dict) \
                or not set(config) <= {"typesize", "cname", "clevel", "shuffle", "blocksize"}:
            return None
        cname, clevel, shuffle = config.get("cname"), config.get("clevel"), config.get("shuffle")
        sizes = [config.get(key, 0) for key in ("typesize", "blocksize")]
        if cname not in _BLOSC_NAMES or shuffle not in _BLOSC_SHUFFLES or type(clevel) is not int \
                or not 0 <= clevel <= 9 or not all(type(size) is int and 0 <= size < 1 << 31 for size in sizes):
            return None
        return cls(cname, clevel, shuffle, *sizes)


@dataclass(frozen=True)
class ArrayMeta:
    """An array's ``zarr.json`` in ptrace's shape: what a reader needs and what the writer writes.

    ``blosc`` is the compressor between ``bytes`` and ``crc32c`` (None: none). ``direct`` is
    False only for metadata built from an array that Zarr opened (:mod:`~ptrace.bundle_spec.zarr_fallback`).
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    attributes: dict[str, Any] = field(default_factory=dict)
    blosc: Blosc | None = None
    separator: str = "/"
    direct: bool = True

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
        whatever the attribute holds (:meth:`problem` checks it)."""
        attribute = self.attributes.get("ptrace")
        if attribute is None:
            return self.dtype.name
        return attribute.get("dtype") if isinstance(attribute, dict) else None

    def chunk_key(self, index: int) -> str:
        """The key, under the array's node, of the ``index``-th chunk along the first axis
        (Zarr v3's default chunk key encoding; chunks span the other axes whole)."""
        return self.separator.join(("c", str(index), *("0" * (self.ndim - 1))))

    def with_shape(self, shape: tuple[int, ...]) -> ArrayMeta:
        return ArrayMeta(tuple(shape), self.chunks, self.dtype, self.fill_value, self.attributes, self.blosc,
                         self.separator, self.direct)

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

    # -- zarr.json --------------------------------------------------------------------------
    def to_json(self) -> bytes:
        """This array's ``zarr.json``: the bytes Zarr writes for the same array."""
        serializer: dict[str, Any] = {"name": "bytes"}
        if self.dtype.itemsize > 1:  # Zarr drops the byte order where there is none
            serializer["configuration"] = {"endian": "little"}
        document = {
            "shape": list(self.shape), "data_type": self.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": self.separator}},
            "fill_value": _fill_json(self.fill_value),
            "codecs": [serializer, *([self.blosc.to_json()] if self.blosc else []), _CRC32C],
            "attributes": self.attributes, "zarr_format": 3, "node_type": "array", "storage_transformers": [],
        }
        return _dump(document)

    @classmethod
    def from_json(cls, payload: bytes) -> ArrayMeta:
        """The metadata of an array in ptrace's shape. Raises :class:`ForeignArrayError` for
        well-formed array metadata of another shape, :class:`MetadataError` for anything else."""
        document = parse_node(payload, "array")
        _check_array_document(document)
        try:
            return _ptrace_array(document)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # a lookup or type that is not ptrace's
            raise ForeignArrayError(f"has array metadata ptrace does not decode itself ({_reason(exc)})") from None


@dataclass(frozen=True)
class GroupMeta:
    """A group's ``zarr.json``: its attributes only (ptrace's groups hold no other field)."""

    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return _dump({"attributes": self.attributes, "zarr_format": 3, "node_type": "group"})

    @classmethod
    def from_json(cls, payload: bytes) -> GroupMeta:
        attributes = parse_node(payload, "group").get("attributes", {})
        if not isinstance(attributes, dict):
            raise MetadataError("has group attributes that are not a map")
        return cls(attributes)


def node_type(payload: bytes) -> Any:
    """The ``node_type`` a ``zarr.json`` declares (:class:`MetadataError` if it is not Zarr v3 metadata)."""
    return _parse_json(payload).get("node_type")


def parse_node(payload: bytes, node_type: str) -> dict[str, Any]:
    """A ``zarr.json`` document of a node of ``node_type``: a bounded JSON object, or :class:`MetadataError`."""
    document = _parse_json(payload)
    found = document.get("node_type")
    if found != node_type:
        raise MetadataError(f"is a {found!r} node, expected an {node_type}" if node_type == "array"
                            else f"is a {found!r} node, expected a {node_type}")
    return document


def _parse_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_NODE_METADATA_BYTES:
        raise MetadataError(f"is {len(payload)} bytes of metadata (the most a reader accepts is "
                            f"{MAX_NODE_METADATA_BYTES})")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MetadataError(f"is not JSON: {_reason(exc)}") from None
    if not isinstance(document, dict) or document.get("zarr_format") != 3:
        raise MetadataError("is not Zarr v3 metadata")
    return document


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=_JSON_INDENT, allow_nan=True).encode()


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:80]


def _is_name_config(value: Any) -> bool:
    """A ``{"name": ..., "configuration": {...}}`` object as the core spec writes extensions."""
    return isinstance(value, dict) and isinstance(value.get("name"), str) \
        and isinstance(value.get("configuration", {}), dict) and set(value) <= {"name", "configuration"}


def _is_size_list(value: Any, least: int) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= least for v in value)


def _check_array_document(document: dict[str, Any]) -> None:
    """What every Zarr v3 array's metadata has, whoever wrote it (core spec, "array metadata")."""
    missing = [key for key in _REQUIRED_ARRAY_KEYS if key not in document]
    if missing:
        raise MetadataError(f"lacks {', '.join(missing)}")
    shape, grid, codecs = document["shape"], document["chunk_grid"], document["codecs"]
    if not _is_size_list(shape, 0):
        raise MetadataError("has a shape that is not a list of sizes")
    if not isinstance(document["data_type"], (str, dict)):
        raise MetadataError("has a data_type that is neither a name nor an object")
    if not _is_name_config(grid) or not _is_name_config(document["chunk_key_encoding"]):
        raise MetadataError("has a chunk grid or chunk key encoding that is not a named extension")
    if grid["name"] == "regular":
        chunk_shape = grid.get("configuration", {}).get("chunk_shape")
        if not _is_size_list(chunk_shape, 1) or len(chunk_shape) != len(shape):
            raise MetadataError("has a regular chunk grid whose chunk_shape does not fit its shape")
    if not isinstance(codecs, list) or not codecs or not all(_is_name_config(codec) for codec in codecs):
        raise MetadataError("has codecs that are not a list of named codecs")
    if not isinstance(document.get("attributes", {}), dict) \
            or not isinstance(document.get("storage_transformers", []), list):
        raise MetadataError("has attributes or storage transformers of the wrong type")
    for key in set(document) - _ARRAY_KEYS:
        extension = document[key]
        if not isinstance(extension, dict) or extension.get("must_understand") is not False:
            raise MetadataError(f"has the field {key[:40]!r}, which a reader must understand")


def _ptrace_array(document: dict[str, Any]) -> ArrayMeta:
    """:meth:`ArrayMeta.from_json` for ptrace's shape; a lookup or type error means another."""
    if not set(document) <= _ARRAY_KEYS or document.get("storage_transformers", []) != [] \
            or sys.byteorder != "little":
        raise ValueError("extension fields, storage transformers or a big-endian machine")
    shape = tuple(document["shape"])
    grid, keys = document["chunk_grid"], document["chunk_key_encoding"]
    data_type, attributes = document["data_type"], document.get("attributes", {})
    if grid["name"] != "regular" or keys["name"] != "default" or data_type not in _DATA_TYPES or not shape:
        raise ValueError("another chunk grid, key encoding or data type")
    chunks = tuple(grid["configuration"]["chunk_shape"])
    if chunks[1:] != shape[1:]:
        raise ValueError("chunks that split rows")
    separator = keys.get("configuration", {}).get("separator", "/")
    if separator not in ("/", "."):
        raise ValueError(f"separator {separator!r}")
    dtype = np.dtype(data_type)
    return ArrayMeta(shape, chunks, dtype, _fill_value(document["fill_value"], dtype), attributes,
                     _codecs(document["codecs"], dtype), separator)


def _codecs(codecs: list[dict[str, Any]], dtype: np.dtype) -> Blosc | None:
    """The blosc codec of the chain bytes -> blosc -> crc32c, None for bytes -> crc32c."""
    if len(codecs) not in (2, 3):
        raise ValueError(f"{len(codecs)} codecs")
    first, *middle, last = codecs
    endian = first.get("configuration", {}).get("endian")
    if first["name"] != "bytes" or set(first.get("configuration", {})) - {"endian"} \
            or endian not in ("little", None) or (endian is None and dtype.itemsize > 1) \
            or last["name"] != "crc32c" or last.get("configuration", {}) != {}:
        raise ValueError("not bytes -> ... -> crc32c, little endian")
    if not middle:
        return None
    blosc = Blosc.from_json(middle[0])
    if blosc is None:
        raise ValueError(f"compressor {middle[0]['name']!r}")
    return blosc


def _fill_value(value: Any, dtype: np.dtype) -> Any:
    """The fill value as a Python scalar of ``dtype``'s kind (ValueError if not a plain one)."""
    if dtype.kind == "b":
        if type(value) is bool:
            return value
    elif dtype.kind in "iu":
        if type(value) is int and np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
            return value
    elif isinstance(value, str):
        if value in _FLOAT_FILLS:
            return _FLOAT_FILLS[value]
    elif type(value) in (int, float):
        return float(value)
    raise ValueError(f"fill value {str(value)[:20]!r}")


def _fill_json(value: Any) -> Any:
    """A fill value as Zarr v3 writes it (floats that JSON lacks as strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value
