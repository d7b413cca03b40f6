"""Any bit widths, with per-layer overrides."""

from __future__ import annotations

from typing import Any, Mapping

from keras_qat.schemes.base import RegistryScheme


class NBitScheme(RegistryScheme):
    """Weights at ``weight_bits`` and activations at ``activation_bits`` (2..16 each).

    Args:
        per_axis: per-channel weight ranges for every kernel, Dense included.
        overrides: per layer name or class, e.g. ``{"conv_first": {"weight_bits": 8,
            "activation_bits": 8}, keras.layers.Dense: {"weight_bits": 8}}``; a QuantizeConfig
            to use instead, or None to keep the layer in float.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_axis: bool = True,
        overrides: Mapping[Any, Any] | None = None,
    ):
        super().__init__(
            weight_bits, activation_bits, per_axis_conv=per_axis, per_axis_dense=per_axis, overrides=overrides
        )
