"""Integers packed at their bit width: a 4-bit tensor takes half a byte a value, 3-bit 3/8.

Layout (documented for readers in other languages): the signed values ``v`` of a tensor,
in C order, are offset to unsigned codes ``u = v + 2**(bits - 1)`` (``0 <= u < 2**bits``)
and written as one little-endian bit stream: code ``i`` occupies bits
``[i * bits, (i + 1) * bits)``, least significant bit first, where bit ``k`` of the stream
is bit ``k % 8`` of byte ``k // 8``. The last byte is padded with zero bits.
"""

from __future__ import annotations

import numpy as np

from keras_qat.grid import validate_num_bits


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take."""
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack signed integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` at ``bits`` bits each."""
    bits = validate_num_bits(bits, "pack")
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"pack: values must lie in [{low}, {high}] for {bits} bits, got [{flat.min()}, {flat.max()}].")
    codes = (flat + 2 ** (bits - 1)).astype(np.uint32)
    # One row of bits per value, least significant first, then the whole stream as bytes.
    stream = ((codes[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def unpack(data: bytes, bits: int, count: int, dtype=np.int32) -> np.ndarray:
    """The ``count`` signed integers that :func:`pack` wrote at ``bits`` bits each."""
    bits = validate_num_bits(bits, "unpack")
    needed = packed_size(count, bits)
    if len(data) < needed:
        raise ValueError(f"unpack: {count} values of {bits} bits need {needed} bytes, got {len(data)}.")
    stream = np.unpackbits(np.frombuffer(data, np.uint8, count=needed), bitorder="little")[: count * bits]
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    codes = (stream.reshape(count, bits).astype(np.uint32) * weights).sum(axis=1, dtype=np.uint64)
    return (codes.astype(np.int64) - 2 ** (bits - 1)).astype(dtype)


def read_weight(entry: dict, payload: bytes) -> np.ndarray:
    """A manifest weight (``{"offset", "nbytes", "shape", "bits", "encoding"}``, see
    :mod:`keras_qat.format.manifest`) read from the payload: int64 values in its shape."""
    data = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
    count = int(np.prod(entry["shape"])) if entry["shape"] else 1
    if entry["encoding"] in ("int32", "int64"):
        dtype = "<i4" if entry["encoding"] == "int32" else "<i8"
        values = np.frombuffer(data, dtype=dtype, count=count).astype(np.int64)
    else:
        values = unpack(data, entry["bits"], count, dtype=np.int64)
    return values.reshape(entry["shape"])


__all__ = ["pack", "unpack", "packed_size", "read_weight"]
