"""What a QAT model quantizes, layer by layer, and what a deployment would still run in float.

:func:`diagnose` reads the model's quantizers and their range variables; it changes nothing
and runs nothing. Its report answers the questions users otherwise settle by converting and
reading the converted graph: is every layer quantized, at which bits, on which ranges, and
which layers would a deployment have to run in float (or cannot run as int8 TFLite)?
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeLayer, QuantizeSameScale, QuantizeWrapper
from keras_qat.export.targets import TARGETS, TFLITE_MAX_BITS, refusals
from keras_qat.registry import kind_of



@dataclass
class TensorQuantization:
    """One quantized tensor of a layer: what it is, its bits, channels and range."""

    tensor: str
    bits: int
    channels: int | None  # None: one range for the whole tensor
    range_min: float  # the smallest of the per-channel minima
    range_max: float  # the largest of the per-channel maxima

    def __str__(self) -> str:
        layout = f"{self.channels} channels" if self.channels else "per tensor"
        return f"{self.tensor}: {self.bits} bits, {layout}, [{self.range_min:.4g}, {self.range_max:.4g}]"


@dataclass
class LayerDiagnosis:
    """The quantization of one layer and what a deployment still needs in float for it."""

    layer: str
    kind: str
    quantized: list[TensorQuantization] = field(default_factory=list)
    float_needs: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """Every layer of the model, in graph order (nested models flattened)."""

    layers: list[LayerDiagnosis]
    target: str | None = None
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def deployable(self) -> bool:
        """With a target: whether it computes exactly what the QAT model computes (the export
        then succeeds); without one, whether no layer needs float or more than int8."""
        return not self.refused if self.target is not None else not self.float_layers

    @property
    def float_layers(self) -> list[LayerDiagnosis]:
        """Layers that a deployment would run (partly) in float or not as int8 TFLite."""
        return [layer for layer in self.layers if layer.float_needs]

    def __str__(self) -> str:
        lines = []
        for entry in self.layers:
            details = "; ".join(str(t) for t in entry.quantized) or "no quantizer"
            lines.append(f"{entry.layer} ({entry.kind}): {details}")
            lines.extend(f"    needs: {need}" for need in entry.float_needs)
        summary = f"{len(self.float_layers)} of {len(self.layers)} layers need float or more than int8"
        lines.append(summary)
        if self.target is not None:
            verdict = "deploys exactly" if not self.refused else f"refuses {len(self.refused)} layer(s)"
            lines.append(f"target {self.target}: {verdict}")
            lines.extend(f"  - {why}" for why in self.refused.values())
        return "\n".join(lines)


def _tensor(name: str, quantizer, variables) -> TensorQuantization:
    lo, hi = (np.asarray(keras.ops.convert_to_numpy(end), np.float64) for end in quantizer.range_of(variables))
    return TensorQuantization(name, quantizer.num_bits, lo.size if lo.ndim else None, float(lo.min()), float(hi.max()))


def _quantized_tensors(layer) -> list[TensorQuantization]:
    if isinstance(layer, QuantizeWrapper):
        tensors = [_tensor(f"weight '{w.name}'", q, v) for w, q, v in layer.quantized_weights()]
        tensors += [_tensor("activation", a.quantizer, a.quantizer_vars) for a in layer.activation_quantizers()]
        return tensors + [_tensor("output", q, v) for q, v in layer.output_quantizers()]
    if isinstance(layer, QuantizeFoldedBatchNorm):
        tensors = [_tensor("weight 'kernel' (BatchNorm folded)", layer.weight_quantizer, layer.kernel_vars)]
        return tensors + [_tensor("output", q, v) for q, v in layer.output_quantizers()]
    if isinstance(layer, QuantizeSameScale):
        return [_tensor("input and output", layer.quantizer, layer.quantizer_vars)]
    if isinstance(layer, QuantizeLayer):
        return [_tensor("input", layer.quantizer, layer.quantizer_vars)]
    return []


def _kind(layer) -> str:
    inner = getattr(layer, "layer", None)
    if isinstance(layer, QuantizeFoldedBatchNorm):
        return f"{type(inner).__name__} + BatchNormalization, folded"
    return type(inner).__name__ if isinstance(inner, keras.layers.Layer) else type(layer).__name__


def _diagnose_layer(layer, quantized_operations: set[int]) -> LayerDiagnosis:
    entry = LayerDiagnosis(layer.name, _kind(layer), _quantized_tensors(layer))
    quantized_layer = isinstance(layer, (QuantizeWrapper, QuantizeFoldedBatchNorm, QuantizeSameScale, QuantizeLayer))
    if not quantized_layer and getattr(kind_of(layer), "role", None) != "moves" and id(layer) not in quantized_operations:
        what = "operation" if not isinstance(layer, keras.layers.Layer) else "layer"
        entry.float_needs.append(f"float {what}: not quantized (kept float, or not supported by the scheme)")
    for tensor in entry.quantized:
        if tensor.bits > TFLITE_MAX_BITS:
            entry.float_needs.append(
                f"{tensor.tensor} at {tensor.bits} bits: no int8 TFLite kernel; deploy through the integer artifact"
            )
    return entry


def _operations(model):
    for operation in model.operations:
        if isinstance(operation, keras.layers.InputLayer):
            continue
        if isinstance(operation, keras.Model):
            yield from _operations(operation)
        else:
            yield operation


def _output_quantized_operations(model) -> set[int]:
    """Plain operations (``x + 3.0``) whose output a QuantizeLayer quantizes: integer ops."""
    found = set()
    for depth in model._nodes_by_depth.values():
        for node in depth:
            if isinstance(node.operation, keras.Model):
                found |= _output_quantized_operations(node.operation)
            elif isinstance(node.operation, QuantizeLayer) and node.input_tensors:
                history = getattr(node.input_tensors[0], "_keras_history", None)
                if history is not None and not isinstance(history.operation, keras.layers.Layer):
                    found.add(id(history.operation))
    return found


def diagnose(model: keras.Model, target: str | None = None) -> Diagnosis:
    """Per layer (and plain operation) of a QAT model: its quantized tensors with bits and
    ranges, and what a deployment would still need in float.

    Args:
        target: ``"tflite"``, ``"kqat"`` or ``"onnx"``: also give that exporter's verdict
            (:attr:`Diagnosis.refused`, the same as the export's: every layer it would refuse,
            and why), without converting or writing anything.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"diagnose: expected a keras.Model, got {type(model).__name__}.")
    if target is not None and target not in TARGETS:
        raise ValueError(f"diagnose: target must be one of {', '.join(TARGETS)}, got {target!r}.")
    quantized_operations = _output_quantized_operations(model)
    layers = [_diagnose_layer(operation, quantized_operations) for operation in _operations(model)]
    refused = refusals(model, target) if target is not None else {}
    return Diagnosis(layers, target, refused)


__all__ = ["diagnose", "Diagnosis", "LayerDiagnosis", "TensorQuantization"]
