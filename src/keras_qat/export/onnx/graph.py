"""A small builder of ONNX graphs: nodes, initializers and unique names, with the QDQ pair.

:class:`GraphBuilder` knows nothing of Keras or of the ``.kqat`` manifest: it holds ONNX nodes
and constants, and writes the two pieces every quantized tensor needs, ``QuantizeLinear`` and
``DequantizeLinear`` on an integer grid (:meth:`quantize`, :meth:`dequantize`), in the ONNX
integer type that holds the grid (:func:`onnx_type`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

#: ONNX's signed integer types: ``bits -> (TensorProto type, lowest, highest, first opset)``.
#: A grid narrower than its type (3, 5, 6 or 7 bits, or a narrow range) is held in the next
#: wider one, its values kept on the grid by a clip before the QuantizeLinear.
SIGNED_TYPES = {
    4: (TensorProto.INT4, -8, 7, 21),
    8: (TensorProto.INT8, -128, 127, 13),
    16: (TensorProto.INT16, -32768, 32767, 21),
}


@dataclass(frozen=True)
class OnnxType:
    """The ONNX integer type that holds a grid's codes."""

    proto: int
    low: int
    high: int


def onnx_type(bits: int, opset: int) -> OnnxType | None:
    """The narrowest signed ONNX type that holds ``bits``-bit codes at ``opset``; None if none does
    (more than 8 bits before opset 21, more than 16 at all)."""
    for width in sorted(SIGNED_TYPES):
        proto, low, high, first = SIGNED_TYPES[width]
        if bits <= width and opset >= first:
            return OnnxType(proto, low, high)
    return None


@dataclass
class GraphBuilder:
    """Collects the nodes and initializers of one ONNX graph.

    Attributes:
        opset: the ``ai.onnx`` opset the graph is built for.
    """

    opset: int
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)

    def name(self, hint: str) -> str:
        """A value or node name not used yet, readable from ``hint``."""
        base = "".join(c if c.isalnum() or c in "_./-" else "_" for c in hint) or "v"
        candidate, index = base, 1
        while candidate in self._names:
            candidate, index = f"{base}_{index}", index + 1
        self._names.add(candidate)
        return candidate

    def constant(self, hint: str, values, proto: int = TensorProto.FLOAT) -> str:
        """An initializer holding ``values`` as ``proto`` (float32 by default); its name."""
        name = self.name(hint)
        array = np.asarray(values)
        if proto == TensorProto.FLOAT:
            array = array.astype(np.float32)
            tensor = onnx.numpy_helper.from_array(array, name)
        elif proto in (TensorProto.INT32, TensorProto.INT64):
            array = array.astype(np.int32 if proto == TensorProto.INT32 else np.int64)
            tensor = onnx.numpy_helper.from_array(array, name)
        else:  # INT4, INT8, INT16: the onnx helper packs int4 values two to a byte
            tensor = helper.make_tensor(name, proto, list(array.shape), array.astype(np.int64).ravel().tolist())
        self.initializers.append(tensor)
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, **attributes) -> str:
        """Append one single-output node; the name of its output."""
        output = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.name(f"{hint}/{op_type}"), **attributes))
        return output

    # ---- the QDQ pair --------------------------------------------------------------------

    def grid_constants(self, hint: str, scale, zero_point, type_: OnnxType) -> tuple[str, str]:
        """The scale (float32) and zero point (in the codes' type) initializers of a grid."""
        return self.constant(f"{hint}/scale", scale), self.constant(f"{hint}/zero_point", zero_point, type_.proto)

    def quantize(self, x: str, scale: str, zero_point: str, hint: str, axis: int | None = None) -> str:
        """``QuantizeLinear``: ``saturate(round_half_even(x / scale) + zero_point)``."""
        attributes = {} if axis is None else {"axis": axis}
        return self.node("QuantizeLinear", [x, scale, zero_point], hint, **attributes)

    def dequantize(self, q: str, scale: str, zero_point: str | None, hint: str, axis: int | None = None) -> str:
        """``DequantizeLinear``: ``(q - zero_point) * scale`` in float32."""
        attributes = {} if axis is None else {"axis": axis}
        inputs = [q, scale] + ([] if zero_point is None else [zero_point])
        return self.node("DequantizeLinear", inputs, hint, **attributes)

    def transpose(self, x: str, perm: list[int], hint: str) -> str:
        return self.node("Transpose", [x], hint, perm=perm)


__all__ = ["GraphBuilder", "OnnxType", "onnx_type", "SIGNED_TYPES"]
