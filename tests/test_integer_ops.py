"""The QAT model's integer inference and the NumPy runtime compute the same codes, op by op.

For each integer op, one property test: on random grids (random ranges at 2..8 bits, a 16-bit
weight case, and output ranges that are exact multiples of the input's, where requantization
lands on ties) and random integer codes, the inference arithmetic of the QAT model
(:mod:`keras_qat.emulation`, keras.ops) and the runtime kernel
(:mod:`keras_qat.runtime.kernels`, NumPy on integer codes) give the same output codes, bit for
bit. LeakyReLU runs as a lookup table in the runtime, so its emulation is compared with an
exact-integer oracle of TFLite's ``QuantizeLeakyRelu`` instead; the fixed-range
requantization (softmax, sigmoid, tanh below 8 bits) with the runtime's ``SoftmaxOutput``
and with a NumPy oracle.

The grids of both sides are computed here from the quantizers' variables with
:func:`keras_qat.grid.from_range`, as the exporters compute them; the emulation's real-valued
outputs become codes on the output grid (``round(value / scale) + zero_point``).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from keras import ops

import keras_qat as kq
from keras_qat import emulation as em
from keras_qat import fixed_point as fp
from keras_qat import ops as qops
from keras_qat.grid import from_range, quantize_bias
from keras_qat.integer import AddOp, KernelOp, MeanOp, Requantize
from keras_qat.runtime import kernels as K
from tests.conftest import QuantizerHost, tf_fake_quant

L = keras.layers

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow" or not qops.exact_integer_arithmetic(),
    reason="bit-exact integer inference is checked on TensorFlow only: it needs int64/float64 "
    "(JAX only with jax_enable_x64), and with x64 JAX's float32 division still differs from "
    "NumPy's by an ulp next to half steps (QUANTIZE, kernel inputs), so not marked numerics",
)

EXAMPLES = settings(max_examples=40)

ACTIVATIONS = ("linear", "relu", "relu6")

#: Ratios of an output range to an input range that put requantized codes on exact ties.
TIE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)

activation_bits = st.integers(2, 8)
seeds = st.integers(0, 2**32 - 1)


# ---- grids -------------------------------------------------------------------------------


@st.composite
def ranges(draw):
    """A float32 ``(min, max)``: width 0.05..16, containing zero or (a quarter of the time)
    not, with zero at either end now and then."""
    width = draw(st.floats(0.05, 16.0, allow_nan=False, allow_infinity=False))
    below = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(-0.25, 1.25)))
    low = np.float32(-below * width)
    return low, np.float32(low + np.float32(width))


@st.composite
def related_ranges(draw, reference):
    """An output range: unrelated to ``reference``'s, or an exact ratio of its width."""
    if draw(st.booleans()):
        return draw(ranges())
    low, high = reference
    ratio = draw(st.sampled_from(TIE_RATIOS))
    below = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    width = np.float32((np.float64(high) - np.float64(low)) * ratio)
    return np.float32(-below * width), np.float32(width - np.float32(below * width))


def activation_source(bits: int, value_range, narrow_range: bool = False) -> em.Source:
    """A real quantizer on a host layer, its range set to ``value_range``."""
    quantizer = kq.LastValueQuantizer(num_bits=bits, narrow_range=narrow_range)
    variables = quantizer.build((), "activation", QuantizerHost(name="host"))
    variables["min_var"].assign(np.float32(value_range[0]))
    variables["max_var"].assign(np.float32(value_range[1]))
    return em.Source(quantizer, variables)


def grid_of(source: em.Source, axes=()):
    """The deployed grid (signed codes) of ``source``'s range, as an exporter computes it."""
    quantizer = source.quantizer
    lo = ops.convert_to_numpy(source.variables["min_var"])
    hi = ops.convert_to_numpy(source.variables["max_var"])
    return from_range(lo, hi, quantizer.num_bits, quantizer.narrow_range, axes).as_signed()


def random_codes(rng, grid, shape):
    return rng.integers(grid.qmin, grid.qmax + 1, size=shape, dtype=np.int64)


def emulated_codes(values, grid):
    """The codes of the emulation's real-valued output on its (per-tensor, signed) grid."""
    values = np.asarray(ops.convert_to_numpy(values), np.float32)
    assert np.float32(grid.scale) != 0
    return grid.centered_codes(values) + int(grid.zero_point)


def describe(**grids) -> str:
    return "; ".join(
        f"{name}: scale={np.asarray(g.scale)!r} zero_point={np.asarray(g.zero_point)!r} bits={g.bits}"
        for name, g in grids.items()
    )


# ---- QUANTIZE ----------------------------------------------------------------------------


@EXAMPLES
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16]), value_range=ranges(), narrow=st.booleans(), seed=seeds)
def test_quantize(bits, value_range, narrow, seed):
    rng = np.random.default_rng(seed)
    source = activation_source(bits, value_range, narrow)
    grid = grid_of(source)
    scale = np.float32(grid.scale)
    low, high = value_range
    spread = np.float32(high - low)
    uniform = rng.uniform(low - spread / 4, high + spread / 4, 48).astype(np.float32)
    # Half steps around the zero point (ties), and one ulp either side of them.
    ties = ((rng.integers(grid.qmin, grid.qmax + 1, 16) - grid.zero_point + 0.5) * scale).astype(np.float32)
    ties *= np.where(rng.random(16) < 0.5, -1, 1).astype(np.float32)
    near = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    x = np.concatenate([uniform, ties, near, np.float32([0.0, -0.0, low, high, 1e30, -1e30])])

    emulated = emulated_codes(em.quantize_inference(ops.convert_to_tensor(x), source), grid)
    runtime = K.quantize(x, grid)
    np.testing.assert_array_equal(emulated, runtime, err_msg=describe(grid=grid))


# ---- CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED ----------------------------------------------


@st.composite
def kernel_settings(draw):
    """Bit widths, ranges, weight layout and activations shared by the kernel ops."""
    in_range = draw(ranges())
    return {
        "in_bits": draw(activation_bits),
        "in_range": in_range,
        "weight_bits": draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 8, 16])),
        "weight_narrow": draw(st.booleans()),
        "per_channel": draw(st.booleans()),
        "weight_magnitude": draw(st.floats(0.01, 4.0)),
        "out_bits": draw(activation_bits),
        "out_range": draw(related_ranges(in_range)),
        "layer_activation": draw(st.sampled_from(ACTIVATIONS)),
        "target_activation": draw(st.sampled_from(ACTIVATIONS)),
        "use_bias": draw(st.booleans()),
        "bias_bits": draw(st.integers(0, 16)),
        "seed": draw(seeds),
    }


def check_kernel(layer, input_shape, settings_):
    """Build ``layer``, quantize random weights and inputs, and compare
    :func:`emulation.kernel_inference` with the runtime's kernel on the same codes."""
    s = settings_
    rng = np.random.default_rng(s["seed"])
    layer.build(input_shape)
    kernel_shape = tuple(layer.kernel.shape)
    op = "depthwise_conv" if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)) else (
        "dense" if isinstance(layer, L.Dense) else "conv"
    )
    rank = len(kernel_shape)
    axes = ((rank - 2, rank - 1) if op == "depthwise_conv" else (rank - 1,)) if s["per_channel"] else ()
    channels = int(np.prod([kernel_shape[a] for a in axes])) if axes else 1

    in_source = activation_source(s["in_bits"], s["in_range"])
    magnitude = s["weight_magnitude"] * rng.uniform(0.25, 1.0, channels) if axes else s["weight_magnitude"]
    weight_quantizer = kq.FixedQuantizer(
        num_bits=s["weight_bits"],
        init_min=-np.asarray(magnitude),
        init_max=np.asarray(magnitude),
        narrow_range=s["weight_narrow"],
        per_axis=bool(axes),
        symmetric=True,
    )
    weight_variables = weight_quantizer.build(kernel_shape, "kernel", QuantizerHost(layer, name="host"))
    kernel_source = em.Source(weight_quantizer, weight_variables)
    out_source = activation_source(s["out_bits"], s["out_range"])
    target = em.OutputTarget(out_source, s["target_activation"])

    in_grid, w_grid, out_grid = grid_of(in_source), grid_of(kernel_source, axes), grid_of(out_source)
    assert np.all(np.asarray(w_grid.zero_point) == 0), "symmetric weights have zero point 0"
    weight_scale = np.asarray(w_grid.scale, np.float32).reshape(-1)

    x_codes = random_codes(rng, in_grid, (2,) + tuple(input_shape[1:]))
    w_codes = random_codes(rng, w_grid, kernel_shape)
    x = in_grid.dequantize(x_codes)
    kernel = w_grid.dequantize(w_codes)
    out_channels = weight_scale.size if axes else int(layer.compute_output_shape(input_shape)[-1])
    bias = None
    if s["use_bias"]:
        step = np.float64(in_grid.scale) * np.broadcast_to(weight_scale, (out_channels,))
        bias = (rng.uniform(-1, 1, out_channels) * 2.0 ** s["bias_bits"] * step).astype(np.float32)

    emulated = em.kernel_inference(
        layer, ops.convert_to_tensor(x), ops.convert_to_tensor(kernel),
        None if bias is None else ops.convert_to_tensor(bias), in_source, kernel_source, target,
    )
    assert emulated is not None, "kernel_inference left the layer to fake quantization"
    emulated = emulated_codes(emulated, out_grid)

    multiplier = np.float64(in_grid.scale) * weight_scale.astype(np.float64) / np.float64(out_grid.scale)
    activation = s["layer_activation"] if s["layer_activation"] != "linear" else s["target_activation"]
    single_rounding = op == "dense" and not axes  # TFLite's reference FULLY_CONNECTED
    requantize = Requantize.lower(multiplier, out_grid, activation, single_rounding=single_rounding)
    bias_codes = None if bias is None else quantize_bias(bias, in_grid.scale, weight_scale)
    kernel_op = KernelOp(bias_codes, requantize)
    if op == "dense":
        runtime = K.dense(x_codes, in_grid.zero_point, w_codes, kernel_op)
    else:
        function = K.depthwise_conv if op == "depthwise_conv" else K.conv
        runtime = function(
            x_codes, in_grid.zero_point, w_codes,
            list(layer.strides), list(layer.dilation_rate), layer.padding, kernel_op,
        )
    np.testing.assert_array_equal(
        emulated, runtime, err_msg=describe(input=in_grid, weights=w_grid, output=out_grid)
    )


@EXAMPLES
@given(s=kernel_settings(), units=st.integers(1, 6), features=st.integers(1, 12))
def test_dense(s, units, features):
    layer = L.Dense(units, activation=s["layer_activation"], use_bias=s["use_bias"])
    check_kernel(layer, (None, features), s)


@st.composite
def window(draw, rank):
    """Kernel size, strides, dilation, padding and input size per spatial axis."""
    size = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilated = draw(st.booleans())
    strides = (1,) * rank if dilated else tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank)) if dilated else (1,) * rank
    padding = draw(st.sampled_from(["valid", "same"]))
    spatial = tuple(
        draw(st.integers((k - 1) * d + 1, (k - 1) * d + 5)) for k, d in zip(size, dilation)
    )
    return size, strides, dilation, padding, spatial


@EXAMPLES
@given(s=kernel_settings(), w=window(1), channels=st.integers(1, 3), filters=st.integers(1, 4))
def test_conv1d(s, w, channels, filters):
    size, strides, dilation, padding, spatial = w
    layer = L.Conv1D(filters, size, strides, padding, dilation_rate=dilation,
                     activation=s["layer_activation"], use_bias=s["use_bias"])
    check_kernel(layer, (None,) + spatial + (channels,), s)


@EXAMPLES
@given(s=kernel_settings(), w=window(2), channels=st.integers(1, 3), filters=st.integers(1, 4))
def test_conv2d(s, w, channels, filters):
    size, strides, dilation, padding, spatial = w
    layer = L.Conv2D(filters, size, strides, padding, dilation_rate=dilation,
                     activation=s["layer_activation"], use_bias=s["use_bias"])
    check_kernel(layer, (None,) + spatial + (channels,), s)


@EXAMPLES
@given(
    s=kernel_settings(),
    w=st.integers(1, 2).flatmap(window),
    channels=st.integers(1, 3),
    multiplier=st.integers(1, 3),
)
def test_depthwise_conv(s, w, channels, multiplier):
    size, strides, dilation, padding, spatial = w
    assume(len(set(strides)) == 1)  # TensorFlow's depthwise kernel (float too) takes equal strides only
    cls = L.DepthwiseConv2D if len(size) == 2 else L.DepthwiseConv1D
    layer = cls(size, strides, padding, depth_multiplier=multiplier, dilation_rate=dilation,
                activation=s["layer_activation"], use_bias=s["use_bias"])
    check_kernel(layer, (None,) + spatial + (channels,), s)


# ---- ADD --------------------------------------------------------------------------------


@EXAMPLES
@given(
    bits=st.tuples(activation_bits, activation_bits, activation_bits),
    wide=st.sampled_from([None, 0, 1]),
    range_a=ranges(),
    data=st.data(),
    activation=st.sampled_from(ACTIVATIONS),
    broadcast=st.booleans(),
    seed=seeds,
)
def test_add(bits, wide, range_a, data, activation, broadcast, seed):
    bits = list(bits)
    if wide is not None:
        bits[wide] = 16  # TFLite's int16 ADD shifts by 15 bits, not 20
    range_b = data.draw(related_ranges(range_a), "range_b")
    out_range = data.draw(related_ranges(range_a), "out_range")
    rng = np.random.default_rng(seed)
    source_a, source_b = activation_source(bits[0], range_a), activation_source(bits[1], range_b)
    out_source = activation_source(bits[2], out_range)
    grid_a, grid_b, out_grid = grid_of(source_a), grid_of(source_b), grid_of(out_source)
    a_codes = random_codes(rng, grid_a, (3, 8))
    b_codes = random_codes(rng, grid_b, (8,) if broadcast else (3, 8))

    emulated = em.add_inference(
        ops.convert_to_tensor(grid_a.dequantize(a_codes)),
        ops.convert_to_tensor(grid_b.dequantize(b_codes)),
        source_a, source_b, em.OutputTarget(out_source, activation),
    )
    add = AddOp.lower(grid_a, grid_b, out_grid, activation)
    runtime = K.add(a_codes, b_codes, grid_a.zero_point, grid_b.zero_point, add)
    np.testing.assert_array_equal(
        emulated_codes(emulated, out_grid), runtime, err_msg=describe(a=grid_a, b=grid_b, output=out_grid)
    )
    np.testing.assert_array_equal(runtime, tflite_add(a_codes, b_codes, grid_a, grid_b, out_grid, activation))


def tflite_add(a_codes, b_codes, grid_a, grid_b, out_grid, activation="linear"):
    """TFLite's integer ADD from its Prepare and kernel, step by step: inputs shifted up 20 bits
    (15 at 16 bits), rescaled to twice the larger scale, summed, requantized, clamped."""
    left_shift = 20 if max(grid_a.bits, grid_b.bits) <= 8 else 15
    s_a, s_b, s_out = (np.float64(np.float32(g.scale)) for g in (grid_a, grid_b, out_grid))
    twice_max = 2 * max(s_a, s_b)
    m_a = fp.quantize_multiplier(np.float64(s_a / twice_max))
    m_b = fp.quantize_multiplier(np.float64(s_b / twice_max))
    m_out = fp.quantize_multiplier(np.float64(twice_max / ((1 << left_shift) * s_out)))
    shifted_a = (a_codes - int(grid_a.zero_point)) * (1 << left_shift)
    shifted_b = (b_codes - int(grid_b.zero_point)) * (1 << left_shift)
    total = fp.multiply_by_quantized_multiplier(np, shifted_a, *m_a) + fp.multiply_by_quantized_multiplier(np, shifted_b, *m_b)
    low, high = out_grid.activation_bounds(activation)
    return np.clip(fp.multiply_by_quantized_multiplier(np, total, *m_out) + out_grid.zero_point, low, high)


# ---- MEAN (global average pooling) -------------------------------------------------------------


@EXAMPLES
@given(
    bits=st.tuples(activation_bits, activation_bits),
    in_range=ranges(),
    data=st.data(),
    spatial=st.one_of(st.tuples(st.integers(1, 9)), st.tuples(st.integers(1, 8), st.integers(1, 8))),
    keepdims=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
    seed=seeds,
)
def test_mean(bits, in_range, data, spatial, keepdims, activation, seed):
    out_range = data.draw(related_ranges(in_range), "out_range")
    rng = np.random.default_rng(seed)
    source, out_source = activation_source(bits[0], in_range), activation_source(bits[1], out_range)
    in_grid, out_grid = grid_of(source), grid_of(out_source)
    layer_type = L.GlobalAveragePooling2D if len(spatial) == 2 else L.GlobalAveragePooling1D
    layer = layer_type(keepdims=keepdims)
    codes = random_codes(rng, in_grid, (2,) + spatial + (3,))

    emulated = em.mean_inference(
        layer, ops.convert_to_tensor(in_grid.dequantize(codes)), source, em.OutputTarget(out_source, activation)
    )
    requantize = Requantize.lower(np.float64(in_grid.scale) / np.float64(out_grid.scale), out_grid, activation)
    runtime = K.mean(codes, in_grid.zero_point, keepdims, MeanOp(requantize))
    np.testing.assert_array_equal(
        emulated_codes(emulated, out_grid), runtime, err_msg=describe(input=in_grid, output=out_grid)
    )


# ---- AVERAGE_POOL_2D ----------------------------------------------------------------------


@EXAMPLES
@given(
    bits=activation_bits,
    in_range=ranges(),
    rank=st.integers(1, 2),
    data=st.data(),
    seed=seeds,
)
def test_average_pool(bits, in_range, rank, data, seed):
    pool = tuple(data.draw(st.integers(1, 3), "pool") for _ in range(rank))
    strides = tuple(data.draw(st.integers(1, 3), "stride") for _ in range(rank))
    padding = data.draw(st.sampled_from(["valid", "same"]), "padding")
    spatial = tuple(data.draw(st.integers(p, p + 4), "size") for p in pool)
    rng = np.random.default_rng(seed)
    source = activation_source(bits, in_range)
    grid = grid_of(source)
    layer_type = L.AveragePooling2D if rank == 2 else L.AveragePooling1D
    layer = layer_type(pool, strides, padding)
    codes = random_codes(rng, grid, (2,) + spatial + (3,))

    emulated = em.average_pool_inference(layer, ops.convert_to_tensor(grid.dequantize(codes)), source)
    runtime = K.average_pool(codes, list(pool), list(strides), padding)
    np.testing.assert_array_equal(emulated_codes(emulated, grid), runtime, err_msg=describe(input=grid))


# ---- LEAKY_RELU ---------------------------------------------------------------------------


def tflite_leaky_relu(codes, alpha, in_grid, out_grid, activation="linear"):
    """TFLite's int8 ``QuantizeLeakyRelu`` in exact integers. Its ``LeakyReluPrepare``
    computes both multipliers in float32, as C++ evaluates ``float * float / float``:
    ``input_scale * alpha / output_scale`` and ``input_scale / output_scale``."""
    s_in, s_out, alpha = np.float32(in_grid.scale), np.float32(out_grid.scale), np.float32(alpha)
    identity = fp.quantize_multiplier(np.float64(s_in / s_out))
    negative = fp.quantize_multiplier(np.float64(s_in * alpha / s_out))
    centered = codes - in_grid.zero_point
    scaled = np.where(
        centered >= 0,
        fp.multiply_by_quantized_multiplier(np, centered, *identity),
        fp.multiply_by_quantized_multiplier(np, centered, *negative),
    )
    low, high = out_grid.activation_bounds(activation)
    return np.clip(scaled + out_grid.zero_point, low, high)


@st.composite
def range_pairs(draw):
    """An input range and an output range (unrelated, or an exact ratio of the input's)."""
    in_range = draw(ranges())
    return in_range, draw(related_ranges(in_range))


#: A LeakyReLU where TFLite's float32 multiplier is exactly 0.25 (a tie at x = -125) and the
#: float64 one a hair above it: checked against the LiteRT reference interpreter, which
#: returns -31 there (and this oracle's codes on all 256 inputs).
LITERT_CHECKED_LEAKY = {
    "bits": (8, 8),
    "pair": ((np.float32(-0.98824825), np.float32(0.98824825)), (np.float32(-0.79059855), np.float32(0.79059855))),
    "alpha": 0.2,
}


@EXAMPLES
@example(**LITERT_CHECKED_LEAKY)
@given(
    bits=st.tuples(activation_bits, activation_bits),
    pair=range_pairs(),
    alpha=st.one_of(st.sampled_from([0.01, 0.1, 0.2, 0.25, 0.3, 0.5]), st.floats(0.001, 0.999)),
)
def test_leaky_relu(bits, pair, alpha):
    in_range, out_range = pair
    source, out_source = activation_source(bits[0], in_range), activation_source(bits[1], out_range)
    in_grid, out_grid = grid_of(source), grid_of(out_source)
    codes = np.arange(in_grid.qmin, in_grid.qmax + 1, dtype=np.int64)  # every input code

    emulated = em.leaky_relu_inference(
        ops.convert_to_tensor(in_grid.dequantize(codes)), alpha, source, em.OutputTarget(out_source, "linear")
    )
    expected = tflite_leaky_relu(codes, alpha, in_grid, out_grid)
    np.testing.assert_array_equal(
        emulated_codes(emulated, out_grid), expected,
        err_msg=f"alpha={np.float32(alpha)!r}; " + describe(input=in_grid, output=out_grid),
    )


# ---- fixed output ranges (SOFTMAX, LOGISTIC, TANH below 8 bits) ---------------------------------


FIXED_RANGES = {"softmax": (0.0, 255.0 / 256.0), "tanh": (-1.0, 127.0 / 128.0)}


@EXAMPLES
@given(
    kind=st.sampled_from(sorted(FIXED_RANGES)),
    bits=st.integers(2, 7),  # the requantized path: at 8 bits and more the output is the kernel's own
    data=st.data(),
    seed=seeds,
)
def test_fixed_range(kind, bits, data, seed):
    low, high = FIXED_RANGES[kind]
    fixed = (np.float32(low), np.float32(high))
    out_range = data.draw(st.one_of(ranges(), related_ranges(fixed)), "out_range")
    rng = np.random.default_rng(seed)
    out_source = activation_source(bits, out_range)
    out_grid = grid_of(out_source)
    eight = from_range(np.float32(low), np.float32(high), 8).as_signed()
    # The 8-bit kernel's outputs (on its grid), and float activations between and beyond them.
    on_grid = eight.dequantize(np.arange(eight.qmin, eight.qmax + 1))
    between = rng.uniform(low - 0.05, high + 0.05, 64).astype(np.float32)
    values = np.concatenate([on_grid, between]).astype(np.float32)

    emulated = em.fixed_range_inference(
        ops.convert_to_tensor(values), (low, high), em.OutputTarget(out_source, "linear")
    )
    # The 8-bit codes: TF's fake quantization (the QAT model's float activation, quantized).
    codes = eight.centered_codes(tf_fake_quant(values, low, high, 8, False)) + int(eight.zero_point)
    if kind == "softmax":
        output = K.SoftmaxOutput.of(out_grid)
        expected = codes if output.requantize is None else output.requantize(codes - K.SoftmaxOutput.INT8_ZERO_POINT)
    else:
        multiplier = np.float64(eight.scale) / np.float64(out_grid.scale)
        expected = Requantize.lower(multiplier, out_grid)(codes - int(eight.zero_point))
    np.testing.assert_array_equal(
        emulated_codes(emulated, out_grid), expected, err_msg=describe(fixed=eight, output=out_grid)
    )


@EXAMPLES
@given(
    in_bits=st.sampled_from([4, 8]),
    out_bits=st.sampled_from([4, 8]),
    in_range=ranges(),
    classes=st.sampled_from([2, 10]),
    seed=seeds,
)
def test_softmax(in_bits, out_bits, in_range, classes, seed):
    """The integer softmax over the last axis as the runtime computes it, from the same table
    (the writer's, :func:`keras_qat.integer.softmax_exp_table` on the backend): every pair of
    input codes for two classes, random rows for ten; at 8 bits on the fixed grid (256
    levels), below it requantized from the int8 kernel's codes."""
    from keras_qat.format import SOFTMAX_BITS
    from keras_qat.integer import softmax_exp_table

    in_source = activation_source(in_bits, in_range)
    in_grid = grid_of(in_source)
    out_range = FIXED_RANGES["softmax"] if out_bits == 8 else (0.0, 1.0)
    out_source = activation_source(out_bits, out_range)
    out_grid = grid_of(out_source)
    codes = np.arange(in_grid.qmin, in_grid.qmax + 1, dtype=np.int64)
    if classes == 2:
        x = np.stack(np.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1, 2)
    else:
        x = random_codes(np.random.default_rng(seed), in_grid, (512, classes))

    emulated = em.softmax_inference(ops.convert_to_tensor(in_grid.dequantize(x)), in_source, em.OutputTarget(out_source, "linear"))
    size = in_grid.qmax - in_grid.qmin + 1
    table = ops.convert_to_numpy(softmax_exp_table(np.float32(in_grid.scale), SOFTMAX_BITS, size, ops)).astype(np.int64)
    expected = K.softmax(x, table, K.SoftmaxOutput.of(out_grid))
    np.testing.assert_array_equal(emulated_codes(emulated, out_grid), expected, err_msg=describe(input=in_grid, output=out_grid))
