"""keras-qat: quantization-aware training for Keras 3, with a path to real integers.

The public API is re-exported here; nothing is defined in this module.
"""

from keras_qat import ops, quantizers
from keras_qat.ops import fake_quant
from keras_qat.quantizers import (
    AllValuesQuantizer,
    FixedQuantizer,
    LastValueQuantizer,
    MovingAverageQuantizer,
    Quantizer,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "quantizers",
    "fake_quant",
    "Quantizer",
    "LastValueQuantizer",
    "MovingAverageQuantizer",
    "AllValuesQuantizer",
    "FixedQuantizer",
]
