"""Quantization schemes: which QuantizeConfig each layer type gets.

A scheme is a registry from layer types to configs (and, later, graph transforms).
:class:`Default8BitScheme` is the TFLite int8 scheme; :class:`NBitScheme` takes any weight
and activation bit widths and per-layer overrides, so one model can mix precisions.
"""

from keras_qat.schemes.base import RegistryScheme, Scheme
from keras_qat.schemes.default_8bit import Default8BitScheme
from keras_qat.schemes.n_bit import NBitScheme

__all__ = ["Scheme", "RegistryScheme", "Default8BitScheme", "NBitScheme"]
