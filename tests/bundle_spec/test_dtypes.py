"""Bundles' bfloat16 and float8 decoded without ml_dtypes give ml_dtypes' values, bit for bit.

Every bit pattern of each type is checked (65536 bfloat16, 256 per float8): NaNs with their
payloads and signs, infinities, subnormals, both zeros.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ptrace.bundle_spec import dtypes

BIT_STORED = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}


@pytest.mark.parametrize("logical", BIT_STORED)
def test_every_bit_pattern_decodes_to_ml_dtypes_float32_bits(logical):
    storage = BIT_STORED[logical]
    patterns = np.arange(np.iinfo(storage).max + 1, dtype=np.int64).astype(storage)
    expected = patterns.view(getattr(ml_dtypes, logical)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        decoded = dtypes.to_float(patterns, logical)
    assert decoded.dtype == np.float32
    mismatched = np.flatnonzero(decoded.view(np.uint32) != expected.view(np.uint32))
    assert mismatched.size == 0, [hex(int(patterns[i])) for i in mismatched[:8]]
    # the cases the table must get right are there: NaN, both infinities (e4m3fn has none), -0
    assert np.isnan(decoded).any() and (decoded.view(np.uint32) == 0x80000000).sum() == 1
    assert np.isinf(decoded).sum() == (0 if logical == "float8_e4m3fn" else 2)


def test_decoding_keeps_the_shape_and_leaves_native_dtypes_alone():
    bits = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    assert dtypes.to_float(bits, "bfloat16").shape == (2, 3, 4)
    assert dtypes.to_float(bits[:, 1], "bfloat16").shape == (2, 4)  # a strided view
    values = np.ones((2, 3), np.float16)
    assert dtypes.to_float(values, "float16") is values


def test_the_storage_view_round_trips_through_the_logical_dtype():
    values = np.array([1.5, -2.25, np.inf], ml_dtypes.bfloat16)
    stored = dtypes.to_storage(values)
    assert stored.dtype == np.uint16
    assert dtypes.from_storage(stored, "bfloat16").dtype == values.dtype
    np.testing.assert_array_equal(dtypes.to_float(stored, "bfloat16"), values.astype(np.float32))
