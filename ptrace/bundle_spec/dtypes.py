"""Logical dtypes (SPEC.md section 4): storing bfloat16 and float8 losslessly in Zarr v3.

Zarr v3 has no bfloat16, so such arrays are stored bit-for-bit as unsigned integers of the
same width and tagged with their logical dtype; ``ml_dtypes`` gives numpy the real types back.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ptrace.errors import BundleCorruptError, BundleError

#: Logical dtypes that Zarr cannot hold natively -> (numpy type, storage type).
_BIT_STORED: dict[str, tuple[np.dtype, np.dtype]] = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)),
    "float8_e4m3fn": (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.uint8)),
    "float8_e5m2": (np.dtype(ml_dtypes.float8_e5m2), np.dtype(np.uint8)),
}

_NATIVE = {"float64", "float32", "float16", "int64", "int32", "int16", "int8",
           "uint64", "uint32", "uint16", "uint8", "bool"}


def is_logical(name: str) -> bool:
    """Whether ``name`` is one of the spec's logical dtypes."""
    return name in _BIT_STORED or name in _NATIVE


def logical_name(dtype: np.dtype) -> str:
    """The spec's name for a numpy dtype (``bfloat16`` for ml_dtypes' bfloat16)."""
    name = np.dtype(dtype).name
    if is_logical(name):
        return name
    raise BundleError(f"dtype {name} cannot be stored in a ptrace bundle",
                      hint="bundles store float64/32/16, bfloat16, float8 and integer tensors")


def numpy_dtype(logical: str) -> np.dtype:
    if logical in _BIT_STORED:
        return _BIT_STORED[logical][0]
    if logical in _NATIVE:
        return np.dtype(logical)
    raise BundleCorruptError(f"unknown logical dtype {logical!r}")


def storage_dtype(logical: str) -> np.dtype:
    """The dtype the Zarr array is declared with for a logical dtype."""
    if logical in _BIT_STORED:
        return _BIT_STORED[logical][1]
    return numpy_dtype(logical)


def to_storage(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` in its storage dtype (no copy), little endian."""
    logical = logical_name(array.dtype)
    stored = array.view(storage_dtype(logical)) if logical in _BIT_STORED else array
    return stored.astype(stored.dtype.newbyteorder("<"), copy=False)


def from_storage(array: np.ndarray, logical: str) -> np.ndarray:
    """The logical view of an array read from storage (no copy)."""
    return array.view(numpy_dtype(logical)) if logical in _BIT_STORED else array
