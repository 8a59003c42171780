"""Logical dtypes (SPEC.md section 4): storing bfloat16 and float8 losslessly in Zarr v3.

Zarr v3 has no bfloat16, so such arrays are stored bit-for-bit as unsigned integers of the
same width and tagged with their logical dtype; ``ml_dtypes`` gives numpy the real types back.

Importing ``ml_dtypes`` costs up to a second (0.7 s for version 0.7 on a 2-core machine, most of
a small ``ptrace compare``), so it is imported only where an array is handed out in one of its
types (:func:`numpy_dtype`). Code that only needs the values decodes the stored bits with numpy
instead (:func:`to_float`, bit-identical to ml_dtypes' conversion): bfloat16 is the high half of
a float32, and a float8 has 256 values, looked up in a table.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ptrace.errors import BundleCorruptError, BundleError

#: Logical dtypes that Zarr cannot hold natively -> their storage type.
_BIT_STORED: dict[str, np.dtype] = {
    "bfloat16": np.dtype(np.uint16),
    "float8_e4m3fn": np.dtype(np.uint8),
    "float8_e5m2": np.dtype(np.uint8),
}

#: Bit layout of each float8: (exponent bits, mantissa bits, whether the all-ones exponent holds
#: infinity and NaNs as IEEE's does; e4m3fn's ("finite") holds numbers there, NaN only at S.1111.111).
_FLOAT8_LAYOUTS = {"float8_e4m3fn": (4, 3, False), "float8_e5m2": (5, 2, True)}

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
    """The numpy dtype of a logical dtype; bfloat16 and float8 import ml_dtypes (see above)."""
    if logical in _BIT_STORED:
        import ml_dtypes  # here, not at the top: only arrays handed out in these types need it

        return np.dtype(getattr(ml_dtypes, logical))
    if logical in _NATIVE:
        return np.dtype(logical)
    raise BundleCorruptError(f"unknown logical dtype {logical!r}")


def storage_dtype(logical: str) -> np.dtype:
    """The dtype the Zarr array is declared with for a logical dtype."""
    if logical in _BIT_STORED:
        return _BIT_STORED[logical]
    return numpy_dtype(logical)


def to_storage(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` in its storage dtype (no copy), little endian."""
    logical = logical_name(array.dtype)
    stored = array.view(storage_dtype(logical)) if logical in _BIT_STORED else array
    return stored.astype(stored.dtype.newbyteorder("<"), copy=False)


def from_storage(array: np.ndarray, logical: str) -> np.ndarray:
    """The logical view of an array read from storage (no copy)."""
    return array.view(numpy_dtype(logical)) if logical in _BIT_STORED else array


def to_float(stored: np.ndarray, logical: str) -> np.ndarray:
    """The values of an array in storage dtype (as read, logical dtype ``logical``) as a numpy
    float array, without ml_dtypes: bfloat16 and float8 as float32, bit for bit what ml_dtypes'
    ``astype(np.float32)`` gives (NaN payloads included); native dtypes as they are (no copy).
    An array that is not in ``logical``'s storage dtype is refused: its bundle's manifest and
    the array's own metadata disagree."""
    if stored.dtype != storage_dtype(logical):
        raise BundleCorruptError(f"an array stored as {stored.dtype} is declared {logical} in the manifest",
                                 hint="check the bundle with `ptrace validate`")
    if logical == "bfloat16":
        return bfloat16_to_float32(stored)
    if logical in _FLOAT8_LAYOUTS:
        return _float8_table(logical)[stored]
    return stored


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) as float32: bfloat16 is the high half of a float32."""
    widened = bits.astype(np.uint32)
    widened <<= 16
    return widened.view(np.float32)


@cache
def _float8_table(logical: str) -> np.ndarray:
    """Every value of a float8 type as float32, indexed by its bit pattern (256 entries).

    NaNs are float32's quiet NaN with the pattern's sign, as ml_dtypes converts them."""
    exponent_bits, mantissa_bits, ieee_specials = _FLOAT8_LAYOUTS[logical]
    bits = np.arange(256, dtype=np.uint32)
    sign = np.where(bits >> 7, -1.0, 1.0)
    exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = bits & ((1 << mantissa_bits) - 1)
    bias = (1 << (exponent_bits - 1)) - 1
    top = (1 << exponent_bits) - 1
    # Normal numbers have an implicit leading 1; subnormals (exponent 0) are scaled as exponent 1.
    significand = np.where(exponent > 0, (1 << mantissa_bits) + mantissa, mantissa).astype(np.float64)
    scale = np.maximum(exponent.astype(np.int64), 1) - bias - mantissa_bits
    values = sign * np.ldexp(significand, scale)
    nan = np.copysign(np.nan, sign)
    if ieee_specials:
        values = np.where(exponent == top, np.where(mantissa == 0, sign * np.inf, nan), values)
    else:
        values = np.where((exponent == top) & (mantissa == (1 << mantissa_bits) - 1), nan, values)
    table = values.astype(np.float32)
    table.flags.writeable = False
    return table
