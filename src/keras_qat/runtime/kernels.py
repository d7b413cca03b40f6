"""Integer kernels of the ``.kqat`` runtime, in NumPy.

Every kernel takes and returns signed integer codes (int64 arrays) with their grids
(:class:`keras_qat.grid.IntegerGrid`), and computes what TFLite's reference int8 kernels compute, in integers only:
int32-range accumulators (held in int64), a bias at ``input_scale * weight_scale``, and
fixed-point requantization (:mod:`keras_qat.fixed_point`). The products of a convolution are
summed by BLAS in float64, which is exact: every partial sum of at most 16-bit by 16-bit
products over fewer than 2**20 terms stays far below 2**53.

The multipliers are derived from the scales when the model is loaded, as TFLite's ``Prepare``
does (a mean divides its multiplier by the count when it runs, once the count is known).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from keras_qat import fixed_point as fp
from keras_qat.grid import IntegerGrid as Grid


@dataclass(frozen=True)
class Requantizer:
    """``acc * multiplier`` in fixed point, shifted to the output's zero point, clamped."""

    m0: np.ndarray
    shift: np.ndarray
    zero_point: int
    low: int
    high: int
    single_rounding: bool = False

    @classmethod
    def of(cls, multiplier, out: Grid, activation: str = "linear", single_rounding: bool = False) -> "Requantizer":
        m0, shift = fp.quantize_multiplier(np.asarray(multiplier, dtype=np.float64))
        low, high = out.activation_bounds(activation)
        return cls(m0, shift, out.zero_point, low, high, single_rounding)

    def __call__(self, accumulator: np.ndarray) -> np.ndarray:
        multiply = fp.multiply_by_quantized_multiplier_single_rounding if self.single_rounding else fp.multiply_by_quantized_multiplier
        if accumulator.size and int(np.abs(accumulator).max()) >= 2**31:
            # A wide accumulator (16-bit operands): its product with the 31-bit multiplier
            # needs more than 64 bits, so it is taken in Python's exact integers.
            scaled = multiply(np, accumulator.astype(object), self.m0.astype(object), self.shift).astype(np.int64)
        else:
            scaled = multiply(np, accumulator, self.m0, self.shift)
        return np.clip(scaled + self.zero_point, self.low, self.high)


# ---- quantize / dequantize -----------------------------------------------------------------


def quantize(x: np.ndarray, out: Grid) -> np.ndarray:
    """TFLite's QUANTIZE: ``round(x / scale)`` half away from zero (float32), plus the zero point."""
    return out.quantize(x)


def dequantize(q: np.ndarray, grid: Grid) -> np.ndarray:
    return grid.dequantize(q)


# ---- windows ---------------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's SAME padding ``(before, after)`` of one spatial axis."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pad_spatial(x: np.ndarray, kernel, strides, dilation, padding: str, value) -> np.ndarray:
    if padding == "valid":
        return x
    pads = [(0, 0)] + [same_padding(x.shape[1 + i], kernel[i], strides[i], dilation[i]) for i in range(len(kernel))] + [(0, 0)]
    return np.pad(x, pads, constant_values=value)


def windows(x: np.ndarray, kernel, strides, dilation) -> np.ndarray:
    """``(N, *out_spatial, C, *kernel)`` views of the (already padded) ``x`` (N, *spatial, C)."""
    rank = len(kernel)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    view = sliding_window_view(x, effective, axis=tuple(range(1, 1 + rank)))
    index = (slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),)
    index += tuple(slice(None, None, d) for d in dilation)
    return view[index]


# ---- kernels ---------------------------------------------------------------------------------


def conv(x, zero_point: int, kernel, bias, strides, dilation, padding: str, requantize: Requantizer):
    """Conv1D/Conv2D (channels last); ``kernel`` is ``(*k, C_in, C_out)`` integer codes."""
    centered = x - zero_point
    size = kernel.shape[:-2]
    padded = _pad_spatial(centered, size, strides, dilation, padding, 0)
    patches = windows(padded, size, strides, dilation)  # (N, *out, C, *k)
    rank = len(size)
    order = (0,) + tuple(range(1, 1 + rank)) + tuple(range(2 + rank, 2 + 2 * rank)) + (1 + rank,)
    patches = np.transpose(patches, order)  # (N, *out, *k, C)
    out_shape = patches.shape[: 1 + rank]
    columns = patches.reshape(-1, int(np.prod(kernel.shape[:-1]))).astype(np.float64)
    accumulator = columns @ kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    accumulator = accumulator.astype(np.int64).reshape(out_shape + (kernel.shape[-1],))
    if bias is not None:
        accumulator = accumulator + bias
    return requantize(accumulator)


def depthwise_conv(x, zero_point: int, kernel, bias, strides, dilation, padding: str, requantize: Requantizer):
    """DepthwiseConv1D/2D; ``kernel`` is ``(*k, C_in, multiplier)``: output channel
    ``c * multiplier + m`` reads input channel ``c``."""
    centered = x - zero_point
    size = kernel.shape[:-2]
    padded = _pad_spatial(centered, size, strides, dilation, padding, 0)
    patches = windows(padded, size, strides, dilation)  # (N, *out, C, *k)
    rank = len(size)
    accumulator = None
    for position in np.ndindex(*size):
        tap = patches[(Ellipsis,) + position][..., :, None] * kernel[position]  # (N, *out, C, M)
        accumulator = tap if accumulator is None else accumulator + tap
    accumulator = accumulator.reshape(accumulator.shape[: 1 + rank] + (-1,))
    if bias is not None:
        accumulator = accumulator + bias
    return requantize(accumulator)


def dense(x, zero_point: int, kernel, bias, requantize: Requantizer):
    """FULLY_CONNECTED over the last axis; TFLite's reference kernel rounds once."""
    accumulator = ((x - zero_point).astype(np.float64) @ kernel.astype(np.float64)).astype(np.int64)
    if bias is not None:
        accumulator = accumulator + bias
    return requantize(accumulator)


@dataclass(frozen=True)
class AddParams:
    """TFLite's int8 ADD: both inputs rescaled to twice the larger scale, 20 bits up."""

    a: tuple
    b: tuple
    out: Requantizer
    zero_a: int
    zero_b: int
    left_shift: int

    @classmethod
    def of(cls, grid_a: Grid, grid_b: Grid, out: Grid, activation: str) -> "AddParams":
        left_shift = fp.add_left_shift(max(grid_a.bits, grid_b.bits))
        twice_max = 2.0 * max(np.float64(grid_a.scale), np.float64(grid_b.scale), 1e-300)
        a = fp.quantize_multiplier(np.float64(grid_a.scale) / twice_max)
        b = fp.quantize_multiplier(np.float64(grid_b.scale) / twice_max)
        requantize = Requantizer.of(twice_max / (float(1 << left_shift) * np.float64(out.scale)), out, activation)
        return cls(a, b, requantize, grid_a.zero_point, grid_b.zero_point, left_shift)


def add(a, b, params: AddParams):
    shift = 1 << params.left_shift
    scaled_a = fp.multiply_by_quantized_multiplier(np, (a - params.zero_a) * shift, *params.a)
    scaled_b = fp.multiply_by_quantized_multiplier(np, (b - params.zero_b) * shift, *params.b)
    return params.out(scaled_a + scaled_b)


def mean(x, zero_point: int, keepdims: bool, requantize: Requantizer):
    """TFLite's int8 MEAN over the spatial axes; ``requantize`` holds the multiplier of
    ``input_scale / output_scale`` before its division by the count (done here, as the
    count is known once the input's shape is)."""
    axes = tuple(range(1, x.ndim - 1))
    count = int(np.prod([x.shape[a] for a in axes]))
    total = np.sum(x - zero_point, axis=axes, keepdims=keepdims)
    m0, shift = fp.divide_multiplier(np, requantize.m0, requantize.shift, count)
    divided = Requantizer(m0, shift, requantize.zero_point, requantize.low, requantize.high)
    return divided(total)


def max_pool(x, pool_size, strides, padding: str):
    low = np.iinfo(np.int64).min
    padded = _pad_spatial(x, pool_size, strides, [1] * len(pool_size), padding, low)
    patches = windows(padded, pool_size, strides, [1] * len(pool_size))
    rank = len(pool_size)
    return patches.max(axis=tuple(range(-rank, 0)))


def average_pool(x, pool_size, strides, padding: str):
    """TFLite's int8 AVERAGE_POOL_2D: the sum of the codes over the window's valid elements
    divided by their count, rounding half away from zero."""
    rank = len(pool_size)
    ones = np.ones(x.shape[:-1] + (1,), dtype=np.int64)
    dilation = [1] * rank
    total = windows(_pad_spatial(x, pool_size, strides, dilation, padding, 0), pool_size, strides, dilation)
    count = windows(_pad_spatial(ones, pool_size, strides, dilation, padding, 0), pool_size, strides, dilation)
    axes = tuple(range(-rank, 0))
    total, count = total.sum(axis=axes), count.sum(axis=axes)
    half = count // 2
    magnitude = (np.abs(total) + half) // count
    return np.sign(total) * magnitude


def requantize_codes(x, grid: Grid, out: Grid):
    """Codes moved from ``grid`` to ``out`` (the identity when equal), rounded once, half
    up, in fixed point. The QAT model rounds the same value half up in float32 fake
    quantization; the two can differ only on a value within an ulp of a half step."""
    if grid == out:
        return x
    multiplier = np.float64(grid.scale) / np.float64(out.scale)
    return Requantizer.of(multiplier, out, single_rounding=True)(x - grid.zero_point)


@dataclass(frozen=True)
class SoftmaxOutput:
    """How a softmax writes its output grid: at 8 bits and more, ``levels = 1 / scale`` codes
    from the exponentials directly (rounded once); below 8 bits, as a converted TFLite model
    does, the int8 SOFTMAX's codes on its fixed grid (scale 1/256, zero point -128),
    requantized to the output grid (``requantize``)."""

    out: Grid
    levels: int
    requantize: Requantizer | None

    INT8_LEVELS = 256
    INT8_ZERO_POINT = -128

    @classmethod
    def of(cls, out: Grid) -> "SoftmaxOutput":
        if out.bits < 8:
            multiplier = np.float64(1.0 / cls.INT8_LEVELS) / np.float64(out.scale)
            return cls(out, cls.INT8_LEVELS, Requantizer.of(multiplier, out))
        levels = int(round(1.0 / float(out.scale)))
        if abs(levels * float(out.scale) - 1.0) > 1e-6:
            raise ValueError(f"a softmax output scale of {float(out.scale)} is not 1/integer; the integer softmax needs one.")
        return cls(out, levels, None)


def softmax(x, exp_table: np.ndarray, output: SoftmaxOutput):
    """Softmax over the last axis from a fixed-point exponential table: ``e = table[max - x]``,
    ``round(e * levels / sum(e))``, all in integers; placed on the output grid (see
    :class:`SoftmaxOutput`)."""
    distance = x.max(axis=-1, keepdims=True) - x
    e = exp_table[distance]
    total = e.sum(axis=-1, keepdims=True)
    codes = (2 * e * output.levels + total) // (2 * total)
    if output.requantize is None:
        return np.clip(codes + output.out.zero_point, output.out.qmin, output.out.qmax)
    int8_codes = np.clip(codes + SoftmaxOutput.INT8_ZERO_POINT, -128, 127)
    return output.requantize(int8_codes - SoftmaxOutput.INT8_ZERO_POINT)


def lookup(x, table: np.ndarray, qmin: int):
    return table[x - qmin]


__all__ = [
    "Requantizer",
    "AddParams",
    "quantize",
    "dequantize",
    "conv",
    "depthwise_conv",
    "dense",
    "add",
    "mean",
    "max_pool",
    "average_pool",
    "requantize_codes",
    "softmax",
    "SoftmaxOutput",
    "lookup",
    "same_padding",
    "windows",
]
