"""Which grid each tensor of a QAT model lies on: links read from the functional graph.

A quantized layer's integer kernel (:mod:`keras_qat.emulation`) needs its input's grid, which
belongs to the layer that produced the input (its output quantizer), possibly through layers
that only move values (max pooling, reshape, padding); and its output's grid, which is its own
output quantizer or, where a fused ReLU or a Concatenate quantizes the output
(:mod:`keras_qat.transforms`), that consumer's.

These links are a function of the graph Keras records (each layer's inbound and outbound
nodes), so they are computed from it when asked, never stored on a layer: the graph is the one
source of truth whether the model was just built by ``quantize_apply``, cloned, or loaded.
:func:`link_model` is the explicit pass over a whole model, for exporters and for checks; the
layers call :func:`links_of` for themselves. A layer used in several places in a graph is
linked through its latest call, as the model it was last called into is the one that runs it.
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import keras

from keras_qat.emulation import OutputTarget, Source


class Links(NamedTuple):
    """What the graph tells one layer.

    Attributes:
        input_sources: the grid of each input (flattened), None where an input has none.
        inherited: for a same-scale layer (Concatenate, average pooling) one of whose inputs
            already has a grid: that grid, which the layer and its other inputs share, as the
            deployed kernel requires (otherwise the converter requantizes that input).
        output_consumer: the consumer that quantizes this layer's output for it (a fused
            ReLU, a Concatenate), or None.
    """

    input_sources: tuple[Source | None, ...]
    inherited: Source | None
    output_consumer: object | None


_UNLINKED = Links((), None, None)


def _history(tensor):
    return getattr(tensor, "_keras_history", None)


def _latest_inputs(layer) -> list:
    nodes = getattr(layer, "_inbound_nodes", None)
    if not nodes:
        return []
    return list(nodes[-1].input_tensors)


class _Memo(threading.local):
    """The sources already found in the current top-level query. Links recurse through the
    graph (a Concatenate's grid depends on its inputs', a producer's on its consumer's); the
    memo keeps each query linear in the graph's size and ends any cycle."""

    table: dict | None = None


_memo = _Memo()


def _query(function):
    """Run ``function`` with a memo shared by every nested lookup, and none left afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if _memo.table is not None:
            return function(*args, **kwargs)
        _memo.table = {}
        try:
            return function(*args, **kwargs)
        finally:
            _memo.table = None

    return wrapper


def output_sources(operation) -> list[Source]:
    """The quantizers of ``operation``'s own outputs, one per output, or [] if it has none."""
    activations = getattr(operation, "activation_quantizers", None)
    if activations is not None and activations():
        activation = activations()[0]
        return [Source(activation.quantizer, activation.quantizer_vars)]
    outputs = getattr(operation, "output_quantizers", None)
    if outputs is None:
        return []
    return [Source(quantizer, variables) for quantizer, variables in outputs()]


@_query
def source_of(tensor, exclude=None) -> Source | None:
    """The quantizer whose grid ``tensor`` (a symbolic tensor of the graph) lies on, or None.

    ``exclude``: a consumer whose own grid is not to be used (a Concatenate asking which grid
    its inputs already have, before it quantizes them itself).
    """
    key = (id(tensor), id(exclude))
    if key in _memo.table:
        return _memo.table[key]
    _memo.table[key] = None  # a cycle, if any, ends here
    _memo.table[key] = found = _find_source(tensor, exclude)
    return found


def _find_source(tensor, exclude) -> Source | None:
    history = _history(tensor)
    while history is not None:
        operation = history.operation
        inherited = inherited_source(operation)
        if inherited is not None:
            return inherited
        own = output_sources(operation)
        if own:
            return own[history.tensor_index] if history.tensor_index < len(own) else None
        consumer = output_consumer(operation)
        if consumer is not None and consumer is not exclude:
            target = consumer.quantizes_inputs_as()
            if target is not None:
                return target.source
        if not getattr(operation, "passes_grid_through", False):
            return None
        inputs = operation._inbound_nodes[history.node_index].input_tensors
        if len(inputs) != 1:
            return None
        history = _history(inputs[0])
    return None


@_query
def input_sources(layer, exclude=None) -> list[Source | None]:
    """The grids of ``layer``'s inputs in its latest call, in flattened order."""
    return [source_of(tensor, exclude) for tensor in _latest_inputs(layer)]


@_query
def inherited_source(layer) -> Source | None:
    """See :attr:`Links.inherited`."""
    if not getattr(layer, "inherits_input_grid", False):
        return None
    known = {}
    for source in input_sources(layer, exclude=layer):
        if source is not None:
            known.setdefault(id(source.variables["min_var"]), source)
    return next(iter(known.values())) if len(known) == 1 else None


def output_consumer(layer):
    """See :attr:`Links.output_consumer`: the latest consumer that quantizes its inputs, if
    ``layer`` lets a consumer quantize its output."""
    if not getattr(layer, "accepts_output_target", lambda: False)():
        return None
    consumer = None
    for node in getattr(layer, "_outbound_nodes", []):
        if hasattr(node.operation, "quantizes_inputs_as"):
            consumer = node.operation
    return consumer


@_query
def output_target(layer) -> OutputTarget | None:
    """The grid and clamp of the consumer that quantizes ``layer``'s output, if one does."""
    consumer = output_consumer(layer)
    return None if consumer is None else consumer.quantizes_inputs_as()


def requantized_by_producer(layer) -> bool:
    """Whether the layer that produced ``layer``'s input (in its latest call) already
    requantized it onto ``layer``'s grid and clamped it (a fused ReLU: see
    :func:`output_consumer`): the deployed model then runs no op for ``layer``, and inference
    passes the input through."""
    inputs = _latest_inputs(layer)
    history = _history(inputs[0]) if len(inputs) == 1 else None
    return history is not None and output_consumer(history.operation) is layer


@_query
def links_of(layer) -> Links:
    """Everything the graph tells ``layer`` (see :class:`Links`)."""
    if not getattr(layer, "_inbound_nodes", None):
        return _UNLINKED
    return Links(tuple(input_sources(layer)), inherited_source(layer), output_consumer(layer))


@_query
def link_model(model: keras.Model) -> dict[str, Links]:
    """The links of every layer of ``model`` (a functional QAT model), by layer name: the pass
    over the graph that exporters and checks read."""
    return {layer.name: links_of(layer) for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}


def is_model_input(tensor) -> bool:
    """Whether the symbolic ``tensor`` is a functional model's input."""
    history = _history(tensor)
    return history is not None and isinstance(history.operation, keras.layers.InputLayer)


def quantizes_model_input(layer) -> bool:
    """Whether ``layer`` (a QuantizeLayer) was last called on a model input: there the deployed
    model has a QUANTIZE op."""
    inputs = _latest_inputs(layer)
    return len(inputs) == 1 and is_model_input(inputs[0])


__all__ = [
    "Links",
    "links_of",
    "link_model",
    "source_of",
    "output_sources",
    "input_sources",
    "inherited_source",
    "output_consumer",
    "output_target",
    "is_model_input",
    "quantizes_model_input",
]
