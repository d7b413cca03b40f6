"""LiteRT (TFLite int8) export, in three jobs:

* :mod:`.convert`: :func:`to_tflite`, the conversion, refused up front where inexact;
* :mod:`.inspect`: :class:`TFLiteCheck`, what the converted model computes in float or
  quantizes twice, each op named with its Keras layer;
* :mod:`.compare`: the LiteRT interpreter's side of :func:`keras_qat.export.compare`;

and :mod:`.trace`, how kernel layers are traced for the converter.
"""

from keras_qat.export.targets import TFLITE_MAX_BITS, layer_quantizers
from keras_qat.export.tflite.convert import to_tflite
from keras_qat.export.tflite.inspect import TFLiteCheck, TFLiteOp, analyse_flatbuffer, layer_names, layer_of_tensor

__all__ = [
    "to_tflite",
    "TFLiteCheck",
    "TFLiteOp",
    "analyse_flatbuffer",
    "layer_of_tensor",
    "layer_names",
    "layer_quantizers",
    "TFLITE_MAX_BITS",
]
