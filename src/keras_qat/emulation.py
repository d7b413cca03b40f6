"""Inference that computes exactly what the deployed integer kernels compute.

Fake quantization rounds ``conv(x, w) + b`` once, in float. The deployed int8 kernel adds an
int32 bias (``b`` rounded at ``input_scale * weight_scale``) to an exact int32 accumulator
and requantizes with TFLite's fixed-point multiplier, which rounds twice
(:mod:`keras_qat.fixed_point`). The two differ by one step on a fraction of a percent of
the outputs of every layer, and deep or trained networks amplify those steps. So in
inference (``training=False``, and not while a converter traces the model, see
:func:`keras_qat.ops.exporting`) the quantized Conv/Dense/DepthwiseConv and Add layers
compute the integer pipeline itself; training keeps fake quantization and its gradients.

A layer needs three grids for that: its input's, its weights' and its output's. The input
grid belongs to the layer that produced the input (its output quantizer), possibly through
layers that only move values (max pooling, reshape, padding). The output grid is the
layer's own output quantizer, or, where a fused ReLU or a Concatenate quantizes the output
(:mod:`keras_qat.transforms`), that consumer's. :mod:`keras_qat.linking` reads both from the
functional graph. A layer without complete links keeps fake quantization in inference.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_qat import integer
from keras_qat import ops as qops
from keras_qat.grid import IntegerGrid, from_range
from keras_qat.registry import CLAMP_ACTIVATIONS, activation_name, kind_of
from keras_qat.spec import TensorSpec
from keras_qat.quantizers import Quantizer

L = keras.layers

#: The kinds (:mod:`keras_qat.registry`) whose integer kernel this module reproduces.
KERNEL_OPS = ("dense", "conv", "depthwise_conv")


class Source(NamedTuple):
    """The quantizer (and its variables) that puts a tensor on its grid, and the tensor's
    description (:class:`~keras_qat.spec.TensorSpec`, resolved when the layer was built; None
    for a per-tensor activation or a quantizer that keeps none)."""

    quantizer: Quantizer
    variables: dict
    spec: TensorSpec | None = None


class OutputTarget(NamedTuple):
    """Where a layer's output is quantized when a consumer does it: that consumer's
    quantizer, and the activation (a clamp) the consumer applies first."""

    source: Source
    activation: str


def spec_of(source: Source) -> TensorSpec:
    """The description of ``source``'s tensor, resolved when its layer was built (otherwise, an
    activation's: one from its quantizer's settings, per tensor)."""
    if source.spec is not None:
        return source.spec
    quantizer = source.quantizer
    return TensorSpec(quantizer.num_bits, quantizer.narrow_range, getattr(quantizer, "symmetric", False))


def grid(source: Source) -> IntegerGrid:
    """The deployed grid of ``source``'s tensor from its range now (:func:`keras_qat.grid.from_range`,
    the converter's arithmetic), as tensors of the inference graph."""
    return spec_of(source).grid(*source.quantizer.range_of(source.variables), ops)


def exported_grid(source: Source) -> IntegerGrid:
    """:func:`grid` in NumPy (float32 scales, int64 zero points), as exporters write it."""
    lo, hi = (ops.convert_to_numpy(end) for end in source.quantizer.range_of(source.variables))
    return spec_of(source).grid(lo, hi, np)


def enabled(training: bool) -> bool:
    """Whether inference reproduces the integer kernels in this call."""
    return not training and not qops.plain_fake_quant() and qops.exact_integer_arithmetic()


# ---- the arithmetic (lowered and executed by keras_qat.integer) ------------------------------


def centered_codes(x, g: IntegerGrid):
    """``q - zero_point`` of values on grid ``g``, as float64 (exact integers)."""
    return g.centered_codes(x, ops)


def _real(codes, out: IntegerGrid):
    """Codes on ``out`` (float32 tensors holding integers) as the real values they stand for;
    0 on an empty grid."""
    real = (codes - out.zero_point) * out.scale
    return ops.where(ops.equal(out.scale, 0.0), ops.zeros_like(real), real)


def linear_map(layer, x, w):
    """The layer's linear map (no bias, no activation) on ``x`` with kernel ``w``: what its
    integer kernel accumulates (:data:`KERNEL_OPS` kinds)."""
    op = kind_of(layer).integer_op
    if op == "dense":
        return ops.matmul(x, w)
    if op == "depthwise_conv":
        return ops.depthwise_conv(
            x, w, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate, data_format="channels_last"
        )
    return ops.conv(
        x, w, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate, data_format="channels_last"
    )


#: float32 sums integers exactly while every partial sum stays below 2**24.
_FLOAT32_EXACT = 2**24


def _accumulate(layer, x, w, terms: int, input_bits: int, weight_bits: int):
    """The exact integer accumulator of ``layer`` on centered codes ``x`` and ``w``, as float64.

    float32 convolutions are fast but exact only below 2**24. When the accumulator's bound
    (``terms`` products of at most ``2**input_bits`` by ``2**(weight_bits - 1)``) is too
    large, the input codes are split into high and low halves, ``x = hi * 2**p + lo``, each
    accumulated exactly in float32 and recombined in float64; float64 convolutions (slow on
    CPU) are the last resort.
    """
    weight_bound = terms * 2 ** (weight_bits - 1)
    if weight_bound * 2**input_bits < _FLOAT32_EXACT:
        return ops.cast(linear_map(layer, x, w), "float64")
    low_bits = (input_bits + 1) // 2
    if weight_bound * 2 ** max(low_bits, input_bits - low_bits) < _FLOAT32_EXACT:
        base = float(2**low_bits)
        high = ops.floor(x / base)
        low = x - high * base
        return ops.cast(linear_map(layer, high, w), "float64") * base + ops.cast(linear_map(layer, low, w), "float64")
    return linear_map(layer, ops.cast(x, "float64"), ops.cast(w, "float64"))


def supports_kernel(layer, weight_quantizer: Quantizer) -> bool:
    """Whether :func:`kernel_inference` reproduces ``layer``'s integer kernel."""
    return (
        kind_of(layer) is not None
        and kind_of(layer).integer_op in KERNEL_OPS
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and getattr(layer, "padding", "valid") in ("valid", "same")
        and getattr(layer, "groups", 1) == 1
        and activation_name(getattr(layer, "activation", "linear")) in CLAMP_ACTIVATIONS
        and getattr(weight_quantizer, "symmetric", False)
    )


def accumulator_bound(layer, in_source: Source, kernel_source: Source) -> int:
    """The largest magnitude the layer's accumulator can reach, from its bit widths and its
    reduction size. Above 2**31 the kernel needs int64 accumulators and a product wider
    than 64 bits; :func:`kernel_inference` then leaves the layer to fake quantization, and
    the runtime computes it with exact integers."""
    return _reduction_terms(layer) * (2**in_source.quantizer.num_bits - 1) * 2 ** (kernel_source.quantizer.num_bits - 1)


def _reduction_terms(layer) -> int:
    """How many products each output of ``layer`` sums."""
    shape = tuple(layer.kernel.shape)
    depthwise = kind_of(layer).depthwise
    terms = 1
    for size in shape[:-2] if depthwise else shape[:-1]:
        terms *= int(size)
    return terms


def rounds_once(layer, weight_quantizer: Quantizer) -> bool:
    """Whether ``layer``'s deployed kernel requantizes with one rounding: TFLite's reference
    FULLY_CONNECTED does; its convolutions round twice, and so does a per-channel Dense, which
    deploys as a 1x1 CONV_2D (:mod:`keras_qat.export.tflite.trace`)."""
    return kind_of(layer).integer_op == "dense" and not weight_quantizer.per_axis


def kernel_inference(layer, inputs, kernel, bias, in_source: Source, kernel_source: Source, out: OutputTarget):
    """``layer``'s output as its deployed integer kernel computes it.

    Args:
        layer: the Conv/Dense/DepthwiseConv (its strides, padding, activation are read).
        inputs: values on ``in_source``'s grid.
        kernel: the fake-quantized kernel (on ``kernel_source``'s grid, symmetric).
        bias: the float bias per output channel, or None.
        out: the output's quantizer and the activation clamped in the output codes.

    Returns None where the accumulator could leave the int32 range (see
    :func:`accumulator_bound`).
    """
    if accumulator_bound(layer, in_source, kernel_source) >= 2**31:
        return None
    if kernel_source.spec is None and callable(getattr(kernel_source.quantizer, "spec", None)):
        # A source built without its spec (a caller's own): resolved here from the layer's kernel.
        spec = kernel_source.quantizer.spec(tuple(layer.kernel.shape), "kernel", layer)
        kernel_source = kernel_source._replace(spec=spec)
    in_grid = grid(in_source)
    w_grid = grid(kernel_source)
    out_grid = grid(out.source)
    x = ops.cast(in_grid.centered_codes(inputs, ops), "float32")
    w = ops.cast(w_grid.centered_codes(kernel, ops), "float32")
    accumulator = _accumulate(
        layer, x, w, _reduction_terms(layer), in_source.quantizer.num_bits, kernel_source.quantizer.num_bits
    )
    activation = activation_name(getattr(layer, "activation", "linear"))
    if activation == "linear":
        activation = out.activation
    op = integer.KernelOp.lower(
        in_grid, w_grid, out_grid, bias, activation, rounds_once(layer, kernel_source.quantizer), xp=ops
    )
    return _real(op(accumulator, ops), out_grid)


def add_inference(a, b, source_a: Source, source_b: Source, out: OutputTarget):
    """TFLite's ADD of ``a`` and ``b`` (each on its source's grid): :class:`keras_qat.integer.AddOp`."""
    grid_a, grid_b, out_grid = grid(source_a), grid(source_b), grid(out.source)
    op = integer.AddOp.lower(grid_a, grid_b, out_grid, out.activation, xp=ops)
    return _real(op(centered_codes(a, grid_a), centered_codes(b, grid_b), ops), out_grid)


def multiply_inference(a, b, source_a: Source, source_b: Source, out: OutputTarget):
    """TFLite's int8 MUL of ``a`` and ``b`` (:class:`keras_qat.integer.MultiplyOp`), rounding
    twice where fake quantization of the float product rounds once."""
    grid_a, grid_b, out_grid = grid(source_a), grid(source_b), grid(out.source)
    op = integer.MultiplyOp.lower(grid_a, grid_b, out_grid, out.activation, xp=ops)
    return _real(op(centered_codes(a, grid_a), centered_codes(b, grid_b), ops), out_grid)


def quantize_inference(inputs, source: Source):
    """TFLite's QUANTIZE of a float model input: ``round(x / scale)`` half away from zero
    (float32 division), plus the zero point, clamped. TF's fake-quant op rounds
    ``(x - nudged_min) / scale`` half up, which differs on ties below the zero point and on
    values a rounding error from a half step."""
    g = grid(source)
    return g.dequantize(g.quantize(inputs, ops), ops)


def leaky_relu_inference(inputs, alpha: float, source: Source, out: OutputTarget):
    """TFLite's int8 LEAKY_RELU (:class:`keras_qat.integer.LeakyReluOp`), where fake
    quantization of the float op rounds once."""
    in_grid, out_grid = grid(source), grid(out.source)
    op = integer.LeakyReluOp.lower(in_grid, out_grid, alpha, out.activation, xp=ops)
    return _real(op(in_grid.centered_codes(inputs, ops), ops), out_grid)


def fixed_range_inference(values, fixed_range: tuple[float, float], out: OutputTarget):
    """An activation whose int8 kernel fixes its output grid (softmax, sigmoid, tanh), quantized
    below 8 bits: the kernel's 8-bit output on that fixed grid, requantized to ``out``'s grid
    with the fixed-point multiplier (the QUANTIZE a converter adds between the two), rounding
    twice where fake quantization of the float activation would round once."""
    low, high = fixed_range
    eight_bit = from_range(np.float32(low), np.float32(high), 8)
    codes = eight_bit.centered_codes(qops.fake_quant(values, low, high, 8), ops)
    out_grid = grid(out.source)
    requantize = integer.Requantize.between(eight_bit, out_grid, out.activation, xp=ops)
    return _real(requantize(codes, ops), out_grid)


def average_pool_inference(layer, inputs, source: Source):
    """TFLite's int8 AVERAGE_POOL_2D: the average of the signed codes, rounded half away from
    zero, on the input's grid (fake quantization rounds ties half up).

    The codes are exact integers in float32, so the pooled sum is exact; its division by the
    count can land a hair off an exact tie, which ``tie`` (a quarter of the smallest step
    between averages) absorbs.
    """
    g = grid(source)
    zero_point = g.as_signed().zero_point
    signed = ops.cast(g.centered_codes(inputs, ops), "float32") + zero_point
    averaged = layer(signed)
    area = 1
    for size in layer.pool_size:
        area *= int(size)
    tie = 0.25 / area
    rounded = ops.sign(averaged) * ops.floor(ops.abs(averaged) + 0.5 + tie)
    return (rounded - zero_point) * g.scale


def mean_inference(layer, inputs, source: Source, out: OutputTarget):
    """TFLite's int8 MEAN over the spatial axes (None when a spatial size is unknown, which
    the multiplier depends on): the sum of the centered codes, requantized
    with the multiplier of ``input_scale / output_scale`` divided by the count in integer
    arithmetic (``m0 * 2**k // count`` with ``k = floor(log2(count))``, at most 32 and
    ``31 + shift``), rounding twice as the convolutions do."""
    in_grid, out_grid = grid(source), grid(out.source)
    codes = centered_codes(inputs, in_grid)
    axes = tuple(range(1, len(inputs.shape) - 1))
    if any(inputs.shape[axis] is None for axis in axes):
        return None  # the count fixes the multiplier; unknown here, fake quantization instead
    count = 1
    for axis in axes:
        count *= int(inputs.shape[axis])
    total = ops.sum(codes, axis=axes, keepdims=bool(getattr(layer, "keepdims", False)))
    op = integer.MeanOp.lower(in_grid, out_grid, out.activation, xp=ops)
    return _real(op(total, count, ops), out_grid)


__all__ = [
    "quantize_inference",
    "average_pool_inference",
    "mean_inference",
    "Source",
    "OutputTarget",
    "spec_of",
    "exported_grid",
    "grid",
    "enabled",
    "kernel_inference",
    "fixed_range_inference",
    "leaky_relu_inference",
    "add_inference",
    "multiply_inference",
    "supports_kernel",
    "rounds_once",
    "centered_codes",
]
