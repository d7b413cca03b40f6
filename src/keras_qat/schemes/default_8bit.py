"""The TFLite int8 scheme."""

from __future__ import annotations

from typing import Any, Mapping

from keras_qat.schemes.base import RegistryScheme


class Default8BitScheme(RegistryScheme):
    """TFLite's int8 quantization: weights symmetric narrow-range 8-bit, per-channel for
    convolutions and per-tensor for Dense; activations asymmetric 8-bit moving averages;
    sigmoid/softmax/tanh outputs on TFLite's fixed ranges."""

    def __init__(self, overrides: Mapping[Any, Any] | None = None):
        super().__init__(8, 8, per_axis_conv=True, per_axis_dense=False, overrides=overrides)
