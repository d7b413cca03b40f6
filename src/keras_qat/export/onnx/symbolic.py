"""An ``xp`` that writes ONNX nodes, so the integer ops of :mod:`keras_qat.integer` and
:mod:`keras_qat.fixed_point` become graph nodes without a third copy of their arithmetic.

Those functions take ``xp``: ``numpy`` for the runtime, ``keras.ops`` for the QAT model. Passed
an :class:`OnnxOps`, the same code appends ONNX nodes to a :class:`GraphBuilder`: each
:class:`Value` is one ONNX tensor of a known dtype, and its Python operators (``+``, ``*``,
``//``, comparisons) emit nodes. Operands that are NumPy values (a multiplier, a shift) stay
NumPy: an operation on constants only is computed at build time, so the graph holds the
operations on data alone.

Only what those functions use is implemented; integer semantics follow NumPy's (floor division,
arithmetic right shift) on int64, built from ONNX's ``Div`` (which truncates) and ``Mod`` (whose
result takes the divisor's sign).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from keras_qat.export.onnx.graph import GraphBuilder

_PROTO = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}


@dataclass(frozen=True)
class Value:
    """One tensor of the graph being built: its name, its dtype (``"float32"``, ``"int64"`` or
    ``"bool"``), the :class:`OnnxOps` that writes the nodes of its operators, and its shape where
    a function asks for it (None for the batch and unknown sizes)."""

    name: str
    dtype: str
    ops: "OnnxOps"
    shape: tuple = ()

    # NumPy operands defer to these operators instead of building object arrays.
    __array_ufunc__ = None

    def __add__(self, other):
        return self.ops.binary("Add", self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return self.ops.binary("Sub", self, other)

    def __rsub__(self, other):
        return self.ops.binary("Sub", other, self)

    def __mul__(self, other):
        return self.ops.binary("Mul", self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.ops.binary("Div", self, other)

    def __floordiv__(self, other):
        return self.ops.floor_divide(self, other)

    def __neg__(self):
        return self.ops.unary("Neg", self)

    def __ge__(self, other):
        return self.ops.compare("GreaterOrEqual", self, other)

    def __gt__(self, other):
        return self.ops.compare("Greater", self, other)

    def __le__(self, other):
        return self.ops.compare("LessOrEqual", self, other)

    def __lt__(self, other):
        return self.ops.compare("Less", self, other)


def _is_value(x) -> bool:
    return isinstance(x, Value)


class OnnxOps:
    """The subset of the ``keras.ops`` API that keras-qat's integer arithmetic calls, writing
    ONNX nodes into ``graph`` (``hint`` prefixes their names)."""

    def __init__(self, graph: GraphBuilder, hint: str):
        self.graph = graph
        self.hint = hint

    # ---- values --------------------------------------------------------------------------

    def value(self, name: str, dtype: str, shape: tuple = ()) -> Value:
        """An existing graph tensor as a :class:`Value`."""
        return Value(name, dtype, self, tuple(shape))

    def _operand(self, x, dtype: str) -> str:
        """The graph name of ``x``: a Value's own, or a constant of ``dtype`` holding ``x``."""
        if _is_value(x):
            return x.name
        array = np.asarray(x)
        if dtype == "int64" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
            raise TypeError(f"{self.hint}: a fractional constant {array} cannot meet an int64 tensor.")
        return self.graph.constant(f"{self.hint}/const", array.astype(dtype), _PROTO[dtype])

    def _node(self, op_type: str, inputs: list[str], dtype: str, **attributes) -> Value:
        return Value(self.graph.node(op_type, inputs, f"{self.hint}/{op_type.lower()}", **attributes), dtype, self)

    @staticmethod
    def _dtype_of(*operands) -> str:
        for x in operands:
            if _is_value(x):
                return x.dtype
        raise TypeError("OnnxOps: an operation on constants only is computed with NumPy.")

    def binary(self, op_type: str, a, b) -> Value | np.ndarray:
        if not _is_value(a) and not _is_value(b):
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op_type](a, b)
        dtype = self._dtype_of(a, b)
        return self._node(op_type, [self._operand(a, dtype), self._operand(b, dtype)], dtype)

    def compare(self, op_type: str, a, b) -> Value:
        dtype = self._dtype_of(a, b)
        return self._node(op_type, [self._operand(a, dtype), self._operand(b, dtype)], "bool")

    def unary(self, op_type: str, x) -> Value:
        return self._node(op_type, [x.name], x.dtype)

    # ---- the keras.ops API -----------------------------------------------------------------

    def cast(self, x, dtype: str):
        if not _is_value(x):
            return np.asarray(x).astype(dtype)
        if x.dtype == dtype:
            return x
        return self._node("Cast", [x.name], dtype, to=_PROTO[dtype])

    def where(self, condition, a, b):
        if not _is_value(condition) and not _is_value(a) and not _is_value(b):
            return np.where(condition, a, b)
        dtype = self._dtype_of(a, b) if (_is_value(a) or _is_value(b)) else np.asarray(a).dtype.name
        dtype = "float32" if dtype.startswith("float") else ("int64" if dtype.startswith("int") else dtype)
        return self._node("Where", [self._operand(condition, "bool"), self._operand(a, dtype), self._operand(b, dtype)], dtype)

    def abs(self, x):
        return np.abs(x) if not _is_value(x) else self.unary("Abs", x)

    def sign(self, x):
        return np.sign(x) if not _is_value(x) else self.unary("Sign", x)

    def floor(self, x):
        return np.floor(x) if not _is_value(x) else self.unary("Floor", x)

    def round(self, x):
        """Half to even, as NumPy's."""
        return np.round(x) if not _is_value(x) else self.unary("Round", x)

    def maximum(self, a, b):
        if not _is_value(a) and not _is_value(b):
            return np.maximum(a, b)
        dtype = self._dtype_of(a, b)
        return self._node("Max", [self._operand(a, dtype), self._operand(b, dtype)], dtype)

    def minimum(self, a, b):
        if not _is_value(a) and not _is_value(b):
            return np.minimum(a, b)
        dtype = self._dtype_of(a, b)
        return self._node("Min", [self._operand(a, dtype), self._operand(b, dtype)], dtype)

    def equal(self, a, b):
        if not _is_value(a) and not _is_value(b):
            return np.equal(a, b)
        return self.compare("Equal", a, b)

    def ones_like(self, x):
        return np.ones_like(x) if not _is_value(x) else self._unsupported("ones_like")

    def zeros_like(self, x):
        return np.zeros_like(x) if not _is_value(x) else self._unsupported("zeros_like")

    def floor_divide(self, a, b):
        """NumPy's ``//`` for int64: ``(a - a mod b) / b``, exact for a positive divisor ``b``
        (ONNX's ``Mod`` takes the divisor's sign, its ``Div`` truncates)."""
        if not _is_value(a) and not _is_value(b):
            return np.floor_divide(a, b)
        if not _is_value(b) and np.any(np.asarray(b) <= 0):
            raise ValueError(f"{self.hint}: floor division by a non-positive constant is not written.")
        dtype = self._dtype_of(a, b)
        a_name, b_name = self._operand(a, dtype), self._operand(b, dtype)
        remainder = self._node("Mod", [a_name, b_name], dtype, fmod=0)
        return self._node("Div", [self._node("Sub", [a_name, remainder.name], dtype).name, b_name], dtype)

    def left_shift(self, x, bits):
        if not _is_value(x) and not _is_value(bits):
            return np.left_shift(x, bits)
        return x * np.left_shift(np.int64(1), np.asarray(bits, np.int64))

    def right_shift(self, x, bits):
        """Arithmetic right shift: floor division by ``2**bits``."""
        if not _is_value(x) and not _is_value(bits):
            return np.right_shift(x, bits)
        return self.floor_divide(x, np.left_shift(np.int64(1), np.asarray(bits, np.int64)))

    def bitwise_and(self, x, mask):
        """``x & mask`` for a mask of low bits (``2**k - 1``): ``x mod 2**k``."""
        if not _is_value(x) and not _is_value(mask):
            return np.bitwise_and(x, mask)
        modulus = np.asarray(mask, np.int64) + 1
        if _is_value(mask) or np.any(modulus & (modulus - 1)):
            return self._unsupported("bitwise_and with a mask that is not 2**k - 1")
        return self._node("Mod", [x.name, self._operand(modulus, x.dtype)], x.dtype, fmod=0)

    def reshape(self, x, shape):
        if not _is_value(x):
            return np.reshape(x, shape)
        target = self._operand(np.asarray(shape, np.int64), "int64")
        return self._node("Reshape", [x.name, target], x.dtype)

    # ---- reductions and gathers (the integer softmax) ---------------------------------------

    def max(self, x, axis: int = -1, keepdims: bool = True) -> Value:
        return self._reduce("ReduceMax", x, axis, keepdims)

    def sum(self, x, axis: int = -1, keepdims: bool = True) -> Value:
        return self._reduce("ReduceSum", x, axis, keepdims)

    def _reduce(self, op_type: str, x: Value, axis, keepdims: bool) -> Value:
        axes = [axis] if isinstance(axis, int) else list(axis)
        if op_type == "ReduceSum" or self.graph.opset >= 18:
            axes_name = self._operand(np.asarray(axes, np.int64), "int64")
            return self._node(op_type, [x.name, axes_name], x.dtype, keepdims=int(keepdims))
        return self._node(op_type, [x.name], x.dtype, axes=axes, keepdims=int(keepdims))

    def take(self, table, indices: Value) -> Value:
        """``table[indices]`` for a NumPy table (a constant) and int64 indices."""
        table = np.asarray(table)
        dtype = "int64" if table.dtype.kind in "iu" else "float32"
        return self._node("Gather", [self._operand(table, dtype), indices.name], dtype, axis=0)

    def _unsupported(self, what: str):
        raise NotImplementedError(f"OnnxOps: {what} on graph values is not written.")


__all__ = ["OnnxOps", "Value"]
