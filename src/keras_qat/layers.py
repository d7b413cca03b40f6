"""Layers that carry quantization: the annotation marker, the wrapper, the input quantizer.

:class:`QuantizeWrapper` runs the wrapped layer with its weights replaced by their
fake-quantized values. Keras 3 makes ``kernel`` read-only on Dense and Conv, so instead of
assigning attributes (as tfmot does) the wrapper runs the layer inside a
``keras.StatelessScope`` that maps each weight variable to its quantized value: any layer
that reads its variables, built-in or custom, sees quantized weights, on every backend, and
gradients flow through the quantizer to the float weights. State the layer updates while it
runs (BatchNormalization statistics, activation ranges) is carried out of the scope.

A QuantizeConfig sees the layer through :class:`LayerView`, which also answers to the Keras 2
names of weights that Keras 3 renamed (:data:`KERAS2_NAMES`), for reading and for setting, so
that a tfmot config written for Keras 2 (``layer.depthwise_kernel``) runs unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import keras

from keras_qat import emulation, linking
from keras_qat import ops as qops
from keras_qat.config import LayerQuantizeConfig, NoOpQuantizeConfig, QuantizeConfig
from keras_qat.quantizers import MovingAverageQuantizer, Quantizer
from keras_qat.registry import clamp_activation, fixed_output_range, is_kind, is_last_axis_softmax
from keras_qat.spec import TensorSpec

#: Weights that Keras 3 renamed, by layer type: ``{Keras 2 name: Keras 3 name}``. Keras 3 keeps
#: the other names tfmot configs use (``kernel``, ``bias``, SeparableConv's ``depthwise_kernel``
#: and ``pointwise_kernel``, BatchNormalization's ``gamma``/``beta``, ``activation``).
KERAS2_NAMES: dict[type, dict[str, str]] = {
    keras.layers.DepthwiseConv1D: {"depthwise_kernel": "kernel"},
    keras.layers.DepthwiseConv2D: {"depthwise_kernel": "kernel"},
}


def keras3_name(layer, name: str) -> str:
    """The attribute of ``layer`` that ``name`` means: ``name`` itself if the layer has it,
    else the Keras 3 name of a Keras 2 name (:data:`KERAS2_NAMES`)."""
    if hasattr(layer, name):
        return name
    for layer_type, renamed in KERAS2_NAMES.items():
        if isinstance(layer, layer_type) and name in renamed:
            return renamed[name]
    return name


def _is_variable(value) -> bool:
    return isinstance(value, keras.Variable)


class LayerView:
    """A layer as a QuantizeConfig sees it: the layer's attributes, also under their Keras 2
    names (:data:`KERAS2_NAMES`), and the layer's class for ``isinstance``."""

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    @property
    def __class__(self):
        return type(self._layer)

    def __getattr__(self, name):
        return getattr(self._layer, keras3_name(self._layer, name))

    def __setattr__(self, name, value):
        setattr(self._layer, keras3_name(self._layer, name), value)

    def __repr__(self):
        return repr(self._layer)


class _AssignmentRecorder(LayerView):
    """Stands in for a layer while a QuantizeConfig sets quantized values on it.

    Reading an attribute reads the layer's. Assigning an attribute that holds a weight
    variable records ``variable -> value`` for substitution, instead of replacing the
    variable; assigning any other attribute (an activation function) sets it on the layer.
    Keras 2 names of renamed weights are taken for their Keras 3 names (see :class:`LayerView`).
    """

    def __init__(self, layer, owner: str):
        super().__init__(layer)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "substitutes", {})
        object.__setattr__(self, "assigned", {})

    def __setattr__(self, name, value):
        name = keras3_name(self._layer, name)
        current = getattr(self._layer, name, None)
        if _is_variable(current):
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(
                    f"{self._owner}: the quantized value set for '{name}' has shape "
                    f"{tuple(value.shape)}, but the weight has shape {tuple(current.shape)}."
                )
            self.substitutes[id(current)] = value
        else:
            self.assigned[name] = current
            setattr(self._layer, name, value)


def run_with_substitutes(fn, variables, substitutes: dict[int, Any]):
    """Run ``fn`` with ``variables`` read as ``substitutes`` where given, and keep updates.

    The scope also maps every other variable to its current value, so that values of an
    enclosing stateless scope (JAX training) are seen, and carries back every assignment made
    while ``fn`` ran.
    """
    initial = {}
    mapping = []
    for variable in variables:
        value = substitutes.get(id(variable))
        if value is None:
            value = variable.value
            initial[id(variable)] = value
        mapping.append((variable, value))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        outputs = fn()
    for variable in variables:
        if id(variable) not in initial:
            continue
        value = scope.get_current_value(variable)
        if value is not None and value is not initial[id(variable)]:
            variable.assign(value)
    return outputs


class QuantizeAwareActivation:
    """An activation function followed by fake quantization of its output.

    Installed on the wrapped layer (``layer.activation``) by the QuantizeConfig; its range
    variables live on the wrapper. The wrapper sets ``training`` before each call, and
    serializes the layer with its original activation, so this object is never saved.
    """

    def __init__(self, activation, quantizer: Quantizer, wrapper, name: str):
        self.activation = activation
        self.quantizer = quantizer
        self.training = False
        self.quantizer_vars: dict | None = None
        self._wrapper = wrapper
        self._name = name

    def build(self, output_shape) -> None:
        """Create the range variables on the wrapper, for outputs of ``output_shape``."""
        self.quantizer_vars = self.quantizer.build(output_shape, self._name, self._wrapper)

    def __call__(self, inputs):
        outputs = self.activation(inputs)
        return self.quantizer(outputs, self.training, self.quantizer_vars)

    @property
    def __name__(self):
        return getattr(self.activation, "__name__", "quantize_aware_activation")


def resolved_spec(quantizer, tensor_shape, name: str, layer) -> TensorSpec | None:
    """The quantizer's description of a weight (its channel axes resolved for the weight's shape
    and layer), or None for a quantizer from elsewhere that gives none."""
    spec = getattr(quantizer, "spec", None)
    return spec(tuple(tensor_shape), name, layer) if callable(spec) else None


def kernel_quantize(quantizer: Quantizer, variables: dict):
    """``quantize(w, axes)``: ``w`` fake-quantized on ``quantizer``'s grid (its range variables),
    per channel over ``axes`` when the quantizer is per axis; for exporters that trace a kernel
    in another layout than the layer's."""

    def quantize(weight, axes):
        range_min, range_max = quantizer.range_of(variables)
        return qops.fake_quant(
            weight,
            range_min,
            range_max,
            num_bits=quantizer.num_bits,
            narrow_range=quantizer.narrow_range,
            axis=axes if quantizer.per_axis else None,
        )

    return quantize


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantizeAnnotate(keras.layers.Wrapper):
    """Marks a layer for quantization; behaves exactly as the layer until ``quantize_apply``.

    Args:
        layer: the layer to quantize.
        quantize_config: how; None lets the scheme decide by layer type.
    """

    def __init__(self, layer, quantize_config: QuantizeConfig | None = None, **kwargs):
        kwargs.setdefault("name", f"quant_annotate_{layer.name}")
        super().__init__(layer, **kwargs)
        if quantize_config is not None and not isinstance(quantize_config, QuantizeConfig):
            raise ValueError(
                f"quantize_annotate_layer('{layer.name}'): quantize_config must be a "
                f"keras_qat QuantizeConfig, got {quantize_config!r}."
            )
        self.quantize_config = quantize_config

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, *args, **kwargs):
        return self.layer(inputs, *args, **kwargs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["quantize_config"] = (
            None if self.quantize_config is None else keras.saving.serialize_keras_object(self.quantize_config)
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        quantize_config = config.pop("quantize_config", None)
        if quantize_config is not None:
            quantize_config = keras.saving.deserialize_keras_object(quantize_config, custom_objects=custom_objects)
        return cls(layer, quantize_config, **config)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantizeWrapper(keras.layers.Wrapper):
    """Runs ``layer`` with quantized weights, activations and outputs, as ``quantize_config`` says.

    Variables are named after what they quantize: ``kernel_min``, ``kernel_max``,
    ``activation_min``, ``output_min`` (``output_0_min``, ... for several outputs).
    """

    def __init__(self, layer, quantize_config: QuantizeConfig, **kwargs):
        kwargs.setdefault("name", f"quant_{layer.name}")
        super().__init__(layer, **kwargs)
        if not isinstance(quantize_config, QuantizeConfig):
            raise ValueError(
                f"QuantizeWrapper('{layer.name}'): quantize_config must be a keras_qat "
                f"QuantizeConfig, got {quantize_config!r}."
            )
        self.quantize_config = quantize_config
        self._weight_vars: list[tuple[Any, Quantizer, dict]] = []
        self._activations: list[QuantizeAwareActivation] = []
        self._original_activations: dict[str, Any] = {}
        self._output_vars: list[tuple[Quantizer, dict]] = []
        self._weight_specs: list[TensorSpec | None] = []

    @property
    def _owner(self) -> str:
        return f"{type(self.quantize_config).__name__} for layer '{self.layer.name}'"

    # ---- build ------------------------------------------------------------------------

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        config = self.quantize_config
        layer_variables = {id(v) for v in self.layer.weights}
        view = LayerView(self.layer)
        for weight, quantizer in self._pairs(config.get_weights_and_quantizers(view), "weight"):
            if not _is_variable(weight) or id(weight) not in layer_variables:
                raise ValueError(
                    f"{self._owner}: get_weights_and_quantizers returned {weight!r}, which is not "
                    f"a weight of the layer; its weights are {[w.name for w in self.layer.weights]}."
                )
            self._weight_vars.append((weight, quantizer, quantizer.build(weight.shape, weight.name, self)))
            self._weight_specs.append(resolved_spec(quantizer, weight.shape, weight.name, self))

        activation_pairs = self._pairs(config.get_activations_and_quantizers(view), "activation")
        if activation_pairs:
            output_shape = self._output_shapes(input_shape)[0]
            for index, (activation, quantizer) in enumerate(activation_pairs):
                name = "activation" if len(activation_pairs) == 1 else f"activation_{index}"
                quantize_activation = QuantizeAwareActivation(activation, quantizer, self, name)
                quantize_activation.build(output_shape)
                self._activations.append(quantize_activation)
            recorder = _AssignmentRecorder(self.layer, self._owner)
            config.set_quantize_activations(recorder, list(self._activations))
            self._original_activations = recorder.assigned

        config_output_quantizers = config.get_output_quantizers
        if "num_outputs" in inspect.signature(config_output_quantizers).parameters:
            shapes = self._output_shapes(input_shape)
            output_quantizers = list(config_output_quantizers(view, num_outputs=len(shapes)))
        else:  # tfmot's signature: get_output_quantizers(layer)
            output_quantizers = list(config_output_quantizers(view))
            shapes = self._output_shapes(input_shape) if output_quantizers else []
        if len(output_quantizers) not in (0, len(shapes)):
            raise ValueError(
                f"{self._owner}: get_output_quantizers returned {len(output_quantizers)} "
                f"quantizers, but the layer has {len(shapes)} outputs; return one per output "
                "(or an empty list)."
            )
        for index, (quantizer, shape) in enumerate(zip(output_quantizers, shapes)):
            self._check_quantizer(quantizer, "output")
            name = "output" if len(shapes) == 1 else f"output_{index}"
            self._output_vars.append((quantizer, quantizer.build(shape, name, self)))
        self.built = True

    def _pairs(self, pairs, kind):
        pairs = list(pairs)
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"{self._owner}: get_{kind}s_and_quantizers must return (tensor, quantizer) pairs, got {pair!r}.")
            self._check_quantizer(pair[1], kind)
        return pairs

    def _check_quantizer(self, quantizer, kind):
        if not isinstance(quantizer, Quantizer):
            raise ValueError(f"{self._owner}: the {kind} quantizer {quantizer!r} is not a keras_qat Quantizer.")

    def _output_shapes(self, input_shape) -> list[tuple]:
        """Shapes of the layer's outputs, flattened, from a symbolic call."""
        cached = getattr(self, "_output_spec_cache", None)
        if cached is None:
            inputs = keras.tree.map_shape_structure(lambda s: keras.KerasTensor(s), input_shape)
            spec = self.layer.compute_output_spec(inputs)
            cached = [tuple(t.shape) for t in keras.tree.flatten(spec)]
            self._output_spec_cache = cached
        return cached

    # ---- links to the grids of inputs and outputs (see keras_qat.linking) ----------------

    @property
    def passes_grid_through(self) -> bool:
        """A layer that only moves values (NoOpQuantizeConfig): its output is on its input's grid."""
        return isinstance(self.quantize_config, NoOpQuantizeConfig) and not self.layer.weights

    def accepts_output_target(self) -> bool:
        """Whether a consumer may quantize this layer's output for it (fused ReLU, Concatenate)
        and this layer then requantizes to that consumer's grid in integer inference."""
        if self._output_vars or self._activations:
            return False
        return self.integer_kind() is not None or is_kind(self.layer, "concatenate", "activation", "relu", "leaky_relu")

    def quantizes_inputs_as(self) -> emulation.OutputTarget | None:
        """For a ReLU or Concatenate that quantizes its inputs' values: its grid and clamp.
        A Concatenate whose own consumer quantizes it passes that consumer's on."""
        layer = self.layer
        if self._weight_vars or self._activations:
            return None
        inherited = linking.inherited_source(self)
        if inherited is not None:
            return emulation.OutputTarget(inherited, "linear")
        concatenate = is_kind(layer, "concatenate")
        if concatenate and not self._output_vars:
            return linking.output_target(self)
        if len(self._output_vars) != 1:
            return None
        activation = "linear" if concatenate else clamp_activation(layer)
        if activation is None:
            return None
        quantizer, variables = self._output_vars[0]
        return emulation.OutputTarget(emulation.Source(quantizer, variables), activation)

    def passes_requantized_input_through(self) -> bool:
        """Whether inference leaves this layer's inputs on the grid their producers put them
        on, as the deployed model does: a fused ReLU (its producer already requantized and
        clamped onto its grid; the deployed model runs no op for it), and a Concatenate all
        of whose inputs lie on its grid (the deployed model concatenates their codes).
        Fake-quantizing such values again could move one: TF's nudged grid and the deployed
        grid break a zero point near a tie apart (a symmetric 4-bit range, for one)."""
        if self._weight_vars or self._activations or self.passes_grid_through:
            return False
        if len(getattr(self, "_inbound_nodes", ())) != 1:
            return False  # called on several tensors: the graph tells only of its latest call
        if not is_kind(self.layer, "concatenate"):
            fused_relu = clamp_activation(self.layer) is not None and len(self._output_vars) == 1
            return fused_relu and linking.requantized_by_producer(self)
        target = self.quantizes_inputs_as()
        sources = linking.input_sources(self)
        return (
            target is not None
            and bool(sources)
            and all(s is not None and s.variables["min_var"] is target.source.variables["min_var"] for s in sources)
        )

    @property
    def inherits_input_grid(self) -> bool:
        """A Concatenate: if one input already has a grid, the others are quantized onto it."""
        return is_kind(self.layer, "concatenate") and not self._weight_vars and not self._activations

    def integer_kind(self) -> str | None:
        """"kernel", "add", "mean", "softmax", "leaky_relu" or "fixed_range" when inference runs this layer's
        integer kernel, else None."""
        if is_kind(self.layer, "add") and not self._weight_vars:
            return "add"
        if is_kind(self.layer, "multiply") and not self._weight_vars and len(self._output_vars) == 1:
            return "multiply"
        if is_kind(self.layer, "global_average_pool") and self.layer.data_format == "channels_last":
            return "mean"
        if (
            not self._weight_vars
            and len(self._output_vars) == 1
            and is_last_axis_softmax(self.layer)
            and emulation.writes_integer_softmax(self._output_vars[0][0])
        ):
            return "softmax"
        if (
            not self._weight_vars
            and len(self._output_vars) == 1
            and fixed_output_range(self.layer) is not None
            and self._output_vars[0][0].num_bits < 8
        ):
            return "fixed_range"
        if (
            type(self.layer) is keras.layers.LeakyReLU
            and float(self.layer.negative_slope) > 0.0
            and not self._weight_vars
            and len(self._output_vars) == 1
        ):
            return "leaky_relu"
        kernel_vars = [entry for entry in self._weight_vars if entry[0] is getattr(self.layer, "kernel", None)]
        if len(self._weight_vars) == 1 and kernel_vars and emulation.supports_kernel(self.layer, kernel_vars[0][1]):
            return "kernel"
        return None

    def output_target(self) -> emulation.OutputTarget | None:
        if self._activations:
            activation = self._activations[0]
            return emulation.OutputTarget(emulation.Source(activation.quantizer, activation.quantizer_vars), "linear")
        if len(self._output_vars) == 1:
            return emulation.OutputTarget(emulation.Source(*self._output_vars[0]), "linear")
        return linking.output_target(self)

    def _integer_inference(self, inputs):
        """The integer kernel's output, or None where a grid is unknown (see emulation)."""
        kind = self.integer_kind()
        target = self.output_target()
        sources = linking.input_sources(self)
        if kind is None or target is None or not sources or any(s is None for s in sources):
            return None
        if kind == "mean":
            return emulation.mean_inference(self.layer, inputs, sources[0], target)
        if kind == "leaky_relu":
            return emulation.leaky_relu_inference(inputs, float(self.layer.negative_slope), sources[0], target)
        if kind == "softmax":
            return emulation.softmax_inference(inputs, sources[0], target)
        if kind == "fixed_range":
            return emulation.fixed_range_inference(self.layer(inputs), fixed_output_range(self.layer), target)
        if kind == "add":
            flat = keras.tree.flatten(inputs)
            if len(flat) != 2 or len(sources) != 2:
                return None
            return emulation.add_inference(flat[0], flat[1], sources[0], sources[1], target)
        if kind == "multiply":
            flat = keras.tree.flatten(inputs)
            if len(flat) != 2 or len(sources) != 2 or any(s.quantizer.num_bits > 8 for s in sources):
                return None
            return emulation.multiply_inference(flat[0], flat[1], sources[0], sources[1], target)
        weight, quantizer, qvars = self._weight_vars[0]
        kernel = quantizer(weight, False, qvars)
        bias = self.layer.bias if getattr(self.layer, "use_bias", False) else None
        return emulation.kernel_inference(
            self.layer, inputs, kernel, bias, sources[0], self.weight_sources()[0], target
        )

    # ---- call -------------------------------------------------------------------------

    def call(self, inputs, training=None, **kwargs):
        training = bool(training)
        # Keras passes ``mask=None`` to layers that support masking; only a real argument
        # (a mask, or anything the integer kernel does not know) keeps fake quantization.
        emulated = emulation.enabled(training) and all(value is None for value in kwargs.values())
        if emulated:
            if self.passes_requantized_input_through():
                return self.layer(inputs) if is_kind(self.layer, "concatenate") else inputs
            outputs = self._integer_inference(inputs)
            if outputs is not None:
                return outputs
        exported = self._exported_linear(inputs, kwargs)
        if exported is None and qops.export_hook("upsample") is not None and self.passes_grid_through:
            exported = qops.export_hook("upsample")(self.layer, inputs)
        if exported is not None:
            return exported
        if not kwargs and self._quantizes_activation_itself(inputs, training):
            (quantizer, variables), = self._output_vars
            return quantizer(inputs, True, variables, activation=clamp_activation(self.layer))
        substitutes = {}
        if self._weight_vars:
            quantized = [quantizer(weight, training, qvars) for weight, quantizer, qvars in self._weight_vars]
            recorder = _AssignmentRecorder(self.layer, self._owner)
            self.quantize_config.set_quantize_weights(recorder, quantized)
            substitutes = recorder.substitutes
        for activation in self._activations:
            activation.training = training
        layer_kwargs = dict(kwargs)
        if "training" in inspect.signature(self.layer.call).parameters:
            layer_kwargs["training"] = training
        if substitutes or self._activations:
            outputs = run_with_substitutes(
                lambda: self.layer(inputs, **layer_kwargs), self.variables, substitutes
            )
        else:
            outputs = self.layer(inputs, **layer_kwargs)
        inherited = linking.inherited_source(self) if self.inherits_input_grid else None
        if inherited is not None:
            # The range is the input's owner's to learn; here it is only read.
            return inherited.quantizer(outputs, False, inherited.variables)
        if emulation.enabled(training) and self.accepts_output_target():
            return emulation.onto_consumer_grid(outputs, linking.output_consumer(self))
        if not self._output_vars:
            return outputs
        flat = keras.tree.flatten(outputs)
        flat = [quantizer(t, training, qvars) for t, (quantizer, qvars) in zip(flat, self._output_vars)]
        return keras.tree.pack_sequence_as(outputs, flat)

    def _quantizes_activation_itself(self, inputs, training: bool) -> bool:
        """Whether a ReLU/ReLU6 layer leaves its activation to its output quantizer in this
        training step: a quantizer that takes it (:attr:`~keras_qat.quantizers.Quantizer.takes_activation`),
        per tensor, on a tensor whose fake quant applies it inside
        (:func:`keras_qat.ops.fuses_activation`). The backward pass then keeps a byte per
        element instead of the activation's output, which the next layer keeps quantized."""
        if not training or self._weight_vars or self._activations or len(self._output_vars) != 1:
            return False
        quantizer, _ = self._output_vars[0]
        return (
            clamp_activation(self.layer) is not None
            and getattr(quantizer, "takes_activation", False)
            and not quantizer.per_axis
            and not self.inherits_input_grid
            and qops.fuses_activation(inputs)
        )

    def _exported_linear(self, inputs, kwargs):
        """While an exporter traces the model: a kernel layer traced the exporter's way (its
        ``linear`` hook, see :func:`keras_qat.ops.exporting`), with this layer's bias,
        quantized activation and output quantizers; None where the layer's own call serves."""
        linear = qops.export_hook("linear")
        kernel = getattr(self.layer, "kernel", None)
        if linear is None or len(self._weight_vars) != 1 or self._weight_vars[0][0] is not kernel:
            return None
        if any(value is not None for value in kwargs.values()):
            return None
        weight, quantizer, variables = self._weight_vars[0]
        outputs = linear(self.layer, inputs, weight, kernel_quantize(quantizer, variables), quantizer.per_axis)
        if outputs is None:
            return None
        if getattr(self.layer, "use_bias", False):
            outputs = outputs + self.layer.bias
        for activation in self._activations:
            activation.training = False
        activation = getattr(self.layer, "activation", None)
        if activation is not None:
            outputs = activation(outputs)
        for quantizer, variables in self._output_vars:
            outputs = quantizer(outputs, False, variables)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    # ---- introspection ----------------------------------------------------------------

    def quantized_weights(self) -> list[tuple[Any, Quantizer, dict]]:
        """``(weight, quantizer, quantizer variables)`` for every quantized weight."""
        return list(self._weight_vars)

    def weight_sources(self) -> list[emulation.Source]:
        """Every quantized weight's quantizer, variables and resolved spec (in the order of
        :meth:`quantized_weights`)."""
        return [
            emulation.Source(quantizer, variables, spec)
            for (_, quantizer, variables), spec in zip(self._weight_vars, self._weight_specs)
        ]

    def output_quantizers(self) -> list[tuple[Quantizer, dict]]:
        return list(self._output_vars)

    def activation_quantizers(self) -> list[QuantizeAwareActivation]:
        return list(self._activations)

    # ---- serialization ----------------------------------------------------------------

    def get_config(self):
        # Serialize the layer with its own activation functions, not the quantizing ones.
        installed = {name: getattr(self.layer, name) for name in self._original_activations}
        for name, original in self._original_activations.items():
            setattr(self.layer, name, original)
        try:
            config = super().get_config()
        finally:
            for name, value in installed.items():
                setattr(self.layer, name, value)
        config["quantize_config"] = keras.saving.serialize_keras_object(self.quantize_config)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        quantize_config = keras.saving.deserialize_keras_object(
            config.pop("quantize_config"), custom_objects=custom_objects
        )
        return cls(layer, quantize_config, **config)




@keras.saving.register_keras_serializable(package="keras_qat")
class QuantizeSameScale(keras.layers.Wrapper):
    """Runs ``layer`` between two fake quantizations that share one range.

    For layers whose integer kernel keeps its input's scale while it computes new values
    (TFLite's int8 AVERAGE_POOL_2D): the input is quantized on the range, the layer runs,
    and its output is rounded back onto the same grid, as the integer kernel does. The
    range is learned from the input (variables ``output_min`` / ``output_max``).
    """

    def __init__(self, layer, quantizer: Quantizer, **kwargs):
        kwargs.setdefault("name", f"quant_{layer.name}")
        super().__init__(layer, **kwargs)
        if isinstance(quantizer, dict):
            quantizer = keras.saving.deserialize_keras_object(quantizer)
        if not isinstance(quantizer, Quantizer):
            raise ValueError(f"QuantizeSameScale('{layer.name}'): quantizer must be a keras_qat Quantizer, got {quantizer!r}.")
        self.quantizer = quantizer

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.quantizer_vars = self.quantizer.build(input_shape, "output", self)
        self.built = True

    #: When the input already has a grid (from the layer that produced it), that grid is used,
    #: read only: the deployed kernel requires one scale for its input and output.
    inherits_input_grid = True

    def _source(self) -> emulation.Source:
        inherited = linking.inherited_source(self)
        return inherited if inherited is not None else emulation.Source(self.quantizer, self.quantizer_vars)

    def quantizes_inputs_as(self) -> emulation.OutputTarget:
        """The layer before requantizes onto this grid (see keras_qat.emulation)."""
        return emulation.OutputTarget(self._source(), "linear")

    def call(self, inputs, training=None):
        training = bool(training)
        source = self._source()
        learns = training and source.variables is self.quantizer_vars
        quantized = source.quantizer(inputs, learns, source.variables)
        if not training and not qops.plain_fake_quant() and is_kind(self.layer, "average_pool"):
            return emulation.average_pool_inference(self.layer, quantized, source)
        outputs = self.layer(quantized)
        # The range was just updated from the input (training) or is the stored one: read it.
        return source.quantizer(outputs, False, source.variables)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def quantized_weights(self) -> list:
        return []

    def output_quantizers(self) -> list[tuple[Quantizer, dict]]:
        return [(self.quantizer, self.quantizer_vars)]

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, config.pop("quantizer"), **config)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantizeLayer(keras.layers.Layer):
    """Fake-quantizes a model input (tfmot's ``QuantizeLayer``).

    Args:
        quantizer: default an 8-bit asymmetric moving-average quantizer, as deployed int8
            models quantize their inputs.
    """

    def __init__(self, quantizer: Quantizer | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(quantizer, dict):
            quantizer = keras.saving.deserialize_keras_object(quantizer)
        quantizer = quantizer if quantizer is not None else MovingAverageQuantizer(num_bits=8)
        if not isinstance(quantizer, Quantizer):
            raise ValueError(f"QuantizeLayer: quantizer must be a keras_qat Quantizer, got {quantizer!r}.")
        self.quantizer = quantizer

    def build(self, input_shape):
        self.quantizer_vars = self.quantizer.build(input_shape, "input", self)
        self.built = True

    def call(self, inputs, training=None):
        training = bool(training)
        # A QUANTIZE op in the deployed model only where the input is the model's.
        if emulation.enabled(training) and linking.quantizes_model_input(self):
            return emulation.quantize_inference(inputs, emulation.Source(self.quantizer, self.quantizer_vars))
        return self.quantizer(inputs, training, self.quantizer_vars)

    def output_quantizers(self) -> list[tuple[Quantizer, dict]]:
        return [(self.quantizer, self.quantizer_vars)]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config


__all__ = [
    "QuantizeAnnotate",
    "QuantizeWrapper",
    "QuantizeLayer",
    "QuantizeSameScale",
    "QuantizeAwareActivation",
    "LayerQuantizeConfig",
]
