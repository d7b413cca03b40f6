"""INT4 storage for weights trained at 4 bits or fewer, where LiteRT's kernels take it.

The TFLite converter holds a kernel trained at 2..4 bits in an INT8 tensor whose values lie in
the trained range (:func:`keras_qat.ops.fake_quant` exports the low-bit grid as an 8-bit one).
LiteRT's CONV_2D (from op version 7) and FULLY_CONNECTED (from version 10) also take INT4
filters, packed two to a byte, low nibble first, and unpack them to the same int8 values before
computing: the deployed model computes exactly what it did, in half the weight bytes. The
converter offers no way to emit those tensors from a QAT graph, so this module rewrites its
flatbuffer. DEPTHWISE_CONV_2D's INT4 version (7) is left alone: LiteRT's reference kernels do not
register it, so the exactness check could not run it.

A filter is rewritten when its scales are exactly those of a kernel the model trained at 4 bits
or fewer (the caller lists them) and all its values lie in [-8, 7]; a buffer another tensor also
reads is never touched.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: The first op version of each builtin that takes an INT4 filter (input 1).
INT4_FILTER_VERSIONS = {"CONV_2D": 7, "FULLY_CONNECTED": 10}

INT4_MIN, INT4_MAX = -8, 7


def pack_nibbles(values: np.ndarray) -> bytes:
    """Signed 4-bit ``values`` two to a byte, the first in the low nibble (TFLite's layout);
    an odd count leaves the last high nibble 0."""
    nibbles = (np.asarray(values, np.int64).reshape(-1) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def _scale_key(scales: Iterable[float]) -> tuple:
    return tuple(np.asarray(scales, np.float32).reshape(-1).tolist())


def pack_int4_filters(content: bytes, low_bit_scales: Iterable[np.ndarray]) -> tuple[bytes, int]:
    """``content`` (a flatbuffer) with the INT8 filters of CONV_2D and FULLY_CONNECTED whose
    scales are one of ``low_bit_scales`` stored as INT4; and how many were rewritten."""
    from flatbuffers import Builder
    from tensorflow.lite.python import schema_py_generated as schema

    wanted = {_scale_key(scales) for scales in low_bit_scales}
    if not wanted:
        return content, 0
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    readers: dict[int, int] = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            readers[tensor.buffer] = readers.get(tensor.buffer, 0) + 1
    rewritten = 0
    for subgraph in model.subgraphs:
        for operator in subgraph.operators:
            code = model.operatorCodes[operator.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if name not in INT4_FILTER_VERSIONS or len(operator.inputs) < 2 or operator.inputs[1] < 0:
                continue
            tensor = subgraph.tensors[operator.inputs[1]]
            buffer = model.buffers[tensor.buffer]
            quantization = tensor.quantization
            if (
                tensor.type != schema.TensorType.INT8
                or readers.get(tensor.buffer) != 1
                or buffer.data is None
                or quantization is None
                or quantization.scale is None
                or _scale_key(quantization.scale) not in wanted
            ):
                continue
            values = np.frombuffer(bytes(bytearray(buffer.data)), np.int8)
            if values.size == 0 or values.min() < INT4_MIN or values.max() > INT4_MAX:
                continue
            buffer.data = np.frombuffer(pack_nibbles(values), np.uint8)
            tensor.type = schema.TensorType.INT4
            code.version = max(code.version, INT4_FILTER_VERSIONS[name])
            rewritten += 1
    if not rewritten:
        return content, 0
    builder = Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), rewritten


__all__ = ["pack_int4_filters", "pack_nibbles", "INT4_FILTER_VERSIONS"]
