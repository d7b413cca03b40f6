"""The QAT model API, with tfmot's names and meanings.

* :func:`quantize_annotate_layer` marks a layer; :func:`quantize_annotate_model` marks all.
* :func:`quantize_apply` rebuilds an annotated model with quantized layers, as the scheme says.
* :func:`quantize_model` does both: the whole model, quantized.
* :func:`quantize_scope` makes the package's classes (and yours) known when loading.

Sequential and functional models are supported, with nested models (a Model used as a
layer); the rebuilt model is functional, with fresh layers holding copies of the weights.
Subclassed models cannot be rewritten: quantize their layers inside the model instead.
"""

from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np

from keras_qat.config import LayerQuantizeConfig, QuantizeConfig
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeAnnotate, QuantizeLayer, QuantizeSameScale, QuantizeWrapper
from keras_qat.schemes import Default8BitScheme, Scheme
from keras_qat.schemes.base import KERNEL_LAYERS, activation_name
from keras_qat.transforms import plan_fusions


def _is_functional(model) -> bool:
    # Keras exposes no public Functional class; a graph model keeps its operations and nodes.
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def _is_graph_model(model) -> bool:
    return isinstance(model, keras.Sequential) or _is_functional(model)


def _subclassed_model_error(model, caller: str) -> ValueError:
    return ValueError(
        f"{caller}: '{model.name}' is a subclassed Model ({type(model).__name__}), whose "
        "computation keras-qat cannot rewrite. Either build it with the functional API or "
        "Sequential, or quantize its layers yourself: in its __init__, wrap each layer as "
        "keras_qat.QuantizeWrapper(layer, config), with a config from a scheme, e.g. "
        "keras_qat.schemes.Default8BitScheme().config_for(layer)."
    )


def _check_graph_model(model, caller: str) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(f"{caller}: expected a keras.Model, got {type(model).__name__}.")
    if not _is_graph_model(model):
        raise _subclassed_model_error(model, caller)
    if not model.built or not model.inputs:
        raise ValueError(
            f"{caller}: model '{model.name}' is not built; give it an input shape "
            "(keras.Input or an InputLayer) before quantizing it."
        )


def _iter_layers(model) -> Iterable[Any]:
    """Every layer of a graph model, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer) if _is_graph_model(layer) else ()


def _check_no_annotation_in_subclassed(model, caller: str) -> None:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if _is_graph_model(layer):
                _check_no_annotation_in_subclassed(layer, caller)
                continue
            for inner in layer._flatten_layers(include_self=False, recursive=True):
                if isinstance(inner, QuantizeAnnotate):
                    raise ValueError(
                        f"{caller}: the annotated layer '{inner.layer.name}' is inside "
                        f"'{layer.name}', a subclassed Model ({type(layer).__name__}), which "
                        "keras-qat cannot rewrite. Build that model functionally, or replace "
                        "the annotation inside it by keras_qat.QuantizeWrapper(layer, config)."
                    )


def _is_plain_operation(operation) -> bool:
    """A keras.ops operation in a functional graph (``x + 3.0``), not a layer: it has no
    weights, cannot be wrapped, and runs in float."""
    return not isinstance(operation, keras.layers.Layer)


# ---- annotation ---------------------------------------------------------------------------


def quantize_annotate_layer(to_annotate, quantize_config: QuantizeConfig | None = None) -> QuantizeAnnotate:
    """Mark ``to_annotate`` for quantization by :func:`quantize_apply`.

    Args:
        to_annotate: a Keras layer (not a Model: annotate its layers instead).
        quantize_config: how to quantize it; None lets the scheme decide by layer type.
    """
    if isinstance(to_annotate, keras.Model):
        raise ValueError(
            f"quantize_annotate_layer: '{to_annotate.name}' is a Model; annotate the model with "
            "quantize_annotate_model, or its layers one by one."
        )
    if not isinstance(to_annotate, keras.layers.Layer):
        raise ValueError(f"quantize_annotate_layer: expected a Keras layer, got {to_annotate!r}.")
    if isinstance(to_annotate, (QuantizeAnnotate, QuantizeWrapper)):
        raise ValueError(f"quantize_annotate_layer: '{to_annotate.name}' is already annotated or quantized.")
    return QuantizeAnnotate(to_annotate, quantize_config)


def quantize_annotate_model(to_annotate: keras.Model) -> keras.Model:
    """Mark every layer of ``to_annotate`` (and of its nested models) for quantization.

    Layers already annotated keep their annotation. The returned model shares its layers,
    and so its weights, with ``to_annotate``.
    """
    _check_graph_model(to_annotate, "quantize_annotate_model")
    _check_no_annotation_in_subclassed(to_annotate, "quantize_annotate_model")

    def annotate(layer):
        if _is_plain_operation(layer) or isinstance(layer, (QuantizeAnnotate, keras.layers.InputLayer)):
            return layer
        if isinstance(layer, keras.Model):
            if not _is_graph_model(layer):
                raise _subclassed_model_error(layer, "quantize_annotate_model")
            return quantize_annotate_model(layer)
        return QuantizeAnnotate(layer)

    return _rebuild_graph(to_annotate, annotate)


# ---- apply --------------------------------------------------------------------------------


def _unsupported_layer_error(layer, scheme) -> ValueError:
    return ValueError(
        f"quantize_apply: layer '{layer.name}' ({type(layer).__name__}) is not supported by "
        f"{type(scheme).__name__}. Say how to quantize it with "
        f"quantize_annotate_layer(layer, quantize_config=YourQuantizeConfig()), or keep it in "
        f"float: do not annotate it (annotate the other layers with quantize_annotate_layer "
        f"instead of quantize_annotate_model / quantize_model), or give the scheme "
        f"overrides={{'{layer.name}': None}}."
    )


def _clone_layer(layer):
    return layer.__class__.from_config(layer.get_config())


def quantize_apply(model: keras.Model, scheme: Scheme | None = None) -> keras.Model:
    """Rebuild an annotated model with its annotated layers quantized.

    Each annotated layer becomes a :class:`QuantizeWrapper` with its annotation's config, or
    the scheme's config for its type. Model inputs that feed quantized layers get a
    :class:`QuantizeLayer`. Layers without annotation stay float. The new model has fresh
    layers holding copies of the weights.

    Args:
        model: a Sequential or functional model with annotated layers.
        scheme: default :class:`~keras_qat.schemes.Default8BitScheme`.
    """
    scheme = scheme if scheme is not None else Default8BitScheme()
    if not isinstance(scheme, Scheme):
        raise ValueError(f"quantize_apply: scheme must be a keras_qat Scheme, got {scheme!r}.")
    _check_graph_model(model, "quantize_apply")
    _check_no_annotation_in_subclassed(model, "quantize_apply")
    if not any(isinstance(layer, QuantizeAnnotate) for layer in _iter_layers(model)):
        raise ValueError(
            f"quantize_apply: model '{model.name}' has no annotated layer. Annotate layers with "
            "quantize_annotate_layer (or the whole model with quantize_annotate_model), or call "
            "quantize_model to quantize every layer."
        )
    return _apply(model, scheme)


def _apply(model, scheme):
    if isinstance(model, keras.Sequential):
        model = _functional_from_sequential(model)
    plan = plan_fusions(model, scheme)
    copies: list[tuple[Any, Any]] = []  # (original layer, new layer) whose weights to copy

    def clone(layer):
        new = _clone_layer(layer)
        copies.append((layer, new))
        return new

    def replace(layer):
        if _is_plain_operation(layer) or isinstance(layer, keras.layers.InputLayer):
            return layer
        if isinstance(layer, keras.Model):
            return _apply(layer, scheme)
        if id(layer) in plan.folded:
            return layer  # the BatchNormalization lives on in the folded layer before it
        if id(layer) in plan.folds:
            return _folded_layer(layer, plan, scheme, clone)
        if _splits_separable(layer, scheme) or _splits_activation(layer, scheme) or _splits_rescaling(layer, scheme):
            return layer  # split into two quantized layers when it is called
        if id(layer) in plan.same_scale:
            quantizer = scheme.config_for(layer.layer).output_quantizer
            return QuantizeSameScale(clone(layer.layer), quantizer, name=layer.name.replace("quant_annotate_", "quant_", 1))
        if isinstance(layer, QuantizeAnnotate):
            inner = layer.layer
            if scheme.keeps_float(inner) and layer.quantize_config is None:
                return clone(inner)
            config = layer.quantize_config or scheme.config_for(inner)
            if config is None:
                raise _unsupported_layer_error(inner, scheme)
            if not plan.output_quantized(layer):
                config = _without_output_quantization(config)
            name = layer.name.replace("quant_annotate_", "quant_", 1)
            return QuantizeWrapper(clone(inner), config, name=name)
        return clone(layer)

    def intercept(layer, *args, **kwargs):
        if id(layer) in plan.folded:
            return args[0]
        if _splits_separable(layer, scheme):
            return _call_separable_split(layer, plan, scheme, args[0])
        if _splits_activation(layer, scheme):
            return _call_activation_split(layer, plan, scheme, *args, **kwargs)
        if _splits_rescaling(layer, scheme):
            return _call_rescaling_split(layer, plan, scheme, args[0])
        if id(layer) in plan.quantized_operations:
            quantizer = scheme.activation_quantizer("linear", scheme.activation_bits)
            return QuantizeLayer(quantizer, name=f"quantize_{layer.name}_output")(layer(*args, **kwargs))
        return None

    rebuilt = _rebuild_graph(
        model,
        replace,
        quantize_inputs=True,
        intercept=intercept,
        is_quantized=lambda layer: _is_quantized_layer(layer)
        or _splits_separable(layer, scheme)
        or _splits_activation(layer, scheme)
        or _splits_rescaling(layer, scheme),
    )
    for original, new in copies:
        if original.weights:
            new.set_weights(original.get_weights())
    return rebuilt


_SEPARABLE = {
    keras.layers.SeparableConv1D: (keras.layers.DepthwiseConv1D, keras.layers.Conv1D),
    keras.layers.SeparableConv2D: (keras.layers.DepthwiseConv2D, keras.layers.Conv2D),
}


def _splits_separable(layer, scheme) -> bool:
    """A SeparableConv the scheme quantizes: deployed as a depthwise and a 1x1 convolution,
    with the tensor between them quantized."""
    return (
        isinstance(layer, QuantizeAnnotate)
        and layer.quantize_config is None
        and type(layer.layer) in _SEPARABLE
        and not scheme.keeps_float(layer.layer)
        and isinstance(scheme.config_for(layer.layer), LayerQuantizeConfig)
    )


def _call_separable_split(annotation, plan, scheme, inputs):
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
    pointwise_config = scheme.config_for(pointwise)
    if not plan.output_quantized(annotation):
        pointwise_config = _without_output_quantization(pointwise_config)
    depthwise_wrapper = QuantizeWrapper(depthwise, scheme.config_for(depthwise), name=f"quant_{depthwise.name}")
    pointwise_wrapper = QuantizeWrapper(pointwise, pointwise_config, name=f"quant_{pointwise.name}")
    outputs = pointwise_wrapper(depthwise_wrapper(inputs))
    depthwise.set_weights([keras.ops.convert_to_numpy(separable.depthwise_kernel)])
    pointwise_weights = [separable.pointwise_kernel] + ([separable.bias] if separable.use_bias else [])
    pointwise.set_weights([keras.ops.convert_to_numpy(w) for w in pointwise_weights])
    return outputs


#: Activations that deployed kernels fuse; any other activation is a kernel of its own.
_FUSED_ACTIVATIONS = ("linear", "relu", "relu6")


def _splits_activation(layer, scheme) -> bool:
    """A Conv/Dense with an activation TFLite cannot fuse (softmax, sigmoid, tanh, swish...):
    deployed as the kernel, a quantized tensor, and the activation's own integer kernel."""
    if not (
        isinstance(layer, QuantizeAnnotate)
        and layer.quantize_config is None
        and type(layer.layer) in KERNEL_LAYERS
        and type(layer.layer) not in _SEPARABLE
        and not scheme.keeps_float(layer.layer)
    ):
        return False
    return activation_name(getattr(layer.layer, "activation", "linear")) not in _FUSED_ACTIVATIONS


def _call_activation_split(annotation, plan, scheme, inputs, *args, **kwargs):
    """Call ``annotation``'s kernel layer without its activation, then the activation, each
    quantized as the scheme says."""
    inner = annotation.layer
    linear = type(inner).from_config({**inner.get_config(), "activation": "linear"})
    activation = keras.layers.Activation(inner.activation, name=f"{inner.name}_activation")
    activation_config = scheme.config_for(activation)
    if not plan.output_quantized(annotation):
        activation_config = _without_output_quantization(activation_config)
    kernel_wrapper = QuantizeWrapper(linear, scheme.config_for(linear), name=annotation.name.replace("quant_annotate_", "quant_", 1))
    activation_wrapper = QuantizeWrapper(activation, activation_config, name=f"quant_{activation.name}")
    outputs = activation_wrapper(kernel_wrapper(inputs, *args, **kwargs))
    linear.set_weights([keras.ops.convert_to_numpy(w) for w in inner.weights])
    return outputs


def _splits_rescaling(layer, scheme) -> bool:
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


def _call_rescaling_split(annotation, plan, scheme, inputs):
    rescaling = annotation.layer
    config = rescaling.get_config()
    scale = keras.layers.Rescaling(config["scale"], 0.0, name=f"{rescaling.name}_scale")
    offset = keras.layers.Rescaling(1.0, config["offset"], name=f"{rescaling.name}_offset")
    offset_config = scheme.config_for(offset)
    if not plan.output_quantized(annotation):
        offset_config = _without_output_quantization(offset_config)
    scaled = QuantizeWrapper(scale, scheme.config_for(scale), name=f"quant_{scale.name}")(inputs)
    return QuantizeWrapper(offset, offset_config, name=f"quant_{offset.name}")(scaled)


def _folded_layer(annotation, plan, scheme, clone) -> QuantizeFoldedBatchNorm:
    """The Conv/Dense of ``annotation`` with its BatchNormalization folded in."""
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


def _without_output_quantization(config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with its weights still quantized but not its activation or outputs."""
    if not isinstance(config, LayerQuantizeConfig):
        return config
    return LayerQuantizeConfig(weight_attrs=config.weight_attrs, weight_quantizer=config.weight_quantizer)


def _is_quantized_layer(layer) -> bool:
    return isinstance(layer, (QuantizeWrapper, QuantizeFoldedBatchNorm, QuantizeSameScale))


def _rebuild_graph(model, replace, quantize_inputs: bool = False, intercept=None, is_quantized=_is_quantized_layer):
    """Clone ``model`` as a functional model, each layer replaced by ``replace(layer)``.

    With ``quantize_inputs``, a model input that feeds a layer for which ``is_quantized`` holds
    goes through one QuantizeLayer first. ``intercept(layer, *args, **kwargs)``, if given,
    may return the output of a node instead of calling its layer (None: call it).
    """
    if isinstance(model, keras.Sequential):
        model = _functional_from_sequential(model)
    quantized_inputs: dict[int, Any] = {}

    def call(layer, *args, **kwargs):
        if quantize_inputs and is_quantized(layer):
            args = keras.tree.map_structure(lambda t: _quantized_input(t, quantized_inputs), args)
        if intercept is not None:
            outputs = intercept(layer, *args, **kwargs)
            if outputs is not None:
                return outputs
        return layer(*args, **kwargs)

    def _quantized_input(tensor, cache):
        if not isinstance(tensor, keras.KerasTensor) or not _is_model_input(tensor):
            return tensor
        if id(tensor) not in cache:
            name = tensor._keras_history.operation.name
            cache[id(tensor)] = QuantizeLayer(name=f"quantize_{name}")(tensor)
        return cache[id(tensor)]

    return keras.models.clone_model(model, clone_function=replace, call_function=call)


def _is_model_input(tensor) -> bool:
    history = getattr(tensor, "_keras_history", None)
    return history is not None and isinstance(history.operation, keras.layers.InputLayer)


def _functional_from_sequential(model: keras.Sequential) -> keras.Model:
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    outputs = inputs
    for layer in model.layers:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name=model.name)


def quantize_model(to_quantize: keras.Model, scheme: Scheme | None = None) -> keras.Model:
    """Quantize every layer of ``to_quantize`` as ``scheme`` says (default: TFLite int8).

    Equivalent to ``quantize_apply(quantize_annotate_model(to_quantize), scheme)``. Layers the
    scheme does not support raise an error that says how to proceed.
    """
    _check_graph_model(to_quantize, "quantize_model")
    return quantize_apply(quantize_annotate_model(to_quantize), scheme)


def quantize_scope(*custom_objects: dict[str, Any]):
    """A ``keras.saving.custom_object_scope`` with keras-qat's classes and ``custom_objects``.

    The package's classes are registered with Keras and load without it; this exists for
    tfmot scripts and for your own QuantizeConfigs and quantizers.
    """
    from keras_qat import config as config_module
    from keras_qat import folding as folding_module
    from keras_qat import layers as layers_module
    from keras_qat import quantizers as quantizers_module

    objects: dict[str, Any] = {}
    for module in (quantizers_module, config_module, layers_module, folding_module):
        for name in module.__all__:
            objects[name] = getattr(module, name)
    for extra in custom_objects:
        if not isinstance(extra, dict):
            raise ValueError(f"quantize_scope: arguments must be dicts of custom objects, got {extra!r}.")
        objects.update(extra)
    return keras.saving.custom_object_scope(objects)


__all__ = [
    "quantize_annotate_layer",
    "quantize_annotate_model",
    "quantize_apply",
    "quantize_model",
    "quantize_scope",
    "LayerQuantizeConfig",
]
