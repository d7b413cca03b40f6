"""ONNX export: a QAT model as a QDQ graph, from the integer form the ``.kqat`` artifact holds.

* :mod:`.graph`: a small ONNX graph builder and the integer type of each bit width;
* :mod:`.symbolic`: an ``xp`` that writes ONNX nodes, so :mod:`keras_qat.integer`'s own
  code writes the integer arithmetic;
* :mod:`.lowering`: each integer op as ONNX ops between DequantizeLinear and QuantizeLinear;
* :mod:`.convert`: :func:`to_onnx`, the checked, atomic export;
* :mod:`.run`: ONNX Runtime's side of :func:`keras_qat.export.compare`.
"""

from keras_qat.export.onnx.convert import DEFAULT_OPSET, MIN_OPSET, TARGET, to_onnx

__all__ = ["to_onnx", "DEFAULT_OPSET", "MIN_OPSET", "TARGET"]
