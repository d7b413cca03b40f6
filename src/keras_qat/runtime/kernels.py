"""Integer kernels of the ``.kqat`` runtime, in NumPy.

Every kernel takes and returns signed integer codes (int64 arrays) with their grids
(:class:`keras_qat.grid.IntegerGrid`), and computes what TFLite's reference int8 kernels compute, in integers only:
int32-range accumulators (held in int64), a bias at ``input_scale * weight_scale``, and
fixed-point requantization (:mod:`keras_qat.fixed_point`). The products of a convolution are
summed by BLAS in float64, which is exact: every partial sum of at most 16-bit by 16-bit
products over fewer than 2**20 terms stays far below 2**53.

Everything after the accumulation (bias, requantization, ADD's rescaling, a mean's division)
is the integer op of :mod:`keras_qat.integer`, whose parameters the artifact carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from keras_qat.grid import IntegerGrid as Grid
from keras_qat.integer import (
    INT8_SOFTMAX_LEVELS,
    INT8_SOFTMAX_ZERO_POINT,
    AddOp,
    KernelOp,
    MeanOp,
    Requantize,
    average_codes,
    int8_softmax_grid,
    requantize_between,
    softmax_codes,
    softmax_levels,
)


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


def conv(x, zero_point: int, kernel, strides, dilation, padding: str, op: KernelOp):
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
    return op(accumulator)


def depthwise_conv(x, zero_point: int, kernel, strides, dilation, padding: str, op: KernelOp):
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
    return op(accumulator.reshape(accumulator.shape[: 1 + rank] + (-1,)))


def dense(x, zero_point: int, kernel, op: KernelOp):
    """FULLY_CONNECTED over the last axis."""
    return op(((x - zero_point).astype(np.float64) @ kernel.astype(np.float64)).astype(np.int64))


def add(a, b, zero_a: int, zero_b: int, op: AddOp):
    return op(a - zero_a, b - zero_b)


def mean(x, zero_point: int, keepdims: bool, op: MeanOp):
    """TFLite's int8 MEAN over the spatial axes (the count is known once the input's shape is)."""
    axes = tuple(range(1, x.ndim - 1))
    count = int(np.prod([x.shape[a] for a in axes]))
    return op(np.sum(x - zero_point, axis=axes, keepdims=keepdims), count)


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
    return average_codes(total.sum(axis=axes), count.sum(axis=axes))


def requantize_codes(x, grid: Grid, out: Grid):
    """Codes moved from ``grid`` to ``out`` (the identity when equal), rounded once, half
    up, in fixed point. The QAT model rounds the same value half up in float32 fake
    quantization; the two can differ only on a value within an ulp of a half step."""
    return requantize_between(x, grid, out)


@dataclass(frozen=True)
class SoftmaxOutput:
    """How a softmax writes its output grid: at 8 bits and more, ``levels = 1 / scale`` codes
    from the exponentials directly (rounded once); below 8 bits, as a converted TFLite model
    does, the int8 SOFTMAX's codes on its fixed grid (scale 1/256, zero point -128),
    requantized to the output grid (``requantize``)."""

    out: Grid
    levels: int
    requantize: Requantize | None

    INT8_LEVELS = INT8_SOFTMAX_LEVELS
    INT8_ZERO_POINT = INT8_SOFTMAX_ZERO_POINT

    @classmethod
    def of(cls, out: Grid) -> "SoftmaxOutput":
        if out.bits < 8:
            return cls(out, cls.INT8_LEVELS, Requantize.between(int8_softmax_grid(), out))
        levels = softmax_levels(out.scale)
        if levels is None:
            raise ValueError(f"a softmax output scale of {float(out.scale)} is not 1/integer; the integer softmax needs one.")
        return cls(out, levels, None)


def softmax(x, exp_table: np.ndarray, output: SoftmaxOutput):
    """Softmax over the last axis from a fixed-point exponential table: ``e = table[max - x]``,
    ``round(e * levels / sum(e))``, all in integers; placed on the output grid (see
    :class:`SoftmaxOutput`)."""
    codes = softmax_codes(x, exp_table, output.levels)
    if output.requantize is None:
        return np.clip(codes + output.out.zero_point, output.out.qmin, output.out.qmax)
    int8_codes = np.clip(codes + SoftmaxOutput.INT8_ZERO_POINT, -128, 127)
    return output.requantize(int8_codes - SoftmaxOutput.INT8_ZERO_POINT)


def lookup(x, table: np.ndarray, qmin: int):
    return table[x - qmin]


__all__ = [
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
