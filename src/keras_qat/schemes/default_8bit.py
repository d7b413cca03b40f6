"""The TFLite int8 scheme."""

from __future__ import annotations

from typing import Any, Mapping

from keras_qat.schemes.base import RegistryScheme


class Default8BitScheme(RegistryScheme):
    """TFLite's int8 quantization: weights symmetric narrow-range 8-bit, per-channel for
    convolutions and per-tensor for Dense; activations asymmetric 8-bit moving averages;
    sigmoid/softmax/tanh outputs on TFLite's fixed ranges; BatchNormalization folded and
    ReLU/ReLU6 fused as the converter fuses them (see :class:`RegistryScheme` for the
    arguments)."""

    def __init__(
        self,
        overrides: Mapping[Any, Any] | None = None,
        fold_batch_norm: bool = True,
        fuse_activations: bool = True,
        freeze_bn_after_steps: int | None = None,
    ):
        super().__init__(
            8,
            8,
            per_axis_conv=True,
            per_axis_dense=False,
            overrides=overrides,
            fold_batch_norm=fold_batch_norm,
            fuse_activations=fuse_activations,
            freeze_bn_after_steps=freeze_bn_after_steps,
        )
