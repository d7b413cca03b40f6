"""Find the BatchNorm folds, activation fusions and shared concat ranges of a functional model.

The plan is read off the annotated model; ``quantize_apply`` carries it out while it rebuilds
the graph. Only layers that the scheme quantizes by its own registry take part: a layer with
a user's QuantizeConfig, or one kept in float, is left exactly as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras

from keras_qat.config import LayerQuantizeConfig
from keras_qat.layers import QuantizeAnnotate
from keras_qat.quantizers import FixedQuantizer, _RangeQuantizer
from keras_qat.registry import ARITHMETIC_OPERATIONS, activation_name, is_fusable_relu, kind_of

L = keras.layers

@dataclass
class FusionPlan:
    """What ``quantize_apply`` changes; layers are keyed by ``id`` of the annotated layer.

    Attributes:
        folds: conv/dense annotation -> the BatchNormalization annotation folded into it.
        folded: the BatchNormalization annotations that disappear into their producer.
        unquantized_outputs: annotations whose output quantization moves to their consumer
            (a fused ReLU, or a Concatenate that quantizes all of its inputs with one range).
            For a fold, the BatchNormalization's annotation stands for the fused layer.
        quantized_operations: plain keras.ops arithmetic in the graph (``x + 3.0`` in
            MobileNetV3's hard-swish) that computes on quantized tensors: its output gets a
            quantizer, as the deployed integer ADD or MUL has an output scale.
        same_scale: average pooling annotations that quantize their input and output on
            one range (TFLite's int8 AVERAGE_POOL_2D keeps its input's scale); the layer
            before them leaves its output to them.
        governed_by: a fused ReLU's annotation -> the layer whose output it quantizes (for a
            fold, the Conv/Dense): the ReLU takes that layer's per-layer settings (its
            activation bits) where it has none of its own.
        reasons: annotation name -> a sentence saying what was done to it and why.
    """

    folds: dict[int, Any] = field(default_factory=dict)
    folded: set[int] = field(default_factory=set)
    unquantized_outputs: set[int] = field(default_factory=set)
    quantized_operations: set[int] = field(default_factory=set)
    same_scale: set[int] = field(default_factory=set)
    governed_by: dict[int, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def output_quantized(self, annotation) -> bool:
        """Whether the layer (or the fold that ``annotation`` ends) quantizes its output."""
        return id(annotation) not in self.unquantized_outputs

    def config_for(self, annotation, scheme):
        """The scheme's config for ``annotation``'s layer; a fused ReLU's follows the settings
        of the layer whose output it quantizes (see :attr:`governed_by`)."""
        governor = self.governed_by.get(id(annotation))
        if governor is None:
            return scheme.config_for(annotation.layer)
        return scheme.governed_config(annotation.layer, governor)


class _Graph:
    """Producers and consumers of each tensor among one functional model's nodes."""

    def __init__(self, model):
        by_depth = model._nodes_by_depth
        self.nodes = [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]
        self.nodes = [n for n in self.nodes if n.operation is not None and not n.is_input]
        self.consumers: dict[int, list] = {}
        self.producer: dict[int, Any] = {}
        self.calls: dict[int, int] = {}
        for node in self.nodes:
            self.calls[id(node.operation)] = self.calls.get(id(node.operation), 0) + 1
            for tensor in node.input_tensors:
                self.consumers.setdefault(id(tensor), []).append(node)
            for tensor in node.outputs:
                self.producer[id(tensor)] = node
        self.model_outputs = {id(t) for t in keras.tree.flatten(model.outputs)}

    def sole_consumer(self, node):
        """The one node that reads ``node``'s single output, unless the output is also a model
        output or the layer is called more than once."""
        if len(node.outputs) != 1 or self.calls[id(node.operation)] != 1:
            return None
        tensor = node.outputs[0]
        consumers = self.consumers.get(id(tensor), [])
        if id(tensor) in self.model_outputs or len(consumers) != 1:
            return None
        return consumers[0]


def _scheme_layer(operation, scheme):
    """The inner layer of an annotation the scheme quantizes by its registry, else None."""
    if not isinstance(operation, QuantizeAnnotate) or operation.quantize_config is not None:
        return None
    layer = operation.layer
    if scheme.keeps_float(layer) or not isinstance(scheme.config_for(layer), LayerQuantizeConfig):
        return None
    return layer


def _role(layer) -> str | None:
    kind = None if layer is None else kind_of(layer)
    return None if kind is None else kind.role


def _kind_name(layer) -> str | None:
    kind = kind_of(layer)
    return None if kind is None else kind.name


def _is_linear(layer) -> bool:
    return activation_name(getattr(layer, "activation", "linear")) == "linear"


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _bn_on_last_axis(bn, rank: int) -> bool:
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    return axis is not None and axis % rank == rank - 1


def plan_fusions(model, scheme) -> FusionPlan:
    """Read the folds and fusions of one functional ``model`` (not of its nested models)."""
    plan = FusionPlan()
    graph = _Graph(model)
    fold_bn = getattr(scheme, "fold_batch_norm", True)
    fuse = getattr(scheme, "fuse_activations", True)
    folded_into: dict[int, Any] = {}  # a folded BatchNormalization's annotation -> its Conv/Dense

    for node in graph.nodes:
        layer = _scheme_layer(node.operation, scheme)
        kind = kind_of(layer)
        if not fold_bn or kind is None or not kind.foldable:
            continue
        consumer = graph.sole_consumer(node)
        if consumer is None:
            continue
        bn = _scheme_layer(consumer.operation, scheme)
        rank = len(node.outputs[0].shape)
        if (
            kind_of(bn) is not None
            and kind_of(bn).name == "batch_norm"
            and _is_linear(layer)
            and _channels_last(layer)
            and _bn_on_last_axis(bn, rank)
            and graph.calls[id(consumer.operation)] == 1
        ):
            plan.folds[id(node.operation)] = consumer.operation
            plan.folded.add(id(consumer.operation))
            folded_into[id(consumer.operation)] = layer  # the fold's output is the BN node's
            plan.reasons[node.operation.name] = f"BatchNormalization '{bn.name}' folded into its weights"

    _plan_plain_operations(graph, plan, scheme, fuse)
    if not fuse:
        return plan
    for node in graph.nodes:
        if _role(_scheme_layer(node.operation, scheme)) == "same_scale":
            plan.same_scale.add(id(node.operation))
            plan.reasons[node.operation.name] = "input and output share one range (same-scale integer kernel)"
    for node in graph.nodes:
        operation = node.operation
        layer = _scheme_layer(operation, scheme)
        if layer is None or id(operation) in plan.folds:
            continue  # a fold's output is its BN node's output
        consumer = graph.sole_consumer(node)
        if consumer is None:
            continue
        target = _scheme_layer(consumer.operation, scheme)
        if target is None:
            continue
        kind = kind_of(layer)
        produces = kind is not None and kind.fusable and (kind.role != "kernel" or _is_linear(layer))
        if produces and is_fusable_relu(target):
            plan.unquantized_outputs.add(id(operation))
            plan.governed_by[id(consumer.operation)] = folded_into.get(id(operation), layer)
            plan.reasons[operation.name] = f"output quantized after '{target.name}' (activation fused)"
        elif (_kind_name(target) == "concatenate" or _role(target) == "same_scale") and _observed_output_range(
            layer, scheme
        ):
            plan.unquantized_outputs.add(id(operation))
            plan.reasons[operation.name] = f"output quantized by '{target.name}', which shares one range"
    return plan


def _observed_output_range(layer, scheme) -> bool:
    """Whether the scheme quantizes ``layer``'s output on a range observed from data (not a
    fixed one, like a sigmoid's, which the deployed kernel fixes)."""
    config = scheme.config_for(layer)
    quantizer = config.output_quantizer
    if quantizer is None and config.activation_attrs:
        quantizer = config.activation_quantizer
    return isinstance(quantizer, _RangeQuantizer) and not isinstance(quantizer, FixedQuantizer)


def is_plain_arithmetic(operation) -> bool:
    """A keras.ops elementwise arithmetic operation used directly in a functional graph."""
    return not isinstance(operation, keras.layers.Layer) and type(operation).__name__ in ARITHMETIC_OPERATIONS


def _plan_plain_operations(graph, plan, scheme, fuse: bool) -> None:
    """Quantize the outputs of plain arithmetic on quantized tensors (nodes in graph order)."""
    if not hasattr(scheme, "activation_bits"):
        return
    quantized_tensors: set[int] = set()
    for node in graph.nodes:
        operation = node.operation
        kept_float = (
            isinstance(operation, QuantizeAnnotate)
            and operation.quantize_config is None
            and scheme.keeps_float(operation.layer)
        )
        quantized = (isinstance(operation, QuantizeAnnotate) and not kept_float) or id(
            operation
        ) in plan.quantized_operations
        if is_plain_arithmetic(operation) and any(id(t) in quantized_tensors for t in node.input_tensors):
            consumer = graph.sole_consumer(node)
            target = None if consumer is None else _scheme_layer(consumer.operation, scheme)
            if not (fuse and target is not None and is_fusable_relu(target)):
                plan.quantized_operations.add(id(operation))
                plan.reasons[operation.name] = "plain arithmetic on quantized tensors: output quantized"
            quantized = True
        if quantized:
            quantized_tensors.update(id(t) for t in node.outputs)
