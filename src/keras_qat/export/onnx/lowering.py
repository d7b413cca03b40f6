"""Each ``.kqat`` op as ONNX nodes between DequantizeLinear and QuantizeLinear, computing its
integer arithmetic exactly.

The graph is written from the integer form the ``.kqat`` artifact holds
(:func:`keras_qat.export.artifact.build`): the same grids, weight codes, bias codes and
requantization parameters, read and never derived again. Between an op's dequantized inputs and
its output's QuantizeLinear, the nodes compute what the ``.kqat`` runtime, the QAT model's
inference and LiteRT's reference kernels compute:

* the integer codes are read back from the dequantized values (``round(x / scale)``, exact);
  kernels are stored as integers with their scales and zero points (DequantizeLinear, per axis
  for per-channel kernels) and read back the same way;
* convolutions and matrix products run in float32 on those integers, exact because every
  partial sum stays below ``2**24`` (input channels are split where they would not);
* the requantization, ADD's rescaling, a mean's division, an average pool's rounding and the
  integer softmax are :mod:`keras_qat.integer`'s own code run on
  :class:`~keras_qat.export.onnx.symbolic.OnnxOps`, which writes int64 ONNX ops.

Each function returns the output codes (float32 holding integers, zero point included, on the
output grid), which :mod:`.convert` turns into real values for the output's QuantizeLinear,
where they round to themselves. Tensors keep Keras's channels-last layout; ops that ONNX
defines channels first (Conv and the pools) are wrapped in a pair of Transposes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import TensorProto

from keras_qat.export.onnx.graph import GraphBuilder, onnx_type
from keras_qat.export.onnx.symbolic import OnnxOps, Value
from keras_qat.format import packing
from keras_qat.grid import IntegerGrid
from keras_qat.integer import AddOp, KernelOp, MeanOp, Requantize, average_codes, softmax_codes
from keras_qat.runtime.kernels import SoftmaxOutput


@dataclass(frozen=True)
class OpContext:
    """What a lowering reads besides its float inputs: the manifest op, its tensors' entries
    (grids and shapes), the payload its weights are read from, and the graph's opset."""

    op: dict
    input_tensors: list[dict]
    output_tensor: dict
    payload: bytes
    opset: int

    @property
    def attributes(self) -> dict:
        return self.op["attributes"]

    @property
    def hint(self) -> str:
        return self.op["layer"]

    def weight(self, name: str) -> np.ndarray:
        return packing.read_weight(self.op["weights"][name], self.payload)


# ---- layout ----------------------------------------------------------------------------------


def _channels_first(g: GraphBuilder, x: str, rank: int, hint: str) -> str:
    """``(N, *spatial, C)`` to ``(N, C, *spatial)``; ``rank`` counts the spatial axes."""
    return g.transpose(x, [0, rank + 1] + list(range(1, rank + 1)), f"{hint}/to_channels_first")


def _channels_last(g: GraphBuilder, x: str, rank: int, hint: str) -> str:
    return g.transpose(x, [0] + list(range(2, rank + 2)) + [1], f"{hint}/to_channels_last")


def _window_attributes(ctx: OpContext, size: list[int], strides: list[int], dilation: list[int] | None = None) -> dict:
    """Kernel shape, strides, dilations and TensorFlow's padding. ``same`` puts the odd pixel
    at the end: SAME_UPPER, or, with dilations (which ONNX Runtime does not combine with
    auto_pad; Keras takes no strides above 1 with them), the explicit pads of stride 1."""
    dilation = [1] * len(size) if dilation is None else [int(d) for d in dilation]
    attributes = {"kernel_shape": [int(k) for k in size], "strides": [int(s) for s in strides], "dilations": dilation}
    if ctx.attributes["padding"] != "same":
        attributes["auto_pad"] = "VALID"
    elif max(dilation) == 1:
        attributes["auto_pad"] = "SAME_UPPER"
    else:
        totals = [(int(k) - 1) * d for k, d in zip(size, dilation)]
        attributes["pads"] = [t // 2 for t in totals] + [t - t // 2 for t in totals]
    return attributes


class LoweringRefusal(ValueError):
    """An op whose integers ONNX cannot hold exactly; :func:`~.convert.build_graph` collects
    them into one :class:`~keras_qat.errors.NotDeployableError`."""


# ---- weights ---------------------------------------------------------------------------------


def _dequantized_kernel(g: GraphBuilder, ctx: OpContext, codes: np.ndarray, channel_axis: int) -> str:
    """The kernel's integer codes (already in ONNX's layout, channels on ``channel_axis``) as an
    initializer read through a DequantizeLinear with the kernel's scales and zero points."""
    entry = ctx.op["weights"]["kernel"]
    type_ = onnx_type(entry["bits"], ctx.opset)  # the converter refused the widths without one
    scale = np.asarray(entry["scale"], np.float32)
    zero_point = np.asarray(entry["zero_point"], np.int64)
    per_channel = scale.size > 1
    if per_channel:
        stored = codes + zero_point.reshape([-1 if a == channel_axis else 1 for a in range(codes.ndim)])
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
        stored = codes + zero_point
    name = g.constant(f"{ctx.hint}/kernel", stored, type_.proto)
    scale_name, zero_name = g.grid_constants(f"{ctx.hint}/kernel", scale, zero_point, type_)
    return g.dequantize(name, scale_name, zero_name, f"{ctx.hint}/kernel_dq", axis=channel_axis if per_channel else None)


def _kernel_codes(g: GraphBuilder, ctx: OpContext, codes: np.ndarray, out_axis: int) -> str:
    """The kernel stored as integers with its scales and zero points (a DequantizeLinear, per
    axis for a per-channel kernel), and its codes read back from it: ``round(w / scale)``, exact
    float32 integers (a constant that ONNX Runtime's optimizer folds). A channel of scale 0
    holds zeros."""
    real = _dequantized_kernel(g, ctx, codes, channel_axis=out_axis)
    scale = np.asarray(ctx.op["weights"]["kernel"]["scale"], np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    scale = scale.reshape([-1 if axis == out_axis else 1 for axis in range(codes.ndim)] if scale.size > 1 else ())
    steps = g.node("Div", [real, g.constant(f"{ctx.hint}/kernel_scale", scale)], f"{ctx.hint}/kernel_steps")
    return g.node("Round", [steps], f"{ctx.hint}/kernel_codes")


#: Float32 sums of integers are exact below this.
EXACT_FLOAT32 = 2**24

#: The int64 fixed-point product ``acc * 2**left_shift * m0`` (``m0 < 2**31``) fits below this.
INT64_PRODUCT_BOUND = 2**32

Lowering = Callable[[GraphBuilder, OpContext, OnnxOps, list], Value]


def grid_of(entry: dict) -> IntegerGrid:
    """The grid of a manifest tensor entry."""
    return IntegerGrid.from_manifest(entry)


def _centered(codes: Value, entry: dict) -> Value:
    """``q - zero_point`` of codes on the grid of manifest tensor ``entry``."""
    return codes - float(entry["zero_point"])


def _largest_centered(entry: dict) -> int:
    """The largest ``|q - zero_point|`` on the grid of manifest tensor ``entry``."""
    return max(abs(entry["qmin"] - entry["zero_point"]), abs(entry["qmax"] - entry["zero_point"]))


def _moved(xp: OnnxOps, codes: Value, entry: dict, out_entry: dict) -> Value:
    """Codes on ``entry``'s grid moved onto ``out_entry``'s, as the runtime's
    ``requantize_codes``: unchanged when the grids are equal, else requantized (one rounding)."""
    grid, out = grid_of(entry), grid_of(out_entry)
    if grid == out:
        return codes
    return Requantize.between(grid, out, single_rounding=True)(_centered(codes, entry), xp)


# ---- accumulators ------------------------------------------------------------------------------


def _channel_chunks(products: np.ndarray) -> list[tuple[int, int]]:
    """Input-channel ranges ``[start, stop)`` over which every output's partial sum stays
    below ``2**24``; ``products`` is ``(C_in, C_out)``: the largest ``|x| * |w|`` sum an input
    channel adds to an output."""
    chunks, start, bound = [], 0, np.zeros(products.shape[1], np.int64)
    for channel in range(products.shape[0]):
        row = products[channel]
        if np.any(row >= EXACT_FLOAT32):
            raise LoweringRefusal("one input channel's products reach 2**24, so its sums cannot be exact in float32")
        if np.any(bound + row >= EXACT_FLOAT32):
            chunks.append((start, channel))
            start, bound = channel, np.zeros_like(bound)
        bound = bound + row
    chunks.append((start, products.shape[0]))
    return chunks


def _slice_channels(g: GraphBuilder, xp: OnnxOps, x: Value, start: int, stop: int, hint: str) -> Value:
    """``x[..., start:stop]`` (channels last)."""
    constants = [g.constant(f"{hint}/slice", np.asarray([v], np.int64), TensorProto.INT64) for v in (start, stop, -1)]
    return xp.value(g.node("Slice", [x.name] + constants, f"{hint}/channels_{start}_{stop}"), "float32")


def _requantize(ctx: OpContext) -> Requantize:
    return Requantize.from_manifest(ctx.op["integer"]["requantize"], grid_of(ctx.output_tensor))


def _kernel_op(g: GraphBuilder, ctx: OpContext, xp: OnnxOps, x: Value, onnx_codes: np.ndarray, in_axis: int, make, grouped: bool = False) -> Value:
    """A Conv or Dense in integers: the accumulator of ``make(x, kernel)`` (a float32 Conv or
    MatMul of integer codes, each partial sum exact; over chunks of input channels where a sum
    could reach ``2**24``, which a grouped convolution cannot take), then the bias codes and the
    requantization. ``onnx_codes`` has its input channels on ``in_axis`` and its outputs on the
    other of axes 0 and 1."""
    out_axis = 1 - in_axis
    magnitude = np.moveaxis(np.abs(onnx_codes).astype(np.int64), (in_axis, out_axis), (0, 1))
    products = magnitude.reshape(magnitude.shape[0], magnitude.shape[1], -1).sum(axis=2) * _largest_centered(ctx.input_tensors[0])
    bias = ctx.weight("bias") if "bias" in ctx.op["weights"] else None
    requantize = _requantize(ctx)
    _check_product_fits(products.sum(axis=0), bias, requantize)
    chunks = [(0, onnx_codes.shape[in_axis])] if grouped else _channel_chunks(products)
    if grouped and np.any(products.sum(axis=0) >= EXACT_FLOAT32):
        raise LoweringRefusal(f"its window of {onnx_codes[0].size} taps cannot sum exactly in float32")
    centered = _centered(x, ctx.input_tensors[0])
    accumulator = None
    for start, stop in chunks:
        part = np.take(onnx_codes, np.arange(start, stop), axis=in_axis)
        part_x = centered if len(chunks) == 1 else _slice_channels(g, xp, centered, start, stop, ctx.hint)
        partial = xp.cast(xp.value(make(part_x.name, _kernel_codes(g, ctx, part, out_axis)), "float32"), "int64")
        accumulator = partial if accumulator is None else accumulator + partial
    return KernelOp(bias, requantize)(accumulator, xp)


def _check_product_fits(bound: np.ndarray, bias, requantize: Requantize) -> None:
    """Refuse a kernel whose accumulator (at most ``bound`` per output, before its bias),
    shifted and multiplied in fixed point, could pass int64 (16-bit operands over many terms):
    the runtime takes those in Python integers; ONNX has none wider."""
    if bias is not None:
        bound = bound + np.abs(bias).astype(np.int64)
    bound = bound * np.left_shift(np.int64(1), np.maximum(np.asarray(requantize.shift, np.int64), 0))
    if np.any(bound >= INT64_PRODUCT_BOUND):
        raise LoweringRefusal(
            f"its accumulator can reach 2**{int(np.log2(bound.max()))}, beyond what ONNX's int64 fixed-point "
            "requantization holds; quantize its input at 8 bits or fewer, or export it to .kqat"
        )


def _windowed(g: GraphBuilder, ctx: OpContext, xp: OnnxOps, x: Value, onnx_codes: np.ndarray, group: int) -> Value:
    """A convolution (channels last) of ``onnx_codes`` ``(C_out, C_in / group, *k)``."""
    rank = int(ctx.attributes["rank"])
    size = list(onnx_codes.shape[2:])
    attributes = _window_attributes(ctx, size, ctx.attributes["strides"], ctx.attributes["dilation_rate"])

    def conv(x_name: str, kernel: str) -> str:
        y = g.node("Conv", [_channels_first(g, x_name, rank, ctx.hint), kernel], f"{ctx.hint}/conv", group=int(group), **attributes)
        return _channels_last(g, y, rank, ctx.hint)

    return _kernel_op(g, ctx, xp, x, onnx_codes, 1, conv, grouped=group > 1)


def _conv(g, ctx, xp, inputs):
    """Conv1D/Conv2D: Keras's ``(*k, C_in, C_out)`` kernel as ONNX's ``(C_out, C_in, *k)``."""
    codes = ctx.weight("kernel")
    rank = int(ctx.attributes["rank"])
    return _windowed(g, ctx, xp, inputs[0], np.transpose(codes, [rank + 1, rank] + list(range(rank))), group=1)


def _depthwise_conv(g, ctx, xp, inputs):
    """DepthwiseConv1D/2D: Keras's ``(*k, C_in, multiplier)`` kernel as ONNX's grouped
    ``(C_in * multiplier, 1, *k)``, output channel ``c * multiplier + m`` as in Keras."""
    codes = ctx.weight("kernel")
    rank = int(ctx.attributes["rank"])
    flat = codes.reshape(codes.shape[:rank] + (-1,))
    onnx_codes = np.transpose(flat, [rank] + list(range(rank)))[:, None]
    return _windowed(g, ctx, xp, inputs[0], onnx_codes, group=codes.shape[-2])


def _dense(g, ctx, xp, inputs):
    """Dense over the last axis: a MatMul with the ``(in, out)`` kernel."""

    def matmul(x_name: str, kernel: str) -> str:
        return g.node("MatMul", [x_name, kernel], f"{ctx.hint}/matmul")

    return _kernel_op(g, ctx, xp, inputs[0], ctx.weight("kernel"), 0, matmul)


def _add(g, ctx, xp, inputs):
    """TFLite's integer ADD (:class:`keras_qat.integer.AddOp`)."""
    a, b = (_centered(x, entry) for x, entry in zip(inputs, ctx.input_tensors))
    return AddOp.from_manifest(ctx.op["integer"], grid_of(ctx.output_tensor))(a, b, xp)


def _concatenate(g, ctx, xp, inputs):
    """Each input moved onto the output grid, then concatenated."""
    parts = [_moved(xp, codes, entry, ctx.output_tensor).name for codes, entry in zip(inputs, ctx.input_tensors)]
    return xp.value(g.node("Concat", parts, f"{ctx.hint}/concat", axis=int(ctx.attributes["axis"])), "float32")


def _max_pool(g, ctx, xp, inputs):
    """The largest code of each window (padding never wins), moved onto the output grid."""
    size = ctx.attributes["pool_size"]
    rank = len(size)
    attributes = _window_attributes(ctx, size, ctx.attributes["strides"])
    y = g.node("MaxPool", [_channels_first(g, inputs[0].name, rank, ctx.hint)], f"{ctx.hint}/pool", **attributes)
    pooled = xp.value(_channels_last(g, y, rank, ctx.hint), "float32")
    return _moved(xp, pooled, ctx.input_tensors[0], ctx.output_tensor)


def _average_pool(g, ctx, xp, inputs):
    """TFLite's int8 AVERAGE_POOL_2D: each window's sum of codes (a grouped convolution with
    ones) divided by its count of valid elements (the same convolution of ones), rounding half
    away from zero (:func:`keras_qat.integer.average_codes`)."""
    size = [int(k) for k in ctx.attributes["pool_size"]]
    rank = len(size)
    entry = ctx.input_tensors[0]
    if int(np.prod(size)) * max(abs(entry["qmin"]), abs(entry["qmax"])) >= EXACT_FLOAT32:
        raise LoweringRefusal(f"its windows of {int(np.prod(size))} codes cannot sum exactly in float32")
    channels = int(entry["shape"][-1])
    attributes = _window_attributes(ctx, size, ctx.attributes["strides"])
    x = _channels_first(g, inputs[0].name, rank, ctx.hint)
    window = g.constant(f"{ctx.hint}/window", np.ones([channels, 1] + size, np.float32))
    total = g.node("Conv", [x, window], f"{ctx.hint}/window_sum", group=channels, **attributes)
    first = [g.constant(f"{ctx.hint}/first", np.asarray([v], np.int64), TensorProto.INT64) for v in (0, 1, 1)]
    one_channel = g.node("Slice", [x] + first, f"{ctx.hint}/one_channel")
    zeros = g.node("Mul", [one_channel, g.constant(f"{ctx.hint}/zero", np.float32(0))], f"{ctx.hint}/zeros")
    ones = g.node("Add", [zeros, g.constant(f"{ctx.hint}/one", np.float32(1))], f"{ctx.hint}/ones")
    unit_window = g.constant(f"{ctx.hint}/unit_window", np.ones([1, 1] + size, np.float32))
    count = g.node("Conv", [ones, unit_window], f"{ctx.hint}/window_count", **attributes)
    total = xp.cast(xp.value(_channels_last(g, total, rank, ctx.hint), "float32"), "int64")
    count = xp.cast(xp.value(_channels_last(g, count, rank, f"{ctx.hint}/count"), "float32"), "int64")
    averaged = xp.cast(average_codes(total, count, xp), "float32")
    return _moved(xp, averaged, entry, ctx.output_tensor)


def _mean(g, ctx, xp, inputs):
    """TFLite's int8 MEAN over the spatial axes (:class:`keras_qat.integer.MeanOp`), its sum
    taken in int64."""
    shape = ctx.input_tensors[0]["shape"]
    axes = list(range(1, len(shape) - 1))
    if any(shape[a] is None for a in axes):
        raise LoweringRefusal("it averages over axes of unknown size, which gives no integer divisor; give the model a fixed input size")
    count = int(np.prod([shape[a] for a in axes]))
    centered = xp.cast(_centered(inputs[0], ctx.input_tensors[0]), "int64")
    total = xp.sum(centered, axis=axes, keepdims=bool(ctx.attributes["keepdims"]))
    return MeanOp(_requantize(ctx))(total, count, xp)


def _pad(g, ctx, xp, inputs):
    """Padding with the zero point's code (the real value 0), moved onto the output grid."""
    spatial = [tuple(int(v) for v in p) for p in ctx.attributes["padding"]]
    pads = [0] + [b for b, _ in spatial] + [0] + [0] + [a for _, a in spatial] + [0]
    pads_name = g.constant(f"{ctx.hint}/pads", np.asarray(pads, np.int64), TensorProto.INT64)
    value = g.constant(f"{ctx.hint}/pad_value", np.float32(ctx.input_tensors[0]["zero_point"]))
    padded = xp.value(g.node("Pad", [inputs[0].name, pads_name, value], f"{ctx.hint}/pad", mode="constant"), "float32")
    return _moved(xp, padded, ctx.input_tensors[0], ctx.output_tensor)


def _reshape(g, ctx, xp, inputs):
    """Reshape (Flatten, Reshape) behind the batch axis, channels last as in Keras."""
    reshaped = xp.reshape(inputs[0], [-1] + list(ctx.attributes["shape"]))
    return _moved(xp, reshaped, ctx.input_tensors[0], ctx.output_tensor)


def _identity(g, ctx, xp, inputs):
    """A pass-through layer (or a ReLU its producer already applied)."""
    return _moved(xp, inputs[0], ctx.input_tensors[0], ctx.output_tensor)


def _lookup(g, ctx, xp, inputs):
    """An elementwise activation as the artifact's table, indexed by ``code - qmin``."""
    table = ctx.weight("table").astype(np.float32)
    index = xp.cast(inputs[0] - float(ctx.input_tensors[0]["qmin"]), "int64")
    return xp.take(table, index)


def _softmax(g, ctx, xp, inputs):
    """The integer softmax of the runtime (:func:`keras_qat.integer.softmax_codes`), placed on
    the output grid as :class:`keras_qat.runtime.kernels.SoftmaxOutput` says."""
    output = SoftmaxOutput.of(grid_of(ctx.output_tensor))
    codes = softmax_codes(xp.cast(inputs[0], "int64"), ctx.weight("exp_table"), output.levels, xp)
    if output.requantize is None:
        out = output.out
        return xp.minimum(xp.maximum(xp.cast(codes, "float32") + float(out.zero_point), float(out.qmin)), float(out.qmax))
    int8 = xp.minimum(xp.maximum(codes + SoftmaxOutput.INT8_ZERO_POINT, -128), 127)
    return output.requantize(int8 - SoftmaxOutput.INT8_ZERO_POINT, xp)


#: The exact lowering of each ``.kqat`` op but ``quantize``: ``(graph, context, ops, input codes)
#: -> output codes``.
LOWERINGS: dict[str, Lowering] = {
    "conv": _conv,
    "depthwise_conv": _depthwise_conv,
    "dense": _dense,
    "add": _add,
    "concatenate": _concatenate,
    "max_pool": _max_pool,
    "average_pool": _average_pool,
    "mean": _mean,
    "pad": _pad,
    "reshape": _reshape,
    "identity": _identity,
    "lookup": _lookup,
    "softmax": _softmax,
}

__all__ = ["LOWERINGS", "OpContext", "LoweringRefusal", "EXACT_FLOAT32", "grid_of"]
