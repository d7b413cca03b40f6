"""keras_qat.grid: the one integer grid of a tensor.

Oracles: the TFLite converter itself (the scale and zero point it writes for a fake-quant range),
exact rational arithmetic (Python's ``fractions``) for the bias codes, and TF's fake-quant op for
what the grid's integers dequantize to.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_qat import grid as grids
from keras_qat.grid import IntegerGrid, from_range, quantize_bias
from tests.conftest import same_bits, tf_fake_quant

pytestmark = pytest.mark.numerics


def _random_ranges(count: int, seed: int):
    rng = np.random.default_rng(seed)
    magnitude = rng.choice([1e-3, 1.0, 100.0], size=(2, count))
    lo = -np.abs(rng.normal(size=count) * magnitude[0]).astype(np.float32)
    hi = np.abs(rng.normal(size=count) * magnitude[1]).astype(np.float32)
    lo[0], hi[1] = 0.0, 0.0  # ranges that end at zero
    return lo, hi


def _converter_quantization(lo, hi, narrow_range: bool):
    """``(scale, zero point)`` the TFLite converter writes for FakeQuant on each range."""
    tf = pytest.importorskip("tensorflow")
    from ai_edge_litert.interpreter import Interpreter

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def ranges(x):
        return [
            tf.identity(
                tf.quantization.fake_quant_with_min_max_vars(x * float(i + 1), lo[i], hi[i], narrow_range=narrow_range),
                name=f"out{i}",
            )
            for i in range(len(lo))
        ]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([ranges.get_concrete_function()], ranges)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    interpreter = Interpreter(model_content=converter.convert())
    found = {}
    for detail in interpreter.get_tensor_details():
        name = detail["name"]
        if name.startswith("FakeQuantWithMinMaxVars") and detail["dtype"] == np.int8:
            index = int(name.split(";")[0].removeprefix("FakeQuantWithMinMaxVars").lstrip("_") or 0)
            found[index] = detail["quantization"]
    return [found[i] for i in range(len(lo))]


@pytest.mark.parametrize("narrow_range", [False, True])
def test_scale_and_zero_point_are_the_converters(narrow_range):
    lo, hi = _random_ranges(32, seed=int(narrow_range))
    for i, (scale, zero_point) in enumerate(_converter_quantization(lo, hi, narrow_range)):
        grid = from_range(lo[i], hi[i], 8, narrow_range).as_signed()
        assert np.float32(grid.scale) == np.float32(scale), (lo[i], hi[i])
        assert int(grid.zero_point) == zero_point, (lo[i], hi[i])


def test_graph_grid_equals_numpy_grid():
    keras = pytest.importorskip("keras")
    from keras_qat import ops as qops

    if not qops.exact_integer_arithmetic():
        pytest.skip("the graph grid is computed in float64, which this backend lacks (JAX without x64)")
    lo, hi = _random_ranges(64, seed=2)
    for bits, narrow in ((2, True), (4, False), (8, True), (16, False)):
        exact = from_range(lo, hi, bits, narrow)
        graph = from_range(keras.ops.convert_to_tensor(lo), keras.ops.convert_to_tensor(hi), bits, narrow, xp=keras.ops)
        assert same_bits(keras.ops.convert_to_numpy(graph.scale), exact.scale)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(graph.zero_point), exact.zero_point)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
def test_codes_of_fake_quantized_values_dequantize_to_them(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(5, 3, 4)).astype(np.float32)
    hi = np.abs(x).max(axis=(0, 1)).astype(np.float32)
    on_grid = tf_fake_quant(x, -hi, hi, bits, True, axis=-1)
    grid = from_range(-hi, hi, bits, narrow_range=True, axes=(2,)).as_signed()
    codes = grid.centered_codes(on_grid) + grid.along(grid.zero_point, x.shape)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert same_bits(grid.dequantize(codes), on_grid)


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_codes_in_a_graph_are_the_exact_codes_of_every_value_on_the_grid(bits):
    """The graph's codes (a multiply by the scale's reciprocal) equal NumPy's (a float32 division)
    for every code of asymmetric grids of small, unit and large scales, as TF's fake quantization
    writes the values."""
    import keras

    lo, hi = _random_ranges(16, seed=bits)
    steps = np.arange(2**bits, dtype=np.float32)[:, None]
    x = (lo + steps * (hi - lo) / np.float32(2**bits - 1)).astype(np.float32)  # every code, per range
    on_grid = tf_fake_quant(x, lo, hi, bits, False, axis=-1)
    grid = from_range(lo, hi, bits, narrow_range=False, axes=(1,))
    exact = grid.centered_codes(on_grid)
    in_graph = keras.ops.convert_to_numpy(grid.centered_codes(keras.ops.convert_to_tensor(on_grid), xp=keras.ops))
    np.testing.assert_array_equal(in_graph, exact)
    zero_point = grid.along(grid.zero_point, on_grid.shape)
    assert all(len(np.unique(exact[:, c])) == 2**bits for c in range(exact.shape[1]) if grid.scale[c] > 0)
    np.testing.assert_array_equal(exact + zero_point, np.clip(exact + zero_point, grid.qmin, grid.qmax))


@given(
    bits=st.integers(2, 16),
    narrow=st.booleans(),
    lo=st.floats(-1e3, 0.0, width=32),
    hi=st.floats(0.0, 1e3, width=32),
)
def test_signed_and_unsigned_forms_are_one_grid(bits, narrow, lo, hi):
    unsigned = from_range(np.float32(lo), np.float32(hi), bits, narrow)
    signed = unsigned.as_signed()
    assert signed.qmax - signed.qmin == unsigned.qmax - unsigned.qmin == 2**bits - 1 - int(narrow)
    assert signed.qmin == unsigned.qmin - 2 ** (bits - 1)
    assert signed.as_unsigned() == unsigned
    assert unsigned.qmin <= int(unsigned.zero_point) <= unsigned.qmax
    codes = np.arange(signed.qmin, signed.qmax + 1)
    assert same_bits(signed.dequantize(codes), unsigned.dequantize(codes - signed.qmin + unsigned.qmin))


def test_quantize_rounds_half_away_from_zero_and_clamps():
    grid = IntegerGrid(np.float32(0.5), 3, -8, 7, 4, signed=True)
    x = np.array([0.25, -0.25, 0.75, -0.75, 100.0, -100.0, np.inf], np.float32)
    np.testing.assert_array_equal(grid.quantize(x), [4, 2, 5, 1, 7, -8, 7])


def test_degenerate_range_gives_scale_zero_and_zero_values():
    grid = from_range(np.float32(0.0), np.float32(0.0), 8).as_signed()
    assert float(grid.scale) == 0.0 and int(grid.zero_point) == 0
    codes = np.arange(grid.qmin, grid.qmax + 1)
    np.testing.assert_array_equal(grid.dequantize(codes) * 0, 0)


def test_bias_codes_are_rounded_half_away_at_input_times_weight_scale():
    rng = np.random.default_rng(3)
    input_scale = np.float32(0.0123)
    weight_scale = rng.uniform(1e-4, 1e-1, size=16).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    product = input_scale.astype(np.float64) * weight_scale.astype(np.float64)
    bias[:2] = product[:2] * np.array([2.5, -3.5])  # exact ties
    codes = quantize_bias(bias, input_scale, weight_scale)
    for value, scale, code in zip(bias, product, codes):
        exact = Fraction(float(value)) / Fraction(float(scale))
        floor = exact.numerator // exact.denominator
        half_away = floor + 1 if (exact - floor > Fraction(1, 2) or (exact - floor == Fraction(1, 2) and exact > 0)) else floor
        assert code == half_away


def test_a_grid_keeps_the_float64_scale_that_the_converter_quantizes_biases_at():
    """The converter holds ``(max - min) / (qmax - qmin)`` in float64 and quantizes biases at
    products of those; the flatbuffer stores them rounded to float32 (:func:`from_range`)."""
    import keras

    from keras_qat import ops as qops

    lo, hi = _random_ranges(32, 7)
    for narrow, levels in ((False, 255), (True, 254)):
        want = (hi.astype(np.float64) - lo.astype(np.float64)) / levels
        # In a graph the float64 scale needs float64 on the backend (JAX only with x64).
        for xp in (np, keras.ops) if qops.exact_integer_arithmetic() else (np,):
            grid = from_range(lo, hi, 8, narrow, axes=(0,), xp=xp).as_signed()
            exact = np.asarray(keras.ops.convert_to_numpy(grid.bias_scale(xp)))
            assert exact.dtype == np.float64
            np.testing.assert_array_equal(exact, want)
            np.testing.assert_array_equal(np.asarray(keras.ops.convert_to_numpy(grid.scale)), want.astype(np.float32))
    by_hand = IntegerGrid(np.float32(0.1), 0, -128, 127, 8, signed=True)
    assert by_hand.bias_scale() == np.float64(np.float32(0.1))


def test_bits_are_validated_with_the_owner_named():
    with pytest.raises(ValueError, match="grid: num_bits=17"):
        from_range(np.float32(-1), np.float32(1), 17)
    with pytest.raises(ValueError, match="pack: num_bits must be an integer"):
        grids.validate_num_bits(4.0, "pack")
