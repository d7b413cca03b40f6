"""tfmot's module paths over keras-qat, so that a tfmot script moves by changing its import.

    import tensorflow_model_optimization as tfmot      # before
    from keras_qat.compat import tfmot                  # after

    tfmot.quantization.keras.quantize_model(model)
    tfmot.quantization.keras.quantizers.LastValueQuantizer(num_bits=8, per_axis=True, ...)

A QuantizeConfig written for Keras 2 keeps its attribute names: the layer it is given answers
to the Keras 2 names of weights that Keras 3 renamed (``layer.depthwise_kernel`` of a
DepthwiseConv2D, ``kernel`` in Keras 3), for reading and for setting
(:data:`keras_qat.layers.KERAS2_NAMES`).
"""

from __future__ import annotations

from types import SimpleNamespace

from keras_qat import api, config, layers, quantizers, schemes
from keras_qat.schemes.base import check_bool

_quantizers = SimpleNamespace(
    Quantizer=quantizers.Quantizer,
    LastValueQuantizer=quantizers.LastValueQuantizer,
    MovingAverageQuantizer=quantizers.MovingAverageQuantizer,
    AllValuesQuantizer=quantizers.AllValuesQuantizer,
    FixedQuantizer=quantizers.FixedQuantizer,
)


def _default_n_bit_scheme(disable_per_axis: bool = False, num_bits_weight: int = 8, num_bits_activation: int = 8):
    """tfmot's ``DefaultNBitQuantizeScheme`` signature, building an :class:`NBitScheme`."""
    check_bool(disable_per_axis, "DefaultNBitQuantizeScheme: disable_per_axis")
    # tfmot's n-bit scheme observes min/max ranges at every width: so does its stand-in.
    return schemes.NBitScheme(num_bits_weight, num_bits_activation, per_axis=not disable_per_axis, method="minmax")


_default_8bit = SimpleNamespace(
    Default8BitQuantizeScheme=schemes.Default8BitScheme,
    Default8BitScheme=schemes.Default8BitScheme,
)

_quantization_keras = SimpleNamespace(
    quantize_model=api.quantize_model,
    quantize_annotate_layer=api.quantize_annotate_layer,
    quantize_annotate_model=api.quantize_annotate_model,
    quantize_apply=api.quantize_apply,
    quantize_scope=api.quantize_scope,
    QuantizeConfig=config.QuantizeConfig,
    QuantizeWrapper=layers.QuantizeWrapper,
    QuantizeWrapperV2=layers.QuantizeWrapper,
    QuantizeLayer=layers.QuantizeLayer,
    QuantizeAnnotate=layers.QuantizeAnnotate,
    quantizers=_quantizers,
    default_8bit=_default_8bit,
    experimental=SimpleNamespace(default_n_bit=SimpleNamespace(DefaultNBitQuantizeScheme=_default_n_bit_scheme)),
)

#: Stands in for the ``tensorflow_model_optimization`` module.
tfmot = SimpleNamespace(quantization=SimpleNamespace(keras=_quantization_keras))

__all__ = ["tfmot"]
