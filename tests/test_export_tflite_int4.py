"""INT4 packing of LiteRT filters (keras_qat.export.tflite.int4)."""

import numpy as np

from keras_qat.export.tflite.int4 import pack_int4_filters, pack_nibbles


def test_nibbles_are_packed_low_first_and_an_odd_count_is_padded():
    values = np.array([-8, 7, -1, 0, 3])
    packed = np.frombuffer(pack_nibbles(values), np.uint8)
    low, high = packed & 0xF, packed >> 4
    unpacked = np.stack([low, high], axis=1).reshape(-1).astype(np.int64)
    signed = np.where(unpacked >= 8, unpacked - 16, unpacked)
    assert signed[: values.size].tolist() == values.tolist() and signed[values.size] == 0


def test_a_flatbuffer_without_low_bit_kernels_is_returned_untouched():
    content = b"not even a flatbuffer"
    assert pack_int4_filters(content, []) == (content, 0)
