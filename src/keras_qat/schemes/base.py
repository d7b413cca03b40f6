"""The scheme base class: a config per layer, by the layer's kind (:mod:`keras_qat.registry`)."""

from __future__ import annotations

from typing import Any, Mapping

from keras_qat import ops as qops
from keras_qat.config import LayerQuantizeConfig, NoOpQuantizeConfig, QuantizeConfig
from keras_qat.quantizers import FixedQuantizer, LastValueQuantizer, MovingAverageQuantizer, Quantizer
from keras_qat.registry import (
    SIGNED_UNIT_RANGE_ACTIVATIONS,
    UNIT_RANGE_ACTIVATIONS,
    activation_name,
    kind_of,
    supported_type_names,
)

OverrideValue = Any  # a dict of scheme settings, a QuantizeConfig, or None (keep the layer float)
_OVERRIDE_KEYS = {"weight_bits", "activation_bits", "per_axis"}


class Scheme:
    """What a scheme provides to ``quantize_apply``: a config per layer, and which graph
    transforms (:mod:`keras_qat.transforms`) to apply."""

    fold_batch_norm: bool = False
    fuse_activations: bool = False
    freeze_bn_after_steps: int | None = None

    def config_for(self, layer) -> QuantizeConfig | None:
        """The config for ``layer``, or None if the scheme does not support it."""
        raise NotImplementedError

    def keeps_float(self, layer) -> bool:
        """Whether the scheme was told to leave ``layer`` in float (an override of None)."""
        return False


class RegistryScheme(Scheme):
    """A scheme driven by the registries above and per-layer overrides.

    Args:
        weight_bits, activation_bits: 2..16.
        per_axis_conv, per_axis_dense: per-channel weight ranges for convolutions / Dense.
        overrides: layer name or layer class -> a dict with any of ``weight_bits``,
            ``activation_bits``, ``per_axis``; or a QuantizeConfig; or None to keep that layer
            float. Names are matched before classes; a class matches its subclasses.
        fold_batch_norm: fold a BatchNormalization into the Conv/Dense before it, weights
            quantized after folding (:mod:`keras_qat.folding`).
        fuse_activations: quantize a Conv/Dense/Add output once, after the ReLU or ReLU6
            that follows it, and let a Concatenate quantize its inputs with one range.
        freeze_bn_after_steps: stop using batch statistics in folded layers after this
            many training steps; None never freezes.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_axis_conv: bool = True,
        per_axis_dense: bool = False,
        overrides: Mapping[Any, OverrideValue] | None = None,
        fold_batch_norm: bool = True,
        fuse_activations: bool = True,
        freeze_bn_after_steps: int | None = None,
    ):
        owner = type(self).__name__
        for arg, value in (("fold_batch_norm", fold_batch_norm), ("fuse_activations", fuse_activations)):
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: {arg} must be True or False, got {value!r}.")
        if freeze_bn_after_steps is not None and (
            isinstance(freeze_bn_after_steps, bool) or not isinstance(freeze_bn_after_steps, int) or freeze_bn_after_steps < 0
        ):
            raise ValueError(
                f"{owner}: freeze_bn_after_steps must be None or a non-negative int, got {freeze_bn_after_steps!r}."
            )
        self.fold_batch_norm = fold_batch_norm
        self.fuse_activations = fuse_activations
        self.freeze_bn_after_steps = freeze_bn_after_steps
        self.weight_bits = qops.validate_num_bits(weight_bits, f"{owner}: weight_bits")
        self.activation_bits = qops.validate_num_bits(activation_bits, f"{owner}: activation_bits")
        self.per_axis_conv = bool(per_axis_conv)
        self.per_axis_dense = bool(per_axis_dense)
        self.overrides = dict(overrides or {})
        for key, value in self.overrides.items():
            if not isinstance(key, (str, type)):
                raise ValueError(f"{owner}: override keys are layer names or layer classes, got {key!r}.")
            if isinstance(value, dict):
                unknown = set(value) - _OVERRIDE_KEYS
                if unknown:
                    raise ValueError(
                        f"{owner}: override for {key!r} has unknown settings {sorted(unknown)}; "
                        f"allowed: {sorted(_OVERRIDE_KEYS)}."
                    )
                for bits_key in ("weight_bits", "activation_bits"):
                    if bits_key in value:
                        qops.validate_num_bits(value[bits_key], f"{owner}: override {key!r} {bits_key}")
            elif value is not None and not isinstance(value, QuantizeConfig):
                raise ValueError(
                    f"{owner}: override for {key!r} must be a dict of settings, a QuantizeConfig "
                    f"or None, got {value!r}."
                )

    # ---- overrides --------------------------------------------------------------------

    def _override(self, layer):
        if layer.name in self.overrides:
            return True, self.overrides[layer.name]
        for key, value in self.overrides.items():
            if isinstance(key, type) and isinstance(layer, key):
                return True, value
        return False, None

    def keeps_float(self, layer) -> bool:
        found, value = self._override(layer)
        return found and value is None

    # ---- quantizers -------------------------------------------------------------------

    def weight_quantizer(self, layer, bits: int, per_axis: bool) -> Quantizer:
        kind = kind_of(layer)
        axis = kind.kernel_axis if kind is not None else -1
        return LastValueQuantizer(num_bits=bits, per_axis=per_axis, symmetric=True, narrow_range=True, axis=axis)

    def activation_quantizer(self, activation, bits: int) -> Quantizer:
        name = activation_name(activation)
        if name in UNIT_RANGE_ACTIVATIONS:
            return FixedQuantizer(num_bits=bits, init_min=0.0, init_max=(2**bits - 1) / 2**bits)
        if name in SIGNED_UNIT_RANGE_ACTIVATIONS:
            half = 2 ** (bits - 1)
            return FixedQuantizer(num_bits=bits, init_min=-1.0, init_max=(half - 1) / half)
        return MovingAverageQuantizer(num_bits=bits, per_axis=False, symmetric=False, narrow_range=False)

    # ---- the registry -----------------------------------------------------------------

    def config_for(self, layer) -> QuantizeConfig | None:
        found, override = self._override(layer)
        if found and isinstance(override, QuantizeConfig):
            return override
        settings = override if found and isinstance(override, dict) else {}
        weight_bits = settings.get("weight_bits", self.weight_bits)
        activation_bits = settings.get("activation_bits", self.activation_bits)
        kind = kind_of(layer)
        if kind is None:
            return None
        if kind.role == "kernel":
            default_per_axis = self.per_axis_dense if kind.name == "dense" else self.per_axis_conv
            per_axis = settings.get("per_axis", default_per_axis)
            return LayerQuantizeConfig(
                weight_attrs=kind.weight_attrs,
                weight_quantizer=self.weight_quantizer(layer, weight_bits, per_axis),
                activation_attrs=("activation",),
                activation_quantizer=self.activation_quantizer(layer.activation, activation_bits),
            )
        if kind.role == "moves":
            return NoOpQuantizeConfig()
        activation = getattr(layer, "activation", None)
        if kind.name == "softmax":
            activation = "softmax"
        quantizer = (
            self.activation_quantizer(activation, activation_bits)
            if activation is not None
            else MovingAverageQuantizer(num_bits=activation_bits)
        )
        return LayerQuantizeConfig(output_quantizer=quantizer)

    def supported_layer_types(self) -> list[str]:
        return supported_type_names()
