"""The integer op of each layer kind, written once.

A quantized layer deploys as an integer op: its inputs' and output's grids
(:mod:`keras_qat.grid`), weight and bias codes, fixed-point multipliers and shifts, activation
bounds. This package *lowers* a layer to those parameters (from grids, in the converter's
arithmetic) and *executes* the arithmetic that follows the accumulation, for NumPy and for
``keras.ops`` alike (every function takes ``xp``):

* the QAT model's inference (:mod:`keras_qat.emulation`) lowers and executes with ``keras.ops``;
* the ``.kqat`` writer (:mod:`keras_qat.export.artifact`) lowers with NumPy and serializes the
  parameters;
* the runtime (:mod:`keras_qat.runtime`) executes the serialized parameters with NumPy.

Accumulation (a convolution's or a matrix product's sum of code products) is exact integer
arithmetic wherever it runs, so each backend does it its own fast way; everything that rounds
is here. This package imports NumPy only.
"""

from keras_qat.integer.lowering import (
    INT8_SOFTMAX_LEVELS,
    INT8_SOFTMAX_ZERO_POINT,
    AddOp,
    KernelOp,
    LeakyReluOp,
    MeanOp,
    MultiplyOp,
    add_centered_output,
    average_codes,
    requantize_between,
    softmax_codes,
    softmax_exp_table,
    int8_softmax_grid,
    softmax_levels,
)
from keras_qat.integer.requantize import Requantize, centered_output

__all__ = [
    "Requantize",
    "centered_output",
    "add_centered_output",
    "softmax_exp_table",
    "int8_softmax_grid",
    "INT8_SOFTMAX_LEVELS",
    "INT8_SOFTMAX_ZERO_POINT",
    "softmax_levels",
    "KernelOp",
    "AddOp",
    "MultiplyOp",
    "LeakyReluOp",
    "MeanOp",
    "average_codes",
    "requantize_between",
    "softmax_codes",
]
