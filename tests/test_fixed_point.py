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


def _near_ties(multiplier: float, limit: int, rng) -> np.ndarray:
    """Accumulators within two of each point where ``x * multiplier`` is half an output step
    from an integer (where the two roundings decide), and random ones."""
    k = np.arange(-limit - 2, limit + 2) + 0.5
    ties = np.round(k / multiplier).astype(np.int64)[:, None] + np.arange(-2, 3)[None, :]
    spread = rng.integers(-(2**31) + 1, 2**31 - 1, size=64)
    return np.clip(np.concatenate([ties.reshape(-1), spread]), -(2**31) + 1, 2**31 - 1)


def _requantization_cases(lowest: int):
    """Multipliers from ``2**lowest`` to 8 (powers of two among them), output limits, both
    roundings, and seeds for :func:`_near_ties`."""
    return given(
        multiplier=st.one_of(st.floats(2.0**lowest, 8.0), st.integers(lowest, 3).map(lambda e: 2.0**e)),
        limit=st.sampled_from([1, 7, 127, 255]),
        single_rounding=st.booleans(),
        seed=st.integers(0, 2**16),
    )


@settings(max_examples=120)
@_requantization_cases(lowest=-31)
def test_float64_requantization_is_the_kernels(multiplier, limit, single_rounding, seed):
    """The float64 form equals the exact-integer oracle on every int32 accumulator, at the
    points where the two roundings decide and at random ones, for every multiplier down to
    2**-31 (an ADD's output multiplier is about 2**-20)."""
    x = _near_ties(multiplier, limit, np.random.default_rng(seed))
    m0, shift = fp.quantize_multiplier(np.array([multiplier]))
    got = fp.multiply_by_quantized_multiplier_float64(np, x.astype(np.float64), m0, shift, single_rounding)
    oracle = exact_multiply_single_rounding if single_rounding else exact_multiply_by_quantized_multiplier
    expected = [oracle(int(value), int(m0[0]), int(shift[0])) for value in x]
    assert got.tolist() == [float(e) for e in expected]


@settings(max_examples=80)
@_requantization_cases(lowest=-12)
def test_clipped_requantization_is_the_kernels_within_its_limit(multiplier, limit, single_rounding, seed):
    """The clipped form equals the exact-integer oracle wherever the kernel's result is within
    ``limit``, keeps sign and magnitude beyond it, and holds every 8-bit multiplier down to 2**-12."""
    x = _near_ties(multiplier, limit, np.random.default_rng(seed))
    m0, shift = fp.quantize_multiplier(np.array([multiplier]))
    assert bool(fp.clipped_float64_fits(np, m0, shift, float(limit)))
    got = fp.multiply_by_quantized_multiplier_clipped(np, x.astype(np.float64), m0, shift, single_rounding)
    oracle = exact_multiply_single_rounding if single_rounding else exact_multiply_by_quantized_multiplier
    expected = np.array([oracle(int(value), int(m0[0]), int(shift[0])) for value in x], dtype=np.float64)
    inside = np.abs(expected) <= limit
    np.testing.assert_array_equal(got[inside], expected[inside])
    assert np.all(np.sign(got[~inside]) == np.sign(expected[~inside])) and np.all(np.abs(got[~inside]) > limit)


def test_clipped_requantization_reports_multipliers_it_cannot_hold():
    """A multiplier so small that the clipped accumulator times ``m0`` passes 2**52 (an ADD's
    output multiplier): not exact, so the caller takes the split form."""
    m0, shift = fp.quantize_multiplier(np.array([2.0**-30, 0.5]))
    assert not bool(fp.clipped_float64_fits(np, m0, shift, 255.0))
    assert bool(fp.clipped_float64_fits(np, m0[1:], shift[1:], 255.0))


@settings(max_examples=40)
@given(multiplier=st.floats(2.0**-8, 0.5), seed=st.integers(0, 2**16), left_shift=st.sampled_from([15, 20]))
def test_float64_rescaling_with_a_left_shift_is_adds(multiplier, seed, left_shift):
    """ADD's input rescaling (codes shifted up ``left_shift`` bits first) as the oracle computes it."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-(2**16), 2**16, size=200)
    m0, shift = fp.quantize_multiplier(np.array([multiplier]))
    got = fp.multiply_by_quantized_multiplier_float64(np, codes.astype(np.float64), m0, shift, left_shift=left_shift)
    expected = [exact_multiply_by_quantized_multiplier(int(c) << left_shift, int(m0[0]), int(shift[0])) for c in codes]
    assert got.tolist() == [float(e) for e in expected]


def test_float64_requantization_is_exact_up_to_its_bound():
    """The largest accumulators it promises (just under 2**37), with the widest mantissa halves."""
    x = np.array([fp.FLOAT64_EXACT_BOUND - 1, -(fp.FLOAT64_EXACT_BOUND - 1), 2**31 - 1, -(2**31)], dtype=np.float64)
    for m0, shift in [(2**31 - 1, -31), (2**31 - 1, 0), (2**30 + 2**16 - 1, -5), (2**30, -20)]:
        got = fp.multiply_by_quantized_multiplier_float64(np, x, np.int64(m0), np.int64(shift))
        expected = [exact_multiply_by_quantized_multiplier(int(v), m0, shift) for v in x]
        assert got.tolist() == [float(e) for e in expected]
