"""keras-qat: quantization-aware training for Keras 3, with a path to real integers.

The public API is re-exported here; nothing is defined in this module.
"""

from keras_qat import ops, quantizers, schemes
from keras_qat.api import (
    quantize_annotate_layer,
    quantize_annotate_model,
    quantize_apply,
    quantize_model,
    quantize_scope,
)
from keras_qat.config import LayerQuantizeConfig, NoOpQuantizeConfig, QuantizeConfig
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeAnnotate, QuantizeAwareActivation, QuantizeLayer, QuantizeSameScale, QuantizeWrapper
from keras_qat.ops import fake_quant
from keras_qat.quantizers import (
    AllValuesQuantizer,
    FixedQuantizer,
    LastValueQuantizer,
    MovingAverageQuantizer,
    Quantizer,
)
from keras_qat.schemes import Default8BitScheme, NBitScheme

__version__ = "0.1.0"

__all__ = [
    "ops",
    "quantizers",
    "schemes",
    "fake_quant",
    "quantize_annotate_layer",
    "quantize_annotate_model",
    "quantize_apply",
    "quantize_model",
    "quantize_scope",
    "QuantizeConfig",
    "LayerQuantizeConfig",
    "NoOpQuantizeConfig",
    "QuantizeAnnotate",
    "QuantizeAwareActivation",
    "QuantizeLayer",
    "QuantizeWrapper",
    "QuantizeSameScale",
    "QuantizeFoldedBatchNorm",
    "Quantizer",
    "LastValueQuantizer",
    "MovingAverageQuantizer",
    "AllValuesQuantizer",
    "FixedQuantizer",
    "Default8BitScheme",
    "NBitScheme",
]
