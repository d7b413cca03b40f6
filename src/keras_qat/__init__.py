"""keras-qat: quantization-aware training for Keras 3, with a path to real integers.

The public API is re-exported here; nothing is defined in this module.
"""

from keras_qat import ops
from keras_qat.ops import fake_quant

__version__ = "0.1.0"

__all__ = ["ops", "fake_quant"]
