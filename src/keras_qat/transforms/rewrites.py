"""How quantize_apply builds the layers of each planned rewrite (see :mod:`.plan`).

* :func:`folded_layer`: a Conv/Dense with the BatchNormalization after it folded in;
* splits, each called in place of one annotated layer: a SeparableConv into depthwise and
  1x1 convolutions, a Conv/Dense from an activation TFLite cannot fuse, a Rescaling into
  its scale and its offset; each half quantized as the scheme says, with a quantized tensor
  between them, as the deployed integer model has it.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_qat.config import LayerQuantizeConfig, QuantizeConfig
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeAnnotate, QuantizeWrapper
from keras_qat.registry import CLAMP_ACTIVATIONS, activation_name, kind_of


def splits(layer, scheme) -> bool:
    """Whether ``layer`` (an annotation) is replaced by two quantized layers when called."""
    return splits_separable(layer, scheme) or splits_activation(layer, scheme) or splits_rescaling(layer, scheme)


def call_split(annotation, plan, scheme, *args, **kwargs):
    """Call the two layers that replace ``annotation`` on its inputs; return the output."""
    if splits_separable(annotation, scheme):
        return call_separable_split(annotation, plan, scheme, args[0])
    if splits_activation(annotation, scheme):
        return call_activation_split(annotation, plan, scheme, *args, **kwargs)
    return call_rescaling_split(annotation, plan, scheme, args[0])


_SEPARABLE = {
    keras.layers.SeparableConv1D: (keras.layers.DepthwiseConv1D, keras.layers.Conv1D),
    keras.layers.SeparableConv2D: (keras.layers.DepthwiseConv2D, keras.layers.Conv2D),
}


def splits_separable(layer, scheme) -> bool:
    """A SeparableConv the scheme quantizes: deployed as a depthwise and a 1x1 convolution,
    with the tensor between them quantized."""
    return (
        isinstance(layer, QuantizeAnnotate)
        and layer.quantize_config is None
        and type(layer.layer) in _SEPARABLE
        and not scheme.keeps_float(layer.layer)
        and isinstance(scheme.config_for(layer.layer), LayerQuantizeConfig)
    )


def call_separable_split(annotation, plan, scheme, inputs):
    """Call the depthwise and pointwise halves of a SeparableConv, each quantized, on ``inputs``."""
    separable = annotation.layer
    depthwise_type, pointwise_type = _SEPARABLE[type(separable)]
    depthwise = depthwise_type(
        kernel_size=separable.kernel_size,
        strides=separable.strides,
        padding=separable.padding,
        depth_multiplier=separable.depth_multiplier,
        data_format=separable.data_format,
        dilation_rate=separable.dilation_rate,
        use_bias=False,
        name=f"{separable.name}_depthwise",
    )
    pointwise = pointwise_type(
        filters=separable.filters,
        kernel_size=1,
        data_format=separable.data_format,
        activation=separable.activation,
        use_bias=separable.use_bias,
        name=f"{separable.name}_pointwise",
    )
    pointwise_config = scheme.governed_config(pointwise, separable)
    depthwise_config = scheme.governed_config(depthwise, separable)
    depthwise_wrapper = QuantizeWrapper(depthwise, depthwise_config, name=f"quant_{depthwise.name}")
    bn_annotation = plan.folds.get(id(annotation))
    if bn_annotation is not None:  # the BatchNormalization after it folds into the pointwise half
        batch_norm = type(bn_annotation.layer).from_config(bn_annotation.layer.get_config())
        output_quantizer = pointwise_config.activation_quantizer if plan.output_quantized(bn_annotation) else None
        pointwise_layer = QuantizeFoldedBatchNorm(
            pointwise,
            batch_norm,
            weight_quantizer=pointwise_config.weight_quantizer,
            output_quantizer=output_quantizer,
            freeze_bn_after_steps=scheme.freeze_bn_after_steps,
            name=f"quant_{pointwise.name}",
        )
    else:
        if not plan.output_quantized(annotation):
            pointwise_config = without_output_quantization(pointwise_config)
        pointwise_layer = QuantizeWrapper(pointwise, pointwise_config, name=f"quant_{pointwise.name}")
    outputs = pointwise_layer(depthwise_wrapper(inputs))
    depthwise.set_weights([keras.ops.convert_to_numpy(separable.depthwise_kernel)])
    pointwise_weights = [separable.pointwise_kernel] + ([separable.bias] if separable.use_bias else [])
    pointwise.set_weights([keras.ops.convert_to_numpy(w) for w in pointwise_weights])
    if bn_annotation is not None:
        batch_norm.set_weights(bn_annotation.layer.get_weights())
    return outputs


def splits_activation(layer, scheme) -> bool:
    """A Conv/Dense with an activation TFLite cannot fuse (softmax, sigmoid, tanh, swish...):
    deployed as the kernel, a quantized tensor, and the activation's own integer kernel."""
    if not (
        isinstance(layer, QuantizeAnnotate)
        and layer.quantize_config is None
        and kind_of(layer.layer) is not None
        and kind_of(layer.layer).role == "kernel"
        and type(layer.layer) not in _SEPARABLE
        and not scheme.keeps_float(layer.layer)
    ):
        return False
    return activation_name(getattr(layer.layer, "activation", "linear")) not in CLAMP_ACTIVATIONS


def call_activation_split(annotation, plan, scheme, inputs, *args, **kwargs):
    """Call ``annotation``'s kernel layer without its activation, then the activation, each
    quantized as the scheme says."""
    inner = annotation.layer
    linear = type(inner).from_config({**inner.get_config(), "activation": "linear"})
    activation = keras.layers.Activation(inner.activation, name=f"{inner.name}_activation")
    activation_config = scheme.governed_config(activation, inner)
    if not plan.output_quantized(annotation):
        activation_config = without_output_quantization(activation_config)
    kernel_config = scheme.governed_config(linear, inner)
    kernel_wrapper = QuantizeWrapper(linear, kernel_config, name=annotation.name.replace("quant_annotate_", "quant_", 1))
    activation_wrapper = QuantizeWrapper(activation, activation_config, name=f"quant_{activation.name}")
    outputs = activation_wrapper(kernel_wrapper(inputs, *args, **kwargs))
    linear.set_weights([keras.ops.convert_to_numpy(w) for w in inner.weights])
    return outputs


def splits_rescaling(layer, scheme) -> bool:
    """A Rescaling with both a scale and an offset: deployed as an integer MUL and ADD, each
    with an output scale, so the tensor between them is quantized too."""
    if not (
        isinstance(layer, QuantizeAnnotate)
        and layer.quantize_config is None
        and type(layer.layer) is keras.layers.Rescaling
        and not scheme.keeps_float(layer.layer)
    ):
        return False
    config = layer.layer.get_config()
    return np.ndim(config["scale"]) == 0 and np.ndim(config["offset"]) == 0 and config["offset"] != 0 and config["scale"] != 1


def call_rescaling_split(annotation, plan, scheme, inputs):
    rescaling = annotation.layer
    config = rescaling.get_config()
    scale = keras.layers.Rescaling(config["scale"], 0.0, name=f"{rescaling.name}_scale")
    offset = keras.layers.Rescaling(1.0, config["offset"], name=f"{rescaling.name}_offset")
    offset_config = scheme.governed_config(offset, rescaling)
    if not plan.output_quantized(annotation):
        offset_config = without_output_quantization(offset_config)
    scale_config = scheme.governed_config(scale, rescaling)
    scaled = QuantizeWrapper(scale, scale_config, name=f"quant_{scale.name}")(inputs)
    return QuantizeWrapper(offset, offset_config, name=f"quant_{offset.name}")(scaled)


def split_names(layer) -> list[str]:
    """The names of the layers a split may make of ``layer`` (a model's layer, not annotated):
    scheme overrides may name them, besides the model's own layers."""
    if type(layer) in _SEPARABLE:
        return [f"{layer.name}_depthwise", f"{layer.name}_pointwise"]
    if type(layer) is keras.layers.Rescaling:
        return [f"{layer.name}_scale", f"{layer.name}_offset"]
    kind = kind_of(layer)
    if kind is not None and kind.role == "kernel":
        return [f"{layer.name}_activation"]
    return []


def folded_layer(annotation, plan, scheme, clone):
    """The Conv/Dense of ``annotation`` with its BatchNormalization folded in; a SeparableConv
    stays an annotation, split when called, its BatchNormalization folded into the pointwise
    half (:func:`call_separable_split`)."""
    if splits_separable(annotation, scheme):
        return annotation
    bn_annotation = plan.folds[id(annotation)]
    config = scheme.config_for(annotation.layer)
    output_quantizer = config.activation_quantizer if plan.output_quantized(bn_annotation) else None
    return QuantizeFoldedBatchNorm(
        clone(annotation.layer),
        clone(bn_annotation.layer),
        weight_quantizer=config.weight_quantizer,
        output_quantizer=output_quantizer,
        freeze_bn_after_steps=scheme.freeze_bn_after_steps,
        name=annotation.name.replace("quant_annotate_", "quant_", 1),
    )


def without_output_quantization(config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with its weights still quantized but not its activation or outputs."""
    if not isinstance(config, LayerQuantizeConfig):
        return config
    return LayerQuantizeConfig(weight_attrs=config.weight_attrs, weight_quantizer=config.weight_quantizer)
