"""Frozen dataclasses as plain values and back: ptrace's one serialisation.

Bundle documents (``schema``, stored as msgpack), comparison results (``compare.results``,
written as JSON) and capture plans (``capture.plan``, sent into an engine's own environment)
are :class:`Record` dataclasses. This module turns them into *plain values* (maps with string
keys, lists, str, int, float, bool, None; bytes where msgpack holds them) and back.

- Writing follows the values: a dataclass becomes a map of its fields, a tuple a list, a path
  its text, a numpy array a list, a numpy scalar its Python value. Nothing is converted by its
  annotation, so a document is stored exactly as it was made.
- Reading follows the annotations, strictly: a bool is a bool (``"false"`` is refused, not
  truthy), an int is an int and not a bool, a float may be written as an int, lists, tuples and
  maps are checked element by element, a nested dataclass by its own fields. A missing required
  key or a value of another type is refused with the node named
  (``meta/manifest.arrays.requests/positions.shape[0] is float 12.0, expected int``), as the
  record's own error (:meth:`Record.invalid`). Reading builds only the types the annotations
  name: data never chooses a class, so nothing in it runs.
- Keys a record does not know are ignored where a newer writer may add some (documents,
  results: ``ignores_unknown_keys``) and refused where both ends are one version (a capture plan
  sent to an engine process).

NaN and infinity, one rule: plain values keep them, since msgpack stores every float exactly
(documents and plans round-trip bit for bit); JSON has neither, and ptrace writes strict JSON
only, so ``plain(..., json=True)`` writes a non-finite float as ``null``, and reading ``null``
into a field annotated ``float`` gives NaN back (into ``float | None``: None).

Bytes from outside become plain values through :func:`unpack` only: msgpack, no extension
types, nested at most :data:`MAX_DEPTH` deep.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Self

import msgpack
import numpy as np

from ptrace.errors import PtraceError, UsageError

#: The deepest nesting :func:`unpack` accepts (ptrace's own documents are about 5 deep).
MAX_DEPTH = 64
_SCALARS = (str, bytes, int, float, bool, type(None))


class RecordError(ValueError):
    """Data that is not what a record holds; the message names the node. A record raises it as
    its own kind of error (:meth:`Record.invalid`)."""


def plain(value: Any, *, json: bool = False, array: Callable[[np.ndarray], Any] | None = None) -> Any:
    """``value`` as plain values; ``json``: as strict JSON holds them (a non-finite float as
    None, bytes as their text). ``array``: what stands in for each one-dimensional numeric
    array (for a writer that writes them itself, ``compare.results``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), json=json, array=array) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v, json=json, array=array) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, json=json, array=array) for v in value]
    if isinstance(value, np.ndarray):
        if array is not None and value.ndim == 1 and value.dtype.kind in "iuf":
            return array(value)
        if json and value.dtype.kind == "f":
            values = value.astype(object)  # Python floats; the non-finite ones become None in bulk
            values[~np.isfinite(value)] = None
            return values.tolist()
        return value.tolist() if value.dtype.kind in "biuf" else plain(value.tolist(), json=json)
    if isinstance(value, np.generic):
        return plain(value.item(), json=json)
    if isinstance(value, float):
        return None if json and not math.isfinite(value) else value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if json and isinstance(value, bytes):
        return str(value)
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"a {type(value).__name__} is not a plain value")


def pack(value: Any) -> bytes:
    """Plain values as msgpack (the form documents are stored in, SPEC.md section 3)."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(payload: bytes) -> Any:
    """msgpack bytes as plain values: no extension types, at most :data:`MAX_DEPTH` deep.

    The walk is iterative, so data nested a thousand levels deep is refused here instead of
    exhausting Python's recursion in whatever reads it next."""
    def refuse_extension(code: int, data: bytes) -> Any:
        raise RecordError(f"msgpack extension type {code} is not allowed")

    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=refuse_extension)
    except (ValueError, msgpack.UnpackException) as exc:
        if isinstance(exc, RecordError):
            raise
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise RecordError(text[:160]) from None
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise RecordError(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            pending.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            pending.extend((v, depth + 1) for v in value)
        elif not isinstance(value, _SCALARS):
            raise RecordError(f"msgpack value of type {type(value).__name__} is not allowed")
    return data


def _describe(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:39] + '…'}"


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _read(cls: type, data: Any, where: str) -> Any:
    """The dataclass ``cls`` built from plain ``data``, every field checked against its
    annotation (:class:`RecordError` naming the node, ``where`` being ``data``'s own name)."""
    if not isinstance(data, dict):
        raise RecordError(f"{where} is {_describe(data)}, expected a map")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    if not getattr(cls, "ignores_unknown_keys", False):
        unknown = sorted(set(map(str, data)) - {f.name for f in fields})
        if unknown:
            raise RecordError(f"{where} has no field {', '.join(map(repr, unknown))}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where} lacks the key {f.name!r}")
            continue
        if hints[f.name] is np.ndarray:
            kwargs[f.name] = _array(data[f.name], f.metadata["dtype"], f"{where}.{f.name}")
        else:
            kwargs[f.name] = _value(data[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (and converted: lists to tuples where
    a tuple is annotated, ints to floats, None to NaN in a float, text to a path)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _read(hint, value, where)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        *others, last = [arg for arg in args if arg is not type(None)]
        for choice in others:  # ``str | Path``: the first that takes the value
            try:
                return _value(value, choice, where)
            except RecordError:
                pass
        return _value(value, last, where)
    if origin in (tuple, list) and isinstance(value, list | tuple):
        if origin is tuple and args[-1:] != (Ellipsis,):  # a fixed length: tuple[int, int | None]
            if len(value) != len(args):
                raise RecordError(f"{where} has {len(value)} items, expected {len(args)}")
            items = [_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            items = [_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (Mapping, dict) and isinstance(value, dict):
        return {_value(k, args[0], f"{where} key"): _value(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float and value is None:
        return math.nan
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if hint is Path and isinstance(value, str):
        return Path(value)
    expected = getattr(hint, "__name__", None) or getattr(origin, "__name__", str(hint))
    raise RecordError(f"{where} is {_describe(value)}, expected {expected}")


def _array(value: Any, dtype: np.dtype, where: str) -> np.ndarray:
    """A one-dimensional numeric array of ``dtype`` from a list (None is NaN in a float one)."""
    loose = np.asarray(value) if isinstance(value, list) else None
    if loose is not None and loose.ndim == 1 and loose.dtype.kind == "O":
        numbers = all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value)
        loose = loose if numbers and dtype.kind == "f" else None
    if loose is None or loose.ndim != 1 or loose.dtype.kind not in "iufO":
        raise RecordError(f"{where} is not a list of numbers")
    return loose.astype(dtype)


class Record:
    """Mixin for a frozen dataclass: ``to_dict`` / ``from_dict`` (plain values) and
    ``to_bytes`` / ``from_bytes`` (msgpack), typed by its field annotations."""

    #: Whether ``from_dict`` ignores keys the class does not know (True where newer writers may
    #: add some: stored documents and results); otherwise they are refused.
    ignores_unknown_keys: ClassVar[bool] = False

    @classmethod
    def invalid(cls, message: str) -> PtraceError:
        """The error raised for data that is not one of these (each family has its own)."""
        return UsageError(message)

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    def to_bytes(self) -> bytes:
        return pack(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Self:
        """``data`` read back; ``where`` names it in errors (default: the class's name)."""
        try:
            return _read(cls, data, where or cls.__name__)
        except RecordError as exc:
            raise cls.invalid(str(exc)) from None

    @classmethod
    def from_bytes(cls, payload: bytes) -> Self:
        try:
            data = unpack(payload)
        except RecordError as exc:
            raise cls.invalid(f"{cls.__name__} is not readable: {exc}") from None
        return cls.from_dict(data)
