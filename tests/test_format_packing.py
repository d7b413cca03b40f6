"""Bit packing: exact round trips at every width, the documented layout, the size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_qat.format.packing import pack, packed_size, unpack

pytestmark = pytest.mark.api


@given(bits=st.integers(2, 16), data=st.data())
def test_unpack_returns_what_was_packed(bits, data):
    count = data.draw(st.integers(0, 300))
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = np.array(data.draw(st.lists(st.integers(low, high), min_size=count, max_size=count)), np.int64)
    packed = pack(values, bits)
    assert len(packed) == packed_size(count, bits) == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits, count), values)


def test_layout_is_a_little_endian_bit_stream_of_offset_codes():
    # 3-bit values -4, 3, 0 -> codes 0b000, 0b111, 0b100 -> stream bits 000 111 001 (LSB first)
    # -> byte 0 = bits 0..7 = 0,0,0,1,1,1,0,0 -> 0b00111000; byte 1 = bit 8 = 1 -> 0b1.
    assert pack(np.array([-4, 3, 0]), 3) == bytes([0b00111000, 0b00000001])
    # 4-bit: two values per byte, the first in the low nibble.
    assert pack(np.array([-8, 7]), 4) == bytes([0xF0])


def test_out_of_range_values_and_short_data_are_rejected():
    with pytest.raises(ValueError, match=r"\[-8, 7\] for 4 bits"):
        pack(np.array([8]), 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack(b"\x00", 4, 3)
