"""Which layers each deployment target takes exactly, decided before anything is converted.

A target either computes what the QAT model computes (every cell "exact" in the conformance
table, ``bench/conformance.py``) or refuses the model up front with one
:class:`~keras_qat.errors.NotDeployableError` that names every layer it cannot take and why.
:func:`refusals` is that verdict; the exporters raise it before they write anything,
``quantize_model(..., target=...)`` raises it before training, and
``diagnose(model, target=...)`` shows it.

* ``"kqat"``: the integer artifact; its verdict is the artifact writer's own walk over the
  graph (:func:`keras_qat.export.artifact.refusals`), so it cannot disagree with the export.
* ``"onnx"``: the ONNX QDQ graph, written from the same integer form as the artifact
  (:func:`keras_qat.export.onnx.to_onnx`): it refuses what the artifact refuses, widths its
  opset has no integer type for, and 16-bit kernels whose sums float32 cannot hold exactly.
* ``"tflite"``: LiteRT int8 through the TFLite converter. The converter cannot be asked what it
  will do, so the rules below say which layer kinds and settings deploy exactly (measured by
  the conformance table against LiteRT's reference kernels); each rule names the layer and
  what to do instead.
"""

from __future__ import annotations

from typing import Callable, Iterator

import keras

from keras_qat.errors import NotDeployableError
from keras_qat.export.validate import non_finite_variables
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeLayer, QuantizeSameScale, QuantizeWrapper
from keras_qat.registry import activation_name, kind_of

#: The deployment targets, by the names the exporters and ``diagnose`` use.
TARGETS = ("tflite", "kqat", "onnx")

#: The widest integers an int8 TFLite model holds, for weights and activations alike.
TFLITE_MAX_BITS = 8


def iter_layers(model) -> Iterator:
    """Every layer of ``model``, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def layer_quantizers(layer) -> list[tuple[str, object]]:
    """``(what it quantizes, quantizer)`` for every quantizer of a keras-qat layer."""
    found: list[tuple[str, object]] = []
    if isinstance(layer, QuantizeWrapper):
        found += [(f"weight '{weight.name}'", quantizer) for weight, quantizer, _ in layer.quantized_weights()]
        found += [("activation", activation.quantizer) for activation in layer.activation_quantizers()]
        found += [("output", quantizer) for quantizer, _ in layer.output_quantizers()]
    elif isinstance(layer, QuantizeFoldedBatchNorm):
        found.append(("weight 'kernel' (BatchNorm folded)", layer.weight_quantizer))
        if layer.output_quantizer is not None:
            found.append(("output", layer.output_quantizer))
    elif isinstance(layer, (QuantizeLayer, QuantizeSameScale)):
        found.append(("input", layer.quantizer))
    return found


def _inner(layer):
    return getattr(layer, "layer", None) if isinstance(layer, (QuantizeWrapper, QuantizeFoldedBatchNorm, QuantizeSameScale)) else None


# ---- the TFLite rules: each takes a quantized layer and returns why it cannot deploy, or None ----


def _too_wide(layer) -> str | None:
    wide = [f"{what} at {q.num_bits} bits" for what, q in layer_quantizers(layer) if q.num_bits > TFLITE_MAX_BITS]
    if not wide:
        return None
    return (
        f"layer '{layer.name}' quantizes {', '.join(wide)}, but TFLite int8 models hold at most "
        f"{TFLITE_MAX_BITS}-bit weights and activations; export wider bit widths with save_artifact "
        "(.kqat) or to_onnx, or quantize that layer at 8 bits (e.g. NBitScheme overrides)."
    )


def _low_bit_activation(layer) -> str | None:
    for what, quantizer in layer_quantizers(layer):
        if quantizer.num_bits >= 8:
            continue
        if what.startswith("weight"):
            if not quantizer.narrow_range:
                return (
                    f"layer '{layer.name}' quantizes its {what} at {quantizer.num_bits} bits without narrow_range; "
                    "below 8 bits TFLite takes weights on a narrow range (as the schemes quantize them): use "
                    "narrow_range=True for that quantizer, or 8 bits."
                )
            continue
        if quantizer.per_axis or quantizer.narrow_range:
            return (
                f"layer '{layer.name}' quantizes its {what} at {quantizer.num_bits} bits "
                f"{'per axis' if quantizer.per_axis else 'with narrow_range'}; below 8 bits TFLite takes "
                "activations per tensor on the full range. Use such a quantizer for it, or 8 bits."
            )
    return None


#: Layer kinds with no exact int8 kernel in LiteRT's reference kernels, and why.
_NO_EXACT_KERNEL = {
    "conv3d": "TFLite's CONV_3D has no int8 kernel (the converter leaves it in float)",
    "conv_transpose": (
        "TFLite's TRANSPOSE_CONV of a QAT model does not match it exactly (per-channel kernels do not "
        "convert at all, and 3-D ones have no int8 kernel)"
    ),
    "prelu": "TFLite's int8 PRELU quantizes alpha on a grid of its own, which the QAT model does not simulate",
    "upsampling_2d": "TFLite's int8 RESIZE_BILINEAR rounds on its input's grid, which the QAT model does not simulate",
    "average_pool3d": "TFLite has no 3-D average pooling",
    "global_average_pool3d": "TFLite's int8 MEAN over three spatial axes is not simulated by the QAT model",
    "max_pool3d": "TFLite has no 3-D max pooling",
    "zero_padding3d": "3-D padding is not checked against TFLite yet",
    "subtract": "TFLite's int8 SUB rescales both inputs as ADD does; the QAT model does not simulate it yet",
    "elementwise_merge": (
        "TFLite's int8 MAXIMUM/MINIMUM need one scale for both inputs, and AVERAGE is an ADD and a MUL; the "
        "QAT model does not simulate them yet"
    ),
    "permute": "RepeatVector and Permute convert to TILE (version 3) or TRANSPOSE ops not checked against LiteRT",
    "upsampling": "UpSampling1D/3D convert to an int8 TILE (version 3), which LiteRT's reference kernels cannot load",
    "batch_norm": (
        "a BatchNormalization that is not folded into the Conv/Dense before it deploys as float MUL and "
        "ADD ops; place it right after a Conv1D/Conv2D/DepthwiseConv/Dense with a linear activation"
    ),
}


#: Activation layers whose LiteRT int8 kernel the QAT model computes exactly.
_EXACT_ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "hard_sigmoid", "hard_swish", "hard_silu")


def _output_bits(layer) -> int:
    return min((q.num_bits for what, q in layer_quantizers(layer) if not what.startswith("weight")), default=8)


def _no_exact_kernel(layer) -> str | None:
    inner = _inner(layer)
    kind = None if inner is None else kind_of(inner)
    if kind is None:
        return None
    if kind.name == "upsampling" and type(inner) is keras.layers.UpSampling2D:
        return None  # nearest: traced as a resize (keras_qat.export.tflite.trace)
    if kind.name in _NO_EXACT_KERNEL:
        return (
            f"layer '{layer.name}' ({type(inner).__name__}): {_NO_EXACT_KERNEL[kind.name]}. Keep it in float "
            f"(overrides={{'{inner.name}': None}}), or export to .kqat where it is supported."
        )
    if kind.name == "activation" and activation_name(inner.activation) not in _EXACT_ACTIVATIONS:
        return (
            f"layer '{layer.name}' (Activation '{activation_name(inner.activation)}'): LiteRT lowers it to int8 ops "
            f"that the QAT model does not simulate (exact: {', '.join(_EXACT_ACTIVATIONS)}); export to .kqat, where it "
            "is a lookup table."
        )
    if kind.name == "activation" and activation_name(inner.activation) == "hard_sigmoid" and _output_bits(layer) < 8:
        return (
            f"layer '{layer.name}' (Activation 'hard_sigmoid') below 8 bits is not simulated exactly for LiteRT; "
            "quantize its output at 8 bits, or export to .kqat."
        )
    if kind.name == "leaky_relu" and type(inner) is keras.layers.ELU:
        return (
            f"layer '{layer.name}' (ELU): LiteRT's reference kernels have no ELU; use LeakyReLU, or export to .kqat."
        )
    if kind.name == "leaky_relu" and float(inner.negative_slope) <= 0.0:
        return f"layer '{layer.name}' (LeakyReLU with negative_slope <= 0) is not simulated exactly; use ReLU."
    return None


def _static_inner_shape(layer) -> bool:
    """Whether every dimension of ``layer``'s input but the batch is known."""
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError):  # called more than once, or not in a graph
        return False
    return all(d is not None for d in shape[1:])


def _kernel_settings(layer) -> str | None:
    inner = _inner(layer)
    kind = None if inner is None else kind_of(inner)
    if kind is not None and type(inner) is keras.layers.UpSampling2D and not _static_inner_shape(layer):
        return (
            f"layer '{layer.name}' (UpSampling2D) needs a known input height and width to deploy as a "
            "nearest resize; give the model a fixed input size."
        )
    if kind is None or kind.role != "kernel":
        return None
    if kind.name == "dense" and _per_axis_weights(layer) and len(inner.kernel.shape) == 2 and not _static_inner_shape(layer):
        return (
            f"layer '{layer.name}' (per-channel Dense on an input with unknown inner dimensions) cannot be traced "
            "as the 1x1 convolution it deploys as; give the input a fixed shape, or quantize it per tensor."
        )
    if len(inner.kernel.shape) == 3 and max(inner.strides) > 1 and max(inner.dilation_rate) > 1:
        return f"layer '{layer.name}' ({type(inner).__name__}) with both strides and dilation above 1 has no TFLite kernel."
    if getattr(inner, "padding", "valid") not in ("valid", "same"):
        return f"layer '{layer.name}' ({type(inner).__name__}, padding='{inner.padding}') deploys exactly only with 'valid' or 'same' padding."
    if getattr(inner, "groups", 1) != 1:
        return f"layer '{layer.name}' ({type(inner).__name__}, groups={inner.groups}) has no grouped int8 kernel in TFLite."
    if getattr(inner, "data_format", "channels_last") != "channels_last":
        return f"layer '{layer.name}' ({type(inner).__name__}) must be channels_last to deploy to TFLite."
    return None


def _per_axis_weights(layer) -> bool:
    return any(what.startswith("weight") and q.per_axis for what, q in layer_quantizers(layer))


_TFLITE_RULES: tuple[Callable, ...] = (_too_wide, _low_bit_activation, _no_exact_kernel, _kernel_settings)


def tflite_refusals(model) -> dict[str, str]:
    """``{layer name: why}`` for every layer that LiteRT int8 cannot compute exactly."""
    reasons = non_finite_variables(model)
    for layer in iter_layers(model):
        if layer.name in reasons:
            continue
        for rule in _TFLITE_RULES:
            why = rule(layer)
            if why is not None:
                reasons[layer.name] = why
                break
    return reasons


def refusals(model, target: str) -> dict[str, str]:
    """``{layer name: why}`` for every layer ``target`` cannot take exactly (empty: it deploys)."""
    if target == "tflite":
        return tflite_refusals(model)
    if target == "kqat":
        from keras_qat.export.artifact import refusals as artifact_refusals

        return artifact_refusals(model)
    if target == "onnx":
        from keras_qat.export.onnx.convert import refusals as onnx_refusals

        return onnx_refusals(model)
    raise ValueError(f"unknown deployment target {target!r}; the targets are {', '.join(TARGETS)}.")


def require_deployable(model, target: str) -> None:
    """Raise :class:`~keras_qat.errors.NotDeployableError` listing every layer ``target`` refuses."""
    reasons = refusals(model, target)
    if reasons:
        raise NotDeployableError(target, reasons)


__all__ = ["TARGETS", "TFLITE_MAX_BITS", "refusals", "require_deployable", "tflite_refusals", "layer_quantizers", "iter_layers"]
