"""The QAT model API, with tfmot's names and meanings.

* :func:`quantize_annotate_layer` marks a layer; :func:`quantize_annotate_model` marks all.
* :func:`quantize_apply` rebuilds an annotated model with quantized layers, as the scheme says.
* :func:`quantize_model` does both: the whole model, quantized.
* :func:`quantize_scope` makes the package's classes (and yours) known when loading.

Sequential and functional models are supported, with nested models (a Model used as a
layer); the rebuilt model is functional, with fresh layers holding copies of the weights.
Subclassed models cannot be rewritten: rebuild them with the functional API from their own
layers first (the error says how).

Errors are refusals up front, each naming the layers concerned and the way out: a scheme
override naming no layer of the model, a model that is already quantized, every layer the
scheme does not support at once (:class:`~keras_qat.errors.UnsupportedLayerError`).
"""

from __future__ import annotations

from typing import Any, Iterable

import keras

from keras_qat.config import LayerQuantizeConfig, QuantizeConfig
from keras_qat.errors import UnsupportedLayerError
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeAnnotate, QuantizeLayer, QuantizeSameScale, QuantizeWrapper
from keras_qat.schemes import Default8BitScheme, Scheme
from keras_qat.transforms import plan_fusions, rewrites


def _is_functional(model) -> bool:
    # Keras exposes no public Functional class; a graph model keeps its operations and nodes.
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def _is_graph_model(model) -> bool:
    return isinstance(model, keras.Sequential) or _is_functional(model)


def _layer_attributes(model) -> list[str]:
    """``model.<name>`` for each layer a subclassed model holds as a public attribute."""
    return [f"model.{name}" for name, value in vars(model).items() if isinstance(value, keras.layers.Layer) and not name.startswith("_")]


def _subclassed_model_error(model, caller: str) -> ValueError:
    held = _layer_attributes(model)
    example = f"e.g. {held[0]}(inputs)" if held else "as its call() calls them"
    layers = f" (its layers: {', '.join(held)})" if held else ""
    return ValueError(
        f"{caller}: '{model.name}' is a subclassed Model ({type(model).__name__}), whose call() "
        "keras-qat cannot read or rewrite, and which no exporter takes. Rebuild it with the "
        "functional API from its own layers, which keep their trained weights: "
        f"inputs = keras.Input(shape=<one example's shape>); outputs = its layers called on inputs "
        f"in the order its call() calls them{layers}, {example}; then "
        f"{caller}(keras.Model(inputs, outputs)). That model quantizes, saves and exports."
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
                        "keras-qat cannot rewrite. Rebuild that model with the functional API "
                        "from its own layers (outputs = its layers called on a keras.Input, as "
                        "its call() calls them) and annotate the layers of the rebuilt model."
                    )


def _is_keras_qat_layer(layer) -> bool:
    """A layer that quantize_apply makes: the model holding it is already quantized."""
    return isinstance(layer, (QuantizeWrapper, QuantizeFoldedBatchNorm, QuantizeSameScale, QuantizeLayer))


def _already_quantized_error(model_name: str, layers: list[str], caller: str) -> ValueError:
    shown = ", ".join(f"'{name}'" for name in layers[:4]) + (", ..." if len(layers) > 4 else "")
    return ValueError(
        f"{caller}: model '{model_name}' is already quantized: it holds keras-qat's quantized "
        f"layers ({shown}). Train, evaluate, save or export it as it is "
        "(keras_qat.export.save_artifact, to_tflite); to quantize with another scheme, call "
        f"{caller} on the float model it was made from."
    )


def _check_not_quantized(model, caller: str) -> None:
    """Refuse a model that already holds quantized layers (``quantize_model``'s output)."""
    quantized = [layer.name for layer in _iter_layers(model) if _is_keras_qat_layer(layer)]
    if quantized:
        raise _already_quantized_error(model.name, quantized, caller)


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
    if isinstance(to_annotate, QuantizeAnnotate):
        raise ValueError(f"quantize_annotate_layer: '{to_annotate.name}' is already annotated.")
    if _is_keras_qat_layer(to_annotate):
        raise ValueError(
            f"quantize_annotate_layer: '{to_annotate.name}' ({type(to_annotate).__name__}) is already "
            "quantized; annotate the float layer it was made from."
        )
    return QuantizeAnnotate(to_annotate, quantize_config)


def quantize_annotate_model(to_annotate: keras.Model) -> keras.Model:
    """Mark every layer of ``to_annotate`` (and of its nested models) for quantization.

    Layers already annotated keep their annotation. The returned model shares its layers,
    and so its weights, with ``to_annotate``.
    """
    _check_graph_model(to_annotate, "quantize_annotate_model")
    _check_not_quantized(to_annotate, "quantize_annotate_model")
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


def _unsupported_reason(layer) -> str:
    """Why ``layer`` is not quantized, and the ways out that work end to end."""
    if isinstance(layer, keras.layers.Lambda):
        return (
            f"'{layer.name}' (Lambda) is not supported: its Python code can be neither quantized nor "
            "exported, and a model holding it does not load with keras.models.load_model's default "
            "safe_mode=True, so keeping it in float does not work either. Replace it by the built-in "
            "layers that compute the same, e.g. keras.layers.Activation('swish') (any Keras activation "
            "by name) for an elementwise function, ReLU or LeakyReLU, Reshape or Flatten, Add or "
            "Multiply: those quantize, save, load in safe mode and export."
        )
    return (
        f"'{layer.name}' ({type(layer).__name__}) is not supported: say how to quantize it with "
        "quantize_annotate_layer(layer, quantize_config=YourQuantizeConfig()), or keep it in float "
        f"with the scheme's overrides={{'{layer.name}': None}} (or annotate only the other layers); "
        "a layer kept in float converts to TFLite as float ops, and is not taken by the .kqat export."
    )


def _check_supported(model, scheme) -> None:
    """Raise one :class:`UnsupportedLayerError` naming every annotated layer that ``scheme``
    has no config for (and was not told to keep in float)."""
    reasons = {}
    for layer in _iter_layers(model):
        if not isinstance(layer, QuantizeAnnotate) or layer.quantize_config is not None:
            continue
        if not scheme.keeps_float(layer.layer) and scheme.config_for(layer.layer) is None:
            reasons[layer.layer.name] = _unsupported_reason(layer.layer)
    if reasons:
        raise UnsupportedLayerError("quantize_apply", type(scheme).__name__, reasons)


def _check_annotations_not_quantized(model) -> None:
    """Refuse annotations of layers that are quantized already."""
    quantized = [layer.layer.name for layer in _iter_layers(model) if isinstance(layer, QuantizeAnnotate) and _is_keras_qat_layer(layer.layer)]
    if quantized:
        raise _already_quantized_error(model.name, quantized, "quantize_apply")


def _check_override_names(model, scheme) -> None:
    """Refuse scheme overrides that name no layer of ``model`` (nested models included)."""
    names, derived, models = [], [], []
    for layer in _iter_layers(model):
        if isinstance(layer, keras.Model):
            models.append(layer.name)
        elif not isinstance(layer, keras.layers.InputLayer):
            inner = layer.layer if isinstance(layer, QuantizeAnnotate) else layer
            names.append(inner.name)
            derived += rewrites.split_names(inner)
    scheme.check_overrides(names, model.name, also_accepted=derived, nested_models=models)


def _clone_layer(layer):
    return layer.__class__.from_config(layer.get_config())


def quantize_apply(model: keras.Model, scheme: Scheme | None = None, target: str | None = None) -> keras.Model:
    """Rebuild an annotated model with its annotated layers quantized.

    Each annotated layer becomes a :class:`QuantizeWrapper` with its annotation's config, or
    the scheme's config for its type. Model inputs that feed quantized layers get a
    :class:`QuantizeLayer`. Layers without annotation stay float. The new model has fresh
    layers holding copies of the weights, and each weight quantizer's range is already its
    weight's (BatchNorm folded); activation ranges hold their initial values until training
    observes data, or :func:`keras_qat.calibrate` sets them.

    Args:
        model: a Sequential or functional model with annotated layers.
        scheme: default :class:`~keras_qat.schemes.Default8BitScheme`.
        target: ``"tflite"``, ``"kqat"`` or ``"onnx"``: refuse the model now, before any training, if that
            target cannot compute it exactly (one :class:`~keras_qat.errors.NotDeployableError`
            naming every such layer and why); the same verdict as the export and
            ``diagnose(model, target=...)``.
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
    _check_override_names(model, scheme)
    _check_annotations_not_quantized(model)
    _check_supported(model, scheme)
    quantized = _apply(model, scheme)
    # Weight grids are the weights' own from the start (activations need data: calibrate).
    from keras_qat.calibration import weight_ranges_from_weights

    weight_ranges_from_weights(quantized)
    if target is not None:
        # The exporters' verdict; imported here because the exporters build on this module.
        from keras_qat.export.targets import require_deployable

        require_deployable(quantized, target)
    return quantized


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
            return rewrites.folded_layer(layer, plan, scheme, clone)
        if rewrites.splits(layer, scheme):
            return layer  # split into two quantized layers when it is called
        if id(layer) in plan.same_scale:
            quantizer = scheme.config_for(layer.layer).output_quantizer
            return QuantizeSameScale(clone(layer.layer), quantizer, name=layer.name.replace("quant_annotate_", "quant_", 1))
        if isinstance(layer, QuantizeAnnotate):
            inner = layer.layer
            if scheme.keeps_float(inner) and layer.quantize_config is None:
                return clone(inner)
            config = layer.quantize_config or plan.config_for(layer, scheme)
            if config is None:  # found up front by _check_supported
                raise UnsupportedLayerError("quantize_apply", type(scheme).__name__, {inner.name: _unsupported_reason(inner)})
            if not plan.output_quantized(layer):
                config = rewrites.without_output_quantization(config)
            name = layer.name.replace("quant_annotate_", "quant_", 1)
            return QuantizeWrapper(clone(inner), config, name=name)
        return clone(layer)

    def intercept(layer, *args, **kwargs):
        if id(layer) in plan.folded:
            return args[0]
        if rewrites.splits(layer, scheme):
            return rewrites.call_split(layer, plan, scheme, *args, **kwargs)
        if id(layer) in plan.quantized_operations:
            quantizer = scheme.activation_quantizer("linear", scheme.activation_bits)
            return QuantizeLayer(quantizer, name=f"quantize_{layer.name}_output")(layer(*args, **kwargs))
        return None

    rebuilt = _rebuild_graph(
        model,
        replace,
        quantize_inputs=True,
        intercept=intercept,
        is_quantized=lambda layer: _is_quantized_layer(layer) or rewrites.splits(layer, scheme),
    )
    for original, new in copies:
        if original.weights:
            new.set_weights(original.get_weights())
    return rebuilt


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


def quantize_model(to_quantize: keras.Model, scheme: Scheme | None = None, target: str | None = None) -> keras.Model:
    """Quantize every layer of ``to_quantize`` as ``scheme`` says (default: TFLite int8).

    Equivalent to ``quantize_apply(quantize_annotate_model(to_quantize), scheme, target)``.
    Layers the scheme does not support raise one error naming all of them and how to proceed;
    with a ``target``, so do layers that target cannot deploy exactly (see
    :func:`quantize_apply`). A model that is already quantized is refused as such.
    """
    _check_graph_model(to_quantize, "quantize_model")
    _check_not_quantized(to_quantize, "quantize_model")
    return quantize_apply(quantize_annotate_model(to_quantize), scheme, target)


def quantize_scope(*custom_objects: dict[str, Any]):
    """A ``keras.saving.custom_object_scope`` with keras-qat's classes and ``custom_objects``.

    The package's classes are registered with Keras and load without it once ``keras_qat`` is
    imported (before or after Keras); this exists for tfmot scripts and for your own
    QuantizeConfigs and quantizers. A process that never imports ``keras_qat`` gets Keras's
    ``Could not locate class 'QuantizeLayer'`` on loading: see :mod:`keras_qat.errors`.
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
