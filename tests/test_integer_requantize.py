"""Requantization (keras_qat.integer.requantize) against exact-integer oracles."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import keras
import tensorflow as tf

from keras_qat import ops as qops
from keras_qat.grid import IntegerGrid, from_range
from keras_qat.integer import AddOp, KernelOp, MeanOp, Requantize
from tests.conftest import exact_multiply_by_quantized_multiplier, exact_multiply_single_rounding


def _grid(bits: int) -> IntegerGrid:
    return IntegerGrid(np.float32(1.0), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, bits, signed=True)


def test_accumulators_beyond_int32_requantize_exactly():
    """16-bit operands make accumulators wider than int32; NumPy takes the fixed-point
    product in exact integers there. Oracle: gemmlowp's formulas on Python integers."""
    grid = _grid(16)
    requantize = Requantize.lower(np.array([3.1e-6, 7.7e-7]), grid)
    accumulator = np.array([[2**33 + 12345, -(2**34) - 999], [2**31 + 1, -(2**31) - 3]], dtype=np.int64)
    got = requantize(accumulator)
    m0, shift = requantize.m0, requantize.shift
    want = [[exact_multiply_by_quantized_multiplier(int(a), int(m0[j]), int(shift[j])) for j, a in enumerate(row)] for row in accumulator]
    np.testing.assert_array_equal(got, np.clip(np.array(want), grid.qmin, grid.qmax))


@given(
    st.lists(st.integers(-(2**24), 2**24), min_size=1, max_size=40),
    st.floats(2.0**-20, 2.0),
    st.booleans(),
    st.sampled_from(["linear", "relu", "relu6"]),
)
def test_requantize_is_tflites_fixed_point_then_zero_point_then_clamp(values, multiplier, single, activation):
    out = from_range(np.float32(-1.5), np.float32(7.0), 8).as_signed()
    requantize = Requantize.lower(multiplier, out, activation, single_rounding=single)
    exact = exact_multiply_single_rounding if single else exact_multiply_by_quantized_multiplier
    low, high = out.activation_bounds(activation)
    want = [min(max(exact(v, int(requantize.m0), int(requantize.shift)) + int(out.zero_point), low), high) for v in values]
    assert requantize(np.array(values, np.int64)).tolist() == want


@pytest.mark.skipif(not qops.exact_integer_arithmetic(), reason="needs int64 and float64 on the backend")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("form", ["clipped", "split"])
@pytest.mark.parametrize(
    "multipliers", [[0.0123, 0.5, 1.9, 2.0**-7], [0.0123, 2.0**-30, 0.3]], ids=["clipped fits", "a tiny multiplier"]
)
@pytest.mark.parametrize("single", [False, True])
def test_requantize_in_a_graph_is_the_numpy_one(multipliers, single, form, compiled):
    """The inference graph's requantization (``centered``, compiled with XLA or not) gives NumPy's
    codes, near ties included: in the split form always, in the clipped form wherever
    ``clipped_fits`` says it may be taken (not with a multiplier of 2**-30)."""
    ops = keras.ops
    out = from_range(np.float32(-1.5), np.float32(7.0), 8).as_signed()
    requantize = Requantize.lower(np.array(multipliers), out, "relu6", single_rounding=single)
    rng = np.random.default_rng(0)
    ties = np.round((np.arange(-140, 140)[:, None] + 0.5) / np.array(multipliers)[None, :]).astype(np.int64)
    accumulator = np.concatenate([ties + d for d in (-1, 0, 1)] + [rng.integers(-(2**30), 2**30, (64, len(multipliers)))])
    accumulator = np.clip(accumulator, -(2**31) + 1, 2**31 - 1)  # an int32 accumulator
    graph = Requantize.lower(ops.convert_to_tensor(np.array(multipliers)), out, "relu6", single, xp=ops)
    fits = bool(ops.convert_to_numpy(graph.clipped_fits(ops)))
    assert fits == (min(multipliers) > 2.0**-20)
    if form == "clipped" and not fits:
        pytest.skip("the clipped form is not exact for a multiplier of 2**-30 (asserted above)")

    def centered(acc):
        return graph.centered(acc, ops, form=form)

    if compiled and keras.backend.backend() != "tensorflow":
        pytest.skip("qops.compiled is XLA on TensorFlow only")
    # ``compiled`` takes effect in graphs: traced here as Keras traces predict.
    run = tf.function(qops.compiled(centered)) if compiled else centered
    got = ops.convert_to_numpy(run(ops.convert_to_tensor(accumulator.astype(np.float64))))
    np.testing.assert_array_equal(got, (requantize(accumulator) - out.zero_point).astype(np.float32))


@pytest.mark.parametrize("multiplier", [np.float64(0.0123), np.array([0.5, 3e-5, 1.9])])
def test_requantize_survives_the_manifest(multiplier):
    out = from_range(np.float32(0.0), np.float32(6.0), 4).as_signed()
    requantize = Requantize.lower(multiplier, out, "relu6", single_rounding=True)
    again = Requantize.from_manifest(requantize.to_manifest(), out)
    accumulator = np.arange(-5000, 5000, 7, dtype=np.int64).reshape(-1, 1) * np.ones(np.size(multiplier), np.int64)
    np.testing.assert_array_equal(again(accumulator), requantize(accumulator))


def test_mean_divides_its_multiplier_by_the_count_in_integers():
    """TFLite's MEAN: ``m0 * 2**k // count`` with ``k = floor(log2(count))``, ``shift - k``."""
    grid = from_range(np.float32(-1.0), np.float32(1.0), 8).as_signed()
    out = from_range(np.float32(-0.5), np.float32(0.5), 8).as_signed()
    mean = MeanOp.lower(grid, out)
    m0, shift = int(mean.requantize.m0), int(mean.requantize.shift)
    count = 49
    k = min(count.bit_length() - 1, 32, 31 + shift)
    totals = np.arange(-6000, 6000, 13, dtype=np.int64)
    want = [min(max(exact_multiply_by_quantized_multiplier(int(t), (m0 << k) // count, shift - k) + int(out.zero_point), out.qmin), out.qmax) for t in totals]
    assert mean(totals, count).tolist() == want


@pytest.mark.skipif(not qops.exact_integer_arithmetic(), reason="needs int64 and float64 on the backend")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("form", ["clipped", "split"])
@pytest.mark.parametrize("bits", [(8, 8, 8), (8, 6, 8), (16, 8, 16)], ids=["int8", "mixed", "int16"])
def test_an_add_in_a_graph_is_the_numpy_one(bits, form, compiled):
    """An ADD in the inference graph (``centered``, in either form where ``clipped_fits`` allows
    it, compiled with XLA or not) gives NumPy's codes for every pair of input codes."""
    ops = keras.ops
    grids = [
        from_range(np.float32(low), np.float32(high), width).as_signed()
        for (low, high), width in zip([(-1.0, 3.0), (-0.2, 0.7), (-1.0, 4.0)], bits)
    ]
    add = AddOp.lower(*grids, "relu")
    graph = AddOp.lower(*grids, "relu", xp=ops)
    if form == "clipped":
        assert bool(ops.convert_to_numpy(graph.clipped_fits(ops)))
    if compiled and keras.backend.backend() != "tensorflow":
        pytest.skip("qops.compiled is XLA on TensorFlow only")
    codes = [np.arange(grid.qmin, grid.qmax + 1, dtype=np.int64) for grid in grids[:2]]
    step = max(1, codes[0].size // 300)
    a, b = np.meshgrid(codes[0][::step], codes[1][:: max(1, codes[1].size // 300)], indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)

    def centered(a_codes, b_codes):
        return graph.centered(a_codes, b_codes, ops, form=form)

    run = tf.function(qops.compiled(centered)) if compiled else centered
    centered_a, centered_b = (c - np.int64(g.zero_point) for c, g in zip((a, b), grids))
    got = ops.convert_to_numpy(run(*(ops.convert_to_tensor(c.astype(np.float64)) for c in (centered_a, centered_b))))
    np.testing.assert_array_equal(got, (add(centered_a, centered_b) - grids[2].zero_point).astype(np.float32))


def test_an_add_survives_the_manifest():
    grid_a = from_range(np.float32(-1.0), np.float32(3.0), 8).as_signed()
    grid_b = from_range(np.float32(-0.2), np.float32(0.7), 6).as_signed()
    out = from_range(np.float32(-1.0), np.float32(4.0), 8).as_signed()
    add = AddOp.lower(grid_a, grid_b, out, "relu")
    again = AddOp.from_manifest(add.to_manifest(), out)
    a = np.arange(-128, 128, dtype=np.int64)
    b = np.resize(np.arange(-32, 32, dtype=np.int64), a.shape)
    np.testing.assert_array_equal(again(a, b), add(a, b))


def test_a_kernel_adds_its_bias_codes_before_requantizing():
    grid = from_range(np.float32(0.0), np.float32(2.0), 8).as_signed()
    weights = IntegerGrid(np.array([0.01, 0.02], np.float32), np.zeros(2, np.int64), -127, 127, 8, signed=True, axes=(1,))
    out = from_range(np.float32(-4.0), np.float32(4.0), 8).as_signed()
    bias = np.array([0.3, -0.7], np.float32)
    kernel = KernelOp.lower(grid, weights, out, bias)
    # At the converter's scales: the input's float64 one from its range (2 / 255, whose float32
    # rounding would put -0.7 a hair the other side of -4462.5 codes); the hand-built
    # weights' float32 ones.
    product = (2.0 / 255) * weights.scale.astype(np.float64)
    half_away = [int(np.sign(r) * np.floor(abs(r) + 0.5)) for r in bias.astype(np.float64) / product]
    assert kernel.bias.tolist() == half_away == [3825, -4463]
    accumulator = np.array([[100, -2000], [-7, 31]], np.int64)
    np.testing.assert_array_equal(kernel(accumulator), kernel.requantize(accumulator + kernel.bias))
