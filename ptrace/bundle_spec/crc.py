"""CRC-32C of a concatenation from the CRC-32Cs of its parts, without their bytes.

A version 2 bundle records the CRC-32C of every segment of a data array (its segment table) and
of the whole array (its manifest record). That the two agree can be checked without reading a
chunk: the CRC of ``A + B`` is the CRC of ``A`` advanced over ``len(B)`` zero bytes, xor the CRC
of ``B`` (zlib's ``crc32_combine``, for the CRC-32C polynomial). Advancing over ``n`` zero bytes
is a linear map on the 32-bit register: the maps for ``2**k`` bytes are squared from the one
for a single zero bit and kept as byte tables, so each combination costs four lookups per set
bit of ``n``.
"""

from __future__ import annotations

from functools import cache

#: The CRC-32C (Castagnoli) polynomial, bit-reflected.
_POLYNOMIAL = 0x82F63B78
#: Lengths up to 2**64 bytes.
_MAX_POWERS = 64


def _apply(matrix: tuple[int, ...], vector: int) -> int:
    """The 32x32 bit matrix (one int per column) times ``vector``."""
    result, column = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[column]
        vector >>= 1
        column += 1
    return result


def _square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_apply(matrix, column) for column in matrix)


@cache
def _zero_bytes_operators() -> tuple[tuple[int, ...], ...]:
    """The maps that advance the register over ``2**k`` zero bytes, for every ``k``."""
    one_bit = (_POLYNOMIAL, *(1 << row for row in range(31)))
    operator = _square(_square(_square(one_bit)))  # eight zero bits: one byte
    operators = []
    for _ in range(_MAX_POWERS):
        operators.append(operator)
        operator = _square(operator)
    return tuple(operators)


@cache
def _byte_tables(power: int) -> tuple[tuple[int, ...], ...]:
    """The map for ``2**power`` zero bytes as four tables, one per byte of the register: a map is
    linear, so each entry is the xor of the columns of its byte's set bits."""
    matrix = _zero_bytes_operators()[power]
    tables = []
    for byte in range(4):
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ matrix[8 * byte + low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def combine(first: int, second: int, second_bytes: int) -> int:
    """The CRC-32C of ``A + B`` from ``first`` (of ``A``), ``second`` (of ``B``) and ``len(B)``."""
    power = 0
    while second_bytes >> power:
        if second_bytes >> power & 1:
            t0, t1, t2, t3 = _byte_tables(power)
            first = t0[first & 255] ^ t1[first >> 8 & 255] ^ t2[first >> 16 & 255] ^ t3[first >> 24]
        power += 1
    return first ^ second
