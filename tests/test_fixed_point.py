"""TFLite's fixed-point requantization (``keras_qat.fixed_point``).

Oracle: the formulas of gemmlowp and TFLite's ``QuantizeMultiplier`` evaluated with Python's
exact integers (and ``math.frexp``), element by element.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_qat import fixed_point as fp
from keras_qat import ops as qops
from tests.conftest import exact_multiply_by_quantized_multiplier, exact_multiply_single_rounding

pytestmark = pytest.mark.numerics

INT32 = st.integers(-(2**31) + 1, 2**31 - 1)


def _quantize_multiplier(m: float) -> tuple[int, int]:
    if m == 0:
        return 0, 0
    mantissa, shift = math.frexp(m)
    q = int(math.copysign(math.floor(abs(mantissa) * 2**31 + 0.5), mantissa))
    if q == 2**31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q, shift


MULTIPLIERS = st.floats(min_value=2.0**-20, max_value=4.0, allow_nan=False, allow_infinity=False)


@given(st.lists(MULTIPLIERS, min_size=1, max_size=20))
def test_quantize_multiplier_is_tflites(multipliers):
    m0, shift = fp.quantize_multiplier(np.array(multipliers))
    expected = [_quantize_multiplier(m) for m in multipliers]
    assert [(int(a), int(b)) for a, b in zip(m0, shift)] == expected


def test_quantize_multiplier_flushes_tiny_and_zero_and_rejects_negative():
    m0, shift = fp.quantize_multiplier(np.array([0.0, 2.0**-40]))
    assert m0.tolist() == [0, 0] and shift.tolist() == [0, 0]
    with pytest.raises(ValueError, match="finite and >= 0"):
        fp.quantize_multiplier(np.array([-1.0]))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(-(2**22), 2**22), st.floats(2.0**-16, 0.99)), min_size=1, max_size=30))
def test_multiply_by_quantized_multiplier_is_gemmlowps_double_rounding(pairs):
    x = np.array([p[0] for p in pairs], dtype=np.int64)
    m0, shift = fp.quantize_multiplier(np.array([p[1] for p in pairs]))
    got = fp.multiply_by_quantized_multiplier(np, x, m0, shift)
    assert got.tolist() == [exact_multiply_by_quantized_multiplier(int(a), int(b), int(c)) for a, b, c in zip(x, m0, shift)]
    single = fp.multiply_by_quantized_multiplier_single_rounding(np, x, m0, shift)
    assert single.tolist() == [exact_multiply_single_rounding(int(a), int(b), int(c)) for a, b, c in zip(x, m0, shift)]


def test_double_rounding_differs_from_single_rounding_just_below_a_half():
    """The reason QAT inference reproduces the kernels: 11.499973 rounds to 12 in TFLite's
    convolutions. Found by search, then checked against the exact-integer oracle."""
    m0, shift = fp.quantize_multiplier(np.array([0.0029]))
    x = np.arange(-20000, 20000, dtype=np.int64)
    double = fp.multiply_by_quantized_multiplier(np, x, m0, shift)
    single = fp.multiply_by_quantized_multiplier_single_rounding(np, x, m0, shift)
    differ = np.flatnonzero(double != single)
    assert differ.size > 0
    for index in differ[:20]:
        value = int(x[index])
        assert int(double[index]) == exact_multiply_by_quantized_multiplier(value, int(m0[0]), int(shift[0]))
        assert int(single[index]) == exact_multiply_single_rounding(value, int(m0[0]), int(shift[0]))


@pytest.mark.skipif(not qops.exact_integer_arithmetic(), reason="needs int64 and float64 on the backend")
@given(st.lists(MULTIPLIERS, min_size=1, max_size=20), st.lists(st.integers(-(2**20), 2**20), min_size=20, max_size=20))
def test_graph_versions_equal_the_numpy_ones(multipliers, values):
    ops = keras.ops
    m = np.array(multipliers)
    m0, shift = fp.quantize_multiplier(m)
    m0_graph, shift_graph = fp.quantize_multiplier(ops.convert_to_tensor(m), ops)
    np.testing.assert_array_equal(ops.convert_to_numpy(m0_graph), m0)
    np.testing.assert_array_equal(ops.convert_to_numpy(shift_graph), shift)
    x = np.array(values[: len(m)], dtype=np.int64)
    in_graph = fp.multiply_by_quantized_multiplier(ops, ops.convert_to_tensor(x), m0_graph, shift_graph)
    np.testing.assert_array_equal(ops.convert_to_numpy(in_graph), fp.multiply_by_quantized_multiplier(np, x, m0, shift))
