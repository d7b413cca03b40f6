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

from keras_qat.export.onnx.graph import GraphBuilder, OnnxType, onnx_type
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
    """Kernel shape, strides (and dilations) and TF's padding: SAME_UPPER puts the odd pixel
    at the end, as TensorFlow's ``same`` does."""
    attributes = {
        "kernel_shape": [int(k) for k in size],
        "strides": [int(s) for s in strides],
        "auto_pad": "SAME_UPPER" if ctx.attributes["padding"] == "same" else "VALID",
    }
    if dilation is not None:
        attributes["dilations"] = [int(d) for d in dilation]
    return attributes


# ---- weights ---------------------------------------------------------------------------------


def _weight_type(ctx: OpContext) -> OnnxType:
    entry = ctx.op["weights"]["kernel"]
    type_ = onnx_type(entry["bits"], ctx.opset)
    if type_ is None:
        raise ValueError(f"layer '{ctx.hint}': {entry['bits']}-bit weights have no ONNX type at opset {ctx.opset}.")
    return type_


def _dequantized_kernel(g: GraphBuilder, ctx: OpContext, codes: np.ndarray, channel_axis: int) -> str:
    """The kernel's integer codes (already in ONNX's layout, channels on ``channel_axis``) as an
    initializer read through a DequantizeLinear with the kernel's scales and zero points."""
    entry = ctx.op["weights"]["kernel"]
    type_ = _weight_type(ctx)
    scale = np.asarray(entry["scale"], np.float32)
    zero_point = np.asarray(entry["zero_point"], np.int64)
    per_channel = scale.size > 1
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    stored = codes + (zero_point.reshape([-1 if a == channel_axis else 1 for a in range(codes.ndim)]) if per_channel else zero_point)
    name = g.constant(f"{ctx.hint}/kernel", stored, type_.proto)
    scale_name, zero_name = g.grid_constants(f"{ctx.hint}/kernel", scale, zero_point, type_)
    return g.dequantize(name, scale_name, zero_name, f"{ctx.hint}/kernel_dq", axis=channel_axis if per_channel else None)


#: Float32 sums of integers are exact below this.
EXACT_FLOAT32 = 2**24

Lowering = Callable[[GraphBuilder, OpContext, OnnxOps, list], Value]


def grid_of(entry: dict) -> IntegerGrid:
    return IntegerGrid.from_manifest(entry)


def _centered(xp: OnnxOps, codes: Value, entry: dict) -> Value:
    return codes - float(entry["zero_point"])


def _largest_centered(entry: dict) -> int:
    return max(abs(entry["qmin"] - entry["zero_point"]), abs(entry["qmax"] - entry["zero_point"]))


# ---- accumulators ------------------------------------------------------------------------------


def _channel_chunks(weight_magnitude: np.ndarray, largest_input: int) -> list[tuple[int, int]]:
    """Input-channel ranges ``[start, stop)`` over which every output's partial sum of
    ``|x| * |w|`` stays below ``2**24``; ``weight_magnitude`` is ``(C_in, C_out)``."""
    chunks, start, bound = [], 0, np.zeros(weight_magnitude.shape[1], np.int64)
    for channel in range(weight_magnitude.shape[0]):
        row = weight_magnitude[channel].astype(np.int64) * largest_input
        if np.any(row >= EXACT_FLOAT32):
            raise ValueError("one input channel's products reach 2**24, so its sums cannot be exact in float32")
        if np.any(bound + row >= EXACT_FLOAT32):
            chunks.append((start, channel))
            start, bound = channel, np.zeros_like(bound)
        bound = bound + row
    chunks.append((start, weight_magnitude.shape[0]))
    return chunks


def _kernel_codes(g: GraphBuilder, ctx: OpContext, codes: np.ndarray, out_axis: int) -> str:
    """The kernel stored as integers with its scales and zero points (a DequantizeLinear, per
    axis for a per-channel kernel), and its codes read back from it: ``round(w / scale)``, exact
    float32 integers (a constant that ONNX Runtime's optimizer folds)."""
    real = _dequantized_kernel(g, ctx, codes, channel_axis=out_axis)
    scale = np.asarray(ctx.op["weights"]["kernel"]["scale"], np.float32)
    if scale.size > 1:
        scale = scale.reshape([-1 if axis == out_axis else 1 for axis in range(codes.ndim)])
    steps = g.node("Div", [real, g.constant(f"{ctx.hint}/kernel_scale", scale.reshape(scale.shape if scale.size > 1 else ()))], f"{ctx.hint}/kernel_steps")
    return g.node("Round", [steps], f"{ctx.hint}/kernel_codes")


def _accumulate(g: GraphBuilder, ctx: OpContext, xp: OnnxOps, x: Value, onnx_codes: np.ndarray, channel_axis: int, make) -> Value:
    """The exact int64 accumulator: ``make(x_part, kernel_part)`` (a float32 Conv or MatMul of
    integers) over chunks of input channels, each exact, summed in int64."""
    magnitude = np.abs(onnx_codes)
    out_axis = 0 if channel_axis == 1 else 1
    per_input = np.moveaxis(magnitude, (channel_axis, out_axis), (0, 1)).reshape(magnitude.shape[channel_axis], magnitude.shape[out_axis], -1).sum(axis=2)
    chunks = _channel_chunks(per_input, _largest_centered(ctx.input_tensors[0]))
    total = None
    for index, (start, stop) in enumerate(chunks):
        part_codes = np.take(onnx_codes, np.arange(start, stop), axis=channel_axis)
        kernel = _kernel_codes(g, ctx, part_codes, out_axis)
        part_x = x
        if len(chunks) > 1:
            part_x = _slice_channels(g, xp, x, start, stop, ctx.hint)
        accumulator = xp.cast(xp.value(make(part_x.name, kernel), "float32"), "int64")
        total = accumulator if total is None else total + accumulator
    return total


def _slice_channels(g: GraphBuilder, xp: OnnxOps, x: Value, start: int, stop: int, hint: str) -> Value:
    """``x[..., start:stop]`` (channels last)."""
    constants = [g.constant(f"{hint}/slice", np.asarray([v], np.int64), TensorProto.INT64) for v in (start, stop, -1)]
    return xp.value(g.node("Slice", [x.name] + constants, f"{hint}/channels_{start}_{stop}"), "float32")


def _requantize(ctx: OpContext) -> Requantize:
    return Requantize.from_manifest(ctx.op["integer"]["requantize"], grid_of(ctx.output_tensor))


#: The int64 fixed-point product ``acc * 2**left_shift * m0`` (``m0 < 2**31``) fits below this.
INT64_PRODUCT_BOUND = 2**32


def _kernel_op(g: GraphBuilder, ctx: OpContext, xp: OnnxOps, x: Value, onnx_codes: np.ndarray, channel_axis: int, make) -> Value:
    bias = ctx.weight("bias") if "bias" in ctx.op["weights"] else None
    requantize = _requantize(ctx)
    _check_product_fits(ctx, onnx_codes, channel_axis, bias, requantize)
    accumulator = _accumulate(g, ctx, xp, _centered(xp, x, ctx.input_tensors[0]), onnx_codes, channel_axis, make)
    return KernelOp(bias, requantize)(accumulator, xp)


def _check_product_fits(ctx: OpContext, onnx_codes: np.ndarray, channel_axis: int, bias, requantize: Requantize) -> None:
    """Refuse a kernel whose accumulator, shifted and multiplied in fixed point, could pass
    int64 (16-bit operands over many terms): the runtime takes those in Python integers, ONNX
    has none wider."""
    out_axis = 0 if channel_axis == 1 else 1
    magnitude = np.moveaxis(np.abs(onnx_codes), out_axis, 0).reshape(onnx_codes.shape[out_axis], -1).sum(axis=1)
    bound = magnitude.astype(np.int64) * _largest_centered(ctx.input_tensors[0])
    if bias is not None:
        bound = bound + np.abs(bias).astype(np.int64)
    bound = bound * np.left_shift(np.int64(1), np.maximum(np.asarray(requantize.shift, np.int64), 0))
    if np.any(bound >= INT64_PRODUCT_BOUND):
        raise ValueError(
            f"its accumulator can reach 2**{int(np.log2(bound.max()))}, beyond what ONNX's int64 fixed-point "
            "requantization holds; quantize its input at 8 bits or fewer, or export it to .kqat"
        )


def _windowed(g: GraphBuilder, ctx: OpContext, xp: OnnxOps, x: Value, onnx_codes: np.ndarray, group: int) -> Value:
    rank = int(ctx.attributes["rank"])
    attributes = _window_attributes(ctx, list(onnx_codes.shape[2:]), ctx.attributes["strides"], ctx.attributes["dilation_rate"])

    def conv(x_name: str, kernel: str) -> str:
        y = g.node("Conv", [_channels_first(g, x_name, rank, ctx.hint), kernel], f"{ctx.hint}/conv", group=int(group), **attributes)
        return _channels_last(g, y, rank, ctx.hint)

    if group > 1:  # depthwise: each output reads one input channel; no chunks
        bound = np.abs(onnx_codes).reshape(onnx_codes.shape[0], -1).sum(axis=1).max() * _largest_centered(ctx.input_tensors[0])
        if bound >= EXACT_FLOAT32:
            raise ValueError(f"its depthwise window of {onnx_codes[0].size} taps cannot sum exactly in float32")
        centered = _centered(xp, x, ctx.input_tensors[0])
        accumulator = xp.cast(xp.value(conv(centered.name, _kernel_codes(g, ctx, onnx_codes, 0)), "float32"), "int64")
        bias = ctx.weight("bias") if "bias" in ctx.op["weights"] else None
        return KernelOp(bias, _requantize(ctx))(accumulator, xp)
    return _kernel_op(g, ctx, xp, x, onnx_codes, 1, conv)


def _conv(g, ctx, xp, inputs):
    codes = ctx.weight("kernel")
    rank = int(ctx.attributes["rank"])
    return _windowed(g, ctx, xp, inputs[0], np.transpose(codes, [rank + 1, rank] + list(range(rank))), group=1)


def _depthwise_conv(g, ctx, xp, inputs):
    codes = ctx.weight("kernel")
    rank = int(ctx.attributes["rank"])
    flat = codes.reshape(codes.shape[:rank] + (-1,))
    return _windowed(g, ctx, xp, inputs[0], np.transpose(flat, [rank] + list(range(rank)))[:, None], group=codes.shape[-2])


def _dense(g, ctx, xp, inputs):
    def matmul(x_name: str, kernel: str) -> str:
        return g.node("MatMul", [x_name, kernel], f"{ctx.hint}/matmul")

    return _kernel_op(g, ctx, xp, inputs[0], ctx.weight("kernel"), 0, matmul)


def _add(g, ctx, xp, inputs):
    a, b = (_centered(xp, x, entry) for x, entry in zip(inputs, ctx.input_tensors))
    return AddOp.from_manifest(ctx.op["integer"], grid_of(ctx.output_tensor))(a, b, xp)


def _moved(g, ctx, xp, codes: Value) -> Value:
    """Codes on the input grid moved onto the output grid, as the runtime's ``requantize_codes``:
    the identity when the two are equal, else a single-rounding requantization."""
    grid, out = grid_of(ctx.input_tensors[0]), grid_of(ctx.output_tensor)
    if grid == out:
        return codes
    return Requantize.between(grid, out, single_rounding=True)(codes - float(grid.zero_point), xp)


def _concatenate(g, ctx, xp, inputs):
    out = grid_of(ctx.output_tensor)
    parts = []
    for codes, entry in zip(inputs, ctx.input_tensors):
        grid = grid_of(entry)
        moved = codes if grid == out else Requantize.between(grid, out, single_rounding=True)(codes - float(grid.zero_point), xp)
        parts.append(moved.name)
    return xp.value(g.node("Concat", parts, f"{ctx.hint}/concat", axis=int(ctx.attributes["axis"])), "float32")


def _max_pool(g, ctx, xp, inputs):
    size = ctx.attributes["pool_size"]
    rank = len(size)
    y = g.node("MaxPool", [_channels_first(g, inputs[0].name, rank, ctx.hint)], f"{ctx.hint}/pool", **_window_attributes(ctx, size, ctx.attributes["strides"]))
    return _moved(g, ctx, xp, xp.value(_channels_last(g, y, rank, ctx.hint), "float32"))


def _average_pool(g, ctx, xp, inputs):
    """The window's sum of codes (a depthwise convolution with ones) and its count of valid
    elements (the same on ones), divided as TFLite's int8 AVERAGE_POOL_2D divides."""
    size = [int(k) for k in ctx.attributes["pool_size"]]
    rank = len(size)
    channels = int(ctx.input_tensors[0]["shape"][-1])
    attributes = _window_attributes(ctx, size, ctx.attributes["strides"])
    x = _channels_first(g, inputs[0].name, rank, ctx.hint)
    ones = g.constant(f"{ctx.hint}/window", np.ones([channels, 1] + size, np.float32))
    total = g.node("Conv", [x, ones], f"{ctx.hint}/window_sum", group=channels, **attributes)
    first = g.node("Slice", [x] + [g.constant(f"{ctx.hint}/first", np.asarray([v], np.int64), TensorProto.INT64) for v in (0, 1, 1)], f"{ctx.hint}/one_channel")
    present = g.node("Add", [g.node("Mul", [first, g.constant(f"{ctx.hint}/zero", np.float32(0))], f"{ctx.hint}/zeros"), g.constant(f"{ctx.hint}/one", np.float32(1))], f"{ctx.hint}/ones")
    count = g.node("Conv", [present, g.constant(f"{ctx.hint}/window1", np.ones([1, 1] + size, np.float32))], f"{ctx.hint}/window_count", **attributes)
    total = xp.cast(xp.value(_channels_last(g, total, rank, ctx.hint), "float32"), "int64")
    count = xp.cast(xp.value(_channels_last(g, count, rank, f"{ctx.hint}/count"), "float32"), "int64")
    return _moved(g, ctx, xp, xp.cast(average_codes(total, count, xp), "float32"))


def _mean(g, ctx, xp, inputs):
    shape = ctx.input_tensors[0]["shape"]
    axes = list(range(1, len(shape) - 1))
    if any(shape[a] is None for a in axes):
        raise ValueError("it averages over axes of unknown size, which gives no integer divisor; give the model a fixed input size")
    count = int(np.prod([shape[a] for a in axes]))
    centered = _centered(xp, inputs[0], ctx.input_tensors[0])
    total = xp.cast(xp.sum(centered, axis=axes, keepdims=bool(ctx.attributes["keepdims"])), "int64")
    return MeanOp(_requantize(ctx))(total, count, xp)


def _pad(g, ctx, xp, inputs):
    spatial = [tuple(int(v) for v in p) for p in ctx.attributes["padding"]]
    pads = g.constant(f"{ctx.hint}/pads", np.asarray([0] + [b for b, _ in spatial] + [0] + [0] + [a for _, a in spatial] + [0], np.int64), TensorProto.INT64)
    value = g.constant(f"{ctx.hint}/pad_value", np.float32(ctx.input_tensors[0]["zero_point"]))
    return _moved(g, ctx, xp, xp.value(g.node("Pad", [inputs[0].name, pads, value], f"{ctx.hint}/pad", mode="constant"), "float32"))


def _reshape(g, ctx, xp, inputs):
    return _moved(g, ctx, xp, xp.reshape(inputs[0], [-1] + list(ctx.attributes["shape"])))


def _identity(g, ctx, xp, inputs):
    return _moved(g, ctx, xp, inputs[0])


def _lookup(g, ctx, xp, inputs):
    table = ctx.weight("table").astype(np.float32)
    index = xp.cast(inputs[0] - float(ctx.input_tensors[0]["qmin"]), "int64")
    return xp.take(table, index)


def _softmax(g, ctx, xp, inputs):
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

__all__ = ["LOWERINGS", "OpContext", "EXACT_FLOAT32", "grid_of"]
