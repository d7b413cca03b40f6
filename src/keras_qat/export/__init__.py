"""Exporters: from a trained quantization-aware model to deployable integer models.

* :func:`to_tflite` converts a QAT model to an int8 TFLite (LiteRT) flatbuffer and checks the
  result: which ops were left computing in float, and which quantize ops requantize a tensor
  that the QAT model quantized only once. :class:`TFLiteCheck` holds that check.
* :func:`to_onnx` writes an ONNX QDQ graph (weights as integers with their scales and zero
  points, every quantized tensor a QuantizeLinear/DequantizeLinear pair), from the same integer
  form as the ``.kqat`` artifact.
* :func:`compare` runs the TFLite model in the LiteRT interpreter, or the ONNX model in ONNX
  Runtime, next to the QAT model in inference mode and counts their differences in output
  quantization steps (:class:`AgreementReport`).
* :func:`diagnose` lists, per layer, the quantized tensors with bits and ranges, and what a
  deployment would still run in float (:class:`Diagnosis`).
* :func:`save_artifact` writes the model as integer ops with its weights packed at their bit
  widths, in one checksummed ``.kqat`` file that :func:`keras_qat.runtime.load` runs.
* :func:`quantized_weights` reads out the integers, scales and zero points of every quantized
  weight, at any bit width (:class:`QuantizedTensor`); :func:`real_weights` the float values
  they round.

This module only re-exports; each exporter lives in its own submodule.
"""

from keras_qat.export.artifact import save_artifact
from keras_qat.format.container import ArtifactError
from keras_qat.export.diagnose import Diagnosis, diagnose
from keras_qat.export.compare import AgreementReport, OutputAgreement, compare
from keras_qat.export.onnx import to_onnx
from keras_qat.export.tflite import TFLiteCheck, TFLiteOp, to_tflite
from keras_qat.export.weights import QuantizedTensor, quantized_weights, real_weights

__all__ = [
    "to_tflite",
    "to_onnx",
    "compare",
    "TFLiteCheck",
    "TFLiteOp",
    "AgreementReport",
    "OutputAgreement",
    "quantized_weights",
    "real_weights",
    "QuantizedTensor",
    "diagnose",
    "Diagnosis",
    "save_artifact",
    "ArtifactError",
]
