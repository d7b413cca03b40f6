"""Any bit widths, with per-layer overrides."""

from __future__ import annotations

from typing import Any, Mapping

from keras_qat.schemes.base import RegistryScheme, check_bool


class NBitScheme(RegistryScheme):
    """Weights at ``weight_bits`` and activations at ``activation_bits`` (2..16 each).

    Args:
        weight_bits, activation_bits: ints from 2 to 16.
        per_axis: True or False: per-channel weight ranges for every kernel, Dense included.
        overrides: per layer name or class, e.g. ``{"conv_first": {"weight_bits": 8,
            "activation_bits": 8}, keras.layers.Dense: {"weight_bits": 8}}``; a QuantizeConfig
            to use instead, or None to keep the layer in float.
        fold_batch_norm, fuse_activations, freeze_bn_after_steps: the graph transforms, as
            in :class:`~keras_qat.schemes.base.RegistryScheme`.
        method: ``"auto"`` (the default), ``"minmax"``, ``"lsq"`` or ``"pact"``: how ranges
            are set (see :class:`~keras_qat.schemes.base.RegistryScheme`). ``"auto"`` uses LSQ,
            the best measured at every width from W8A8 to W2A2 (bench/accuracy.py; the
            README's accuracy table), for every layer (overrides change a layer's widths, not
            its method).
            LSQ's range variables are trainable: an optimizer's weight decay reaches them.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_axis: bool = True,
        overrides: Mapping[Any, Any] | None = None,
        fold_batch_norm: bool = True,
        fuse_activations: bool = True,
        freeze_bn_after_steps: int | None = None,
        method: str = "auto",
    ):
        check_bool(per_axis, f"{type(self).__name__}: per_axis")
        super().__init__(
            weight_bits,
            activation_bits,
            per_axis_conv=per_axis,
            per_axis_dense=per_axis,
            overrides=overrides,
            fold_batch_norm=fold_batch_norm,
            fuse_activations=fuse_activations,
            freeze_bn_after_steps=freeze_bn_after_steps,
            method=method,
        )
