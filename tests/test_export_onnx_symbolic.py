"""keras_qat.export.onnx.symbolic: keras-qat's integer arithmetic written as ONNX nodes.

Oracle: the same functions run on NumPy int64 (which tests/test_fixed_point.py checks against
gemmlowp's arithmetic on Python integers), element for element, against ONNX Runtime running the
nodes that :class:`OnnxOps` wrote.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from keras_qat import fixed_point as fp
from keras_qat.export.onnx.graph import GraphBuilder
from keras_qat.export.onnx.symbolic import OnnxOps
from keras_qat.grid import from_range
from keras_qat.integer import average_codes, softmax_codes

_PROTO = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


def _run(function, *arrays: np.ndarray) -> np.ndarray:
    """``function(xp, *inputs)`` written by OnnxOps and run in ONNX Runtime on ``arrays``."""
    g = GraphBuilder(opset=21)
    xp = OnnxOps(g, "test")
    names = [g.name(f"x{i}") for i in range(len(arrays))]
    values = [xp.value(name, a.dtype.name, a.shape) for name, a in zip(names, arrays)]
    result = function(xp, *values)
    inputs = [helper.make_tensor_value_info(n, _PROTO[a.dtype.name], list(a.shape)) for n, a in zip(names, arrays)]
    output = helper.make_tensor_value_info(result.name, _PROTO[result.dtype], [None] * arrays[0].ndim)
    model = helper.make_model(helper.make_graph(g.nodes, "t", inputs, [output], g.initializers), opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays)))[0]


RNG = np.random.default_rng(0)
ACCUMULATORS = np.concatenate([RNG.integers(-(2**31), 2**31, 4000), np.arange(-3000, 3000), [0, 1, -1, 2**31 - 1, -(2**31)]]).astype(np.int64)


@pytest.mark.parametrize("multiplier", [0.0003, 0.0071, 0.49999, 0.75, 1.0, 3.5, 17.0])
def test_fixed_point_requantization_matches_numpy(multiplier):
    m0, shift = fp.quantize_multiplier(np.float64(multiplier))
    small = np.clip(ACCUMULATORS, -(2**31) // 32, 2**31 // 32) if shift > 0 else ACCUMULATORS
    for function in (fp.multiply_by_quantized_multiplier, fp.multiply_by_quantized_multiplier_single_rounding):
        want = function(np, small, m0, shift)
        got = _run(lambda xp, x: function(xp, x, m0, shift), small)
        np.testing.assert_array_equal(got, want)


def test_per_channel_multipliers_broadcast_over_the_last_axis():
    m0, shift = fp.quantize_multiplier(np.array([0.002, 0.3, 0.9, 1.7]))
    x = RNG.integers(-(2**20), 2**20, (50, 3, 4)).astype(np.int64)
    np.testing.assert_array_equal(_run(lambda xp, v: fp.multiply_by_quantized_multiplier(xp, v, m0, shift), x), fp.multiply_by_quantized_multiplier(np, x, m0, shift))


def test_floor_division_and_shifts_round_as_numpy_on_negative_values():
    x = np.arange(-70, 70, dtype=np.int64)
    np.testing.assert_array_equal(_run(lambda xp, v: v // 8, x), x // 8)
    np.testing.assert_array_equal(_run(lambda xp, v: xp.right_shift(v, np.int64(3)), x), x >> 3)
    np.testing.assert_array_equal(_run(lambda xp, v: xp.bitwise_and(v, np.int64(7)), x), x & 7)
    np.testing.assert_array_equal(_run(lambda xp, v: fp.rounding_divide_by_pot(xp, v, np.int64(3)), x), fp.rounding_divide_by_pot(np, x, np.int64(3)))


def test_average_pool_rounding_and_the_integer_softmax_match_numpy():
    totals = np.arange(-40, 40, dtype=np.int64).reshape(8, 10)
    counts = np.tile(np.array([1, 2, 3, 4, 4, 6, 9, 9, 2, 4], np.int64), (8, 1))
    np.testing.assert_array_equal(_run(lambda xp, t, c: average_codes(t, c, xp), totals, counts), average_codes(totals, counts))
    codes = RNG.integers(-128, 128, (64, 10)).astype(np.int64)
    table = np.round(np.exp(-0.05 * np.arange(256)) * 2.0**30).astype(np.int64)
    np.testing.assert_array_equal(_run(lambda xp, c: softmax_codes(c, table, 256, xp), codes), softmax_codes(codes, table, 256))


def test_tflite_quantize_rounds_half_away_from_zero_as_the_grid_does():
    grid = from_range(np.float32(-1.0), np.float32(1.5), 8).as_signed()
    x = np.concatenate([RNG.uniform(-2, 2, 500), (np.arange(-130, 130) + 0.5) * float(grid.scale)]).astype(np.float32)
    np.testing.assert_array_equal(_run(lambda xp, v: grid.quantize(v, xp), x), grid.quantize(x).astype(np.float32))
