"""QuantizeConfig: which tensors of a layer are quantized, and by which quantizer.

:class:`QuantizeConfig` is tfmot's interface, unchanged, so that tfmot configs move with their
imports. :class:`LayerQuantizeConfig` is the ready-made config the schemes build: weights and
activations named by attribute, and one quantizer per output.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras

from keras_qat.quantizers import Quantizer


class QuantizeConfig:
    """How to quantize one layer (tfmot's ``QuantizeConfig``).

    Subclasses return ``(weight_variable, quantizer)`` and ``(activation, quantizer)`` pairs,
    set the quantized values back (``layer.kernel = quantize_weights[0]`` works even where
    Keras 3 makes ``kernel`` read-only: the wrapper records the assignment and substitutes the
    value while the layer runs), and return one output quantizer per output of the layer (or
    none).
    """

    def get_weights_and_quantizers(self, layer) -> list[tuple[Any, Quantizer]]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_weights_and_quantizers().")

    def get_activations_and_quantizers(self, layer) -> list[tuple[Any, Quantizer]]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_activations_and_quantizers().")

    def set_quantize_weights(self, layer, quantize_weights: list) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement set_quantize_weights().")

    def set_quantize_activations(self, layer, quantize_activations: list) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement set_quantize_activations().")

    def get_output_quantizers(self, layer) -> list[Quantizer]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_output_quantizers().")

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config().")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizeConfig":
        return cls(**config)


def _serialize(quantizer):
    return None if quantizer is None else keras.saving.serialize_keras_object(quantizer)


def _deserialize(config):
    return None if config is None else keras.saving.deserialize_keras_object(config)


@keras.saving.register_keras_serializable(package="keras_qat")
class LayerQuantizeConfig(QuantizeConfig):
    """Quantize named weight attributes, named activation attributes and/or the outputs.

    Args:
        weight_attrs: attributes of the layer that hold weight variables (``"kernel"``).
        weight_quantizer: the quantizer for them (one instance per weight is derived from it).
        activation_attrs: attributes that hold activation functions (``"activation"``); the
            activation's output is quantized, as the deployed fused kernel produces it.
        activation_quantizer: the quantizer for them.
        output_quantizer: if given, every output of the layer is quantized with a copy of it.
    """

    def __init__(
        self,
        weight_attrs: Sequence[str] = (),
        weight_quantizer: Quantizer | None = None,
        activation_attrs: Sequence[str] = (),
        activation_quantizer: Quantizer | None = None,
        output_quantizer: Quantizer | None = None,
    ):
        if isinstance(weight_quantizer, dict):
            weight_quantizer = _deserialize(weight_quantizer)
        if isinstance(activation_quantizer, dict):
            activation_quantizer = _deserialize(activation_quantizer)
        if isinstance(output_quantizer, dict):
            output_quantizer = _deserialize(output_quantizer)
        if weight_attrs and weight_quantizer is None:
            raise ValueError("LayerQuantizeConfig: weight_attrs need a weight_quantizer.")
        if activation_attrs and activation_quantizer is None:
            raise ValueError("LayerQuantizeConfig: activation_attrs need an activation_quantizer.")
        for name, quantizer in (
            ("weight_quantizer", weight_quantizer),
            ("activation_quantizer", activation_quantizer),
            ("output_quantizer", output_quantizer),
        ):
            if quantizer is not None and not isinstance(quantizer, Quantizer):
                raise ValueError(
                    f"LayerQuantizeConfig: {name} must be a keras_qat Quantizer, got {quantizer!r}."
                )
        self.weight_attrs = tuple(weight_attrs)
        self.weight_quantizer = weight_quantizer
        self.activation_attrs = tuple(activation_attrs)
        self.activation_quantizer = activation_quantizer
        self.output_quantizer = output_quantizer

    @staticmethod
    def _copy(quantizer: Quantizer) -> Quantizer:
        return type(quantizer).from_config(quantizer.get_config())

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, attr), self._copy(self.weight_quantizer)) for attr in self.weight_attrs]

    def get_activations_and_quantizers(self, layer):
        return [(getattr(layer, attr), self._copy(self.activation_quantizer)) for attr in self.activation_attrs]

    def set_quantize_weights(self, layer, quantize_weights):
        for attr, value in zip(self.weight_attrs, quantize_weights):
            setattr(layer, attr, value)

    def set_quantize_activations(self, layer, quantize_activations):
        for attr, value in zip(self.activation_attrs, quantize_activations):
            setattr(layer, attr, value)

    def get_output_quantizers(self, layer, num_outputs: int = 1):
        if self.output_quantizer is None:
            return []
        return [self._copy(self.output_quantizer) for _ in range(num_outputs)]

    def get_config(self):
        return {
            "weight_attrs": list(self.weight_attrs),
            "weight_quantizer": _serialize(self.weight_quantizer),
            "activation_attrs": list(self.activation_attrs),
            "activation_quantizer": _serialize(self.activation_quantizer),
            "output_quantizer": _serialize(self.output_quantizer),
        }

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        parts = []
        if self.weight_attrs:
            parts.append(f"weights={list(self.weight_attrs)} by {self.weight_quantizer!r}")
        if self.activation_attrs:
            parts.append(f"activations={list(self.activation_attrs)} by {self.activation_quantizer!r}")
        if self.output_quantizer is not None:
            parts.append(f"outputs by {self.output_quantizer!r}")
        return f"LayerQuantizeConfig({'; '.join(parts) or 'nothing quantized'})"


@keras.saving.register_keras_serializable(package="keras_qat")
class NoOpQuantizeConfig(LayerQuantizeConfig):
    """Quantizes nothing: for layers that only move values (pooling by max, padding,
    reshapes), whose outputs stay on their input's quantization grid."""

    def __init__(self, **kwargs):
        super().__init__()

    def get_config(self):
        return {}

    def __repr__(self):
        return "NoOpQuantizeConfig()"


__all__ = ["QuantizeConfig", "LayerQuantizeConfig", "NoOpQuantizeConfig"]
