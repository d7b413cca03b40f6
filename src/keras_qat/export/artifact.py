"""``save_artifact``: a QAT model as integer ops in one ``.kqat`` file, for the integer runtime.

The manifest's layout and op list are in :mod:`keras_qat.format.manifest`; the file's in
:mod:`keras_qat.format.container`. What each op computes is the integer arithmetic of
:mod:`keras_qat.emulation` (TFLite's reference kernels), which the QAT model's inference
reproduces: the runtime's outputs are the QAT model's, element for element, wherever
accumulators fit in int32 (up to 8-bit operands). Beyond that (16-bit) the QAT model keeps fake
quantization, which rounds once, and the two can differ by a step per layer. Tables stand in
for elementwise activations (``lookup``: the QAT layer evaluated once on every input code) and
for the exponentials of a softmax, so that the runtime computes nothing in float. Every grid is
the one of :mod:`keras_qat.grid`, computed once per tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_qat import emulation, integer, linking
from keras_qat import ops as qops
from keras_qat.format import container, packing
from keras_qat.format.manifest import OPS, SOFTMAX_BITS
from keras_qat.registry import activation_name, is_kind, is_last_axis_softmax, kind_of
from keras_qat.errors import NotDeployableError
from keras_qat.export.validate import non_finite_variables, require_finite
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeLayer, QuantizeSameScale, QuantizeWrapper

L = keras.layers

class _Writer:
    """Collects tensors' grids, ops and the payload while the graph is walked."""

    def __init__(self):
        self.tensors: dict[str, dict] = {}
        self.ids: dict[int, str] = {}
        self.ops: list[dict] = []
        self.payload = bytearray()

    def tensor(self, keras_tensor, source: emulation.Source | None, owner: str) -> str:
        key = id(keras_tensor)
        if key in self.ids:
            return self.ids[key]
        if source is None:
            raise _Refusal(
                f"the output of layer '{owner}' is not quantized, so the integer runtime cannot hold "
                "it; quantize the layer (quantize_annotate_layer) or keep the float part of the model "
                "outside the exported one."
            )
        entry = grid_entry(source)
        if entry["scale"] == 0.0:
            raise _Refusal(
                f"the output range of layer '{owner}' is empty (min == max), so its tensor has no "
                "integer grid; train or calibrate the model on data before exporting."
            )
        name = f"t{len(self.ids)}"
        self.ids[key] = name
        self.tensors[name] = {"shape": _shape(keras_tensor), **entry}
        return name

    def blob(self, data: bytes) -> dict:
        entry = {"offset": len(self.payload), "nbytes": len(data)}
        self.payload.extend(data)
        return entry

    def packed(self, values: np.ndarray, bits: int) -> dict:
        values = np.asarray(values, dtype=np.int64)
        return {**self.blob(packing.pack(values, bits)), "shape": list(values.shape), "bits": bits, "encoding": "packed"}

    def integers(self, values: np.ndarray) -> dict:
        """Little-endian int32, or int64 where a value needs it (a bias at 16-bit scales)."""
        values = np.asarray(values, dtype=np.int64)
        wide = bool(values.size) and (values.min() < -(2**31) or values.max() >= 2**31)
        encoding, dtype, bits = ("int64", "<i8", 64) if wide else ("int32", "<i4", 32)
        data = values.astype(dtype).tobytes()
        return {**self.blob(data), "shape": list(values.shape), "bits": bits, "encoding": encoding}


def _shape(tensor) -> list:
    """A tensor's shape for the manifest: the batch and any unknown dimension as None."""
    return [None] + [None if d is None else int(d) for d in tensor.shape[1:]]


def _signed_grid(source: emulation.Source):
    """A tensor's exported grid in the artifact's (signed) convention."""
    return emulation.exported_grid(source).as_signed()


def grid_entry(source: emulation.Source) -> dict:
    """A tensor's grid as the manifest stores it (signed convention)."""
    return emulation.exported_grid(source).to_manifest()


def save_artifact(model: keras.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` (a QAT model from ``quantize_apply``) as one ``.kqat`` file.

    The file holds the integer ops of the model in topological order and its weights packed
    at their bit widths; :func:`keras_qat.runtime.load` runs it. Written atomically.

    Raises:
        keras_qat.errors.NotDeployableError: listing, in one message, every layer whose
            computation has no integer op, whose output is not quantized or whose weights or
            ranges hold NaN or Inf, each named with what to do. Nothing is written then.
    """
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise ValueError(f"save_artifact: needs a functional QAT model, got {type(model).__name__}.")
    require_finite(model, TARGET)
    manifest, payload = build(model)
    return container.write_atomically(Path(path), container.encode(manifest, payload))


#: The target name in refusals (:class:`keras_qat.errors.NotDeployableError`).
TARGET = "kqat"


class _Refusal(ValueError):
    """One layer the artifact cannot hold; :func:`build` collects them all before raising."""


def _reason(layer, error: ValueError) -> str:
    text = str(error)
    return text if isinstance(error, _Refusal) else f"layer '{layer.name}': {text}"


def refusals(model: keras.Model) -> dict[str, str]:
    """``{layer name: why}`` for every layer that :func:`save_artifact` would refuse (empty
    when it would write the file). Reads the model; writes nothing."""
    reasons = non_finite_variables(model)
    try:
        build(model)
    except NotDeployableError as error:
        for name, why in error.reasons.items():
            reasons.setdefault(name, why)
    return reasons


def build(model: keras.Model) -> tuple[dict[str, Any], bytes]:
    """The manifest and payload of ``model``'s artifact.

    Raises:
        keras_qat.errors.NotDeployableError: every layer the format cannot hold, at once.
    """
    writer = _Writer()
    reasons: dict[str, str] = {}
    by_depth = model._nodes_by_depth
    nodes = [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]
    for tensor in model.inputs:
        writer.ids.setdefault(id(tensor), f"input_{len(writer.ids)}")
        writer.tensors[writer.ids[id(tensor)]] = {"shape": _shape(tensor), "float": True, "name": tensor.name}
    for node in nodes:
        operation = node.operation
        if operation is None or isinstance(operation, L.InputLayer):
            continue
        try:
            _add_op(writer, operation, list(node.input_tensors), list(node.outputs))
        except ValueError as refusal:  # a _Refusal, or a grid the format cannot hold
            reasons.setdefault(operation.name, _reason(operation, refusal))
            for tensor in node.outputs:  # stand-ins, so that the layers after it are checked too
                name = writer.ids.setdefault(id(tensor), f"refused_{len(writer.ids)}")
                writer.tensors.setdefault(name, {"shape": _shape(tensor), "refused": True})
    if reasons:
        raise NotDeployableError(TARGET, reasons)
    manifest = {
        "format_version": container.FORMAT_VERSION,
        "model": model.name,
        "tensors": writer.tensors,
        "inputs": [writer.ids[id(t)] for t in model.inputs],
        "outputs": [writer.ids[id(t)] for t in keras.tree.flatten(model.outputs)],
        "ops": writer.ops,
    }
    return manifest, bytes(writer.payload)


# ---- one layer -----------------------------------------------------------------------------


def _unsupported(layer, what: str) -> _Refusal:
    return _Refusal(
        f"layer '{layer.name}' ({what}) has no integer op in keras-qat's integer form, which the "
        f".kqat format (version {container.FORMAT_VERSION}; ops: {', '.join(OPS)}) and the ONNX export "
        "hold. Keep it outside the exported model, or export to TFLite where it is supported."
    )


def _output_source(layer) -> emulation.Source | None:
    if isinstance(layer, QuantizeFoldedBatchNorm):
        if layer.output_quantizer is not None:
            return emulation.Source(layer.output_quantizer, layer.output_vars)
        target = linking.output_target(layer)
        return None if target is None else target.source
    if isinstance(layer, QuantizeWrapper):
        target = layer.output_target()
        return None if target is None else target.source
    return None


def _activation_of(layer) -> str:
    """The clamp the integer kernel applies: the layer's own ReLU/ReLU6, or the one fused
    into it by the consumer that quantizes its output."""
    own = activation_name(getattr(layer.layer, "activation", "linear"))
    if own != "linear" or _output_source(layer) is None:
        return own
    if isinstance(layer, QuantizeFoldedBatchNorm):
        target = None if layer.output_quantizer is not None else linking.output_target(layer)
    else:
        target = layer.output_target()
    return "linear" if target is None else target.activation


def _add_op(writer: _Writer, layer, inputs: list, outputs: list) -> None:
    sources = linking.input_sources(layer)
    entry: dict[str, Any] = {"layer": layer.name, "attributes": {}, "weights": {}}

    def emit(op: str, input_tensors=None, output_source=None, **attributes):
        input_tensors = inputs if input_tensors is None else input_tensors
        entry["op"] = op
        entry["inputs"] = [writer.ids[id(t)] for t in input_tensors]
        out_source = output_source if output_source is not None else linking.source_of(outputs[0])
        entry["outputs"] = [writer.tensor(outputs[0], out_source, layer.name)]
        entry["attributes"].update(attributes)
        writer.ops.append(entry)

    if len(outputs) != 1:
        raise _unsupported(layer, f"{len(outputs)} outputs")
    for tensor in inputs:
        if id(tensor) not in writer.ids:
            raise _unsupported(layer, "an input from outside the graph")
        if writer.tensors[writer.ids[id(tensor)]].get("float") and not isinstance(layer, QuantizeLayer):
            raise _unsupported(layer, "a float model input that no QuantizeLayer quantizes")

    if isinstance(layer, QuantizeLayer):
        if not linking.is_model_input(inputs[0]):
            raise _unsupported(layer, "a quantizer on a value computed in float")
        return emit("quantize", output_source=emulation.Source(layer.quantizer, layer.quantizer_vars))

    if isinstance(layer, QuantizeSameScale):
        inner = layer.layer
        if not is_kind(inner, "average_pool"):
            raise _unsupported(layer, type(inner).__name__)
        return emit("average_pool", **_pool_attributes(inner))

    if isinstance(layer, QuantizeFoldedBatchNorm):
        kernel = layer.folded_kernel()
        bias = layer.folded_bias()
        kernel_source = layer.kernel_source()
        return _kernel_op(writer, entry, emit, layer, layer.layer, kernel, bias, sources, kernel_source)

    if not isinstance(layer, QuantizeWrapper):
        raise _unsupported(layer, type(layer).__name__)

    inner = layer.layer
    kind = layer.integer_kind()
    if kind == "kernel":
        weight, quantizer, qvars = layer.quantized_weights()[0]
        kernel = quantizer(weight, False, qvars)
        bias = inner.bias if getattr(inner, "use_bias", False) else None
        return _kernel_op(writer, entry, emit, layer, inner, kernel, bias, sources, layer.weight_sources()[0])
    if kind == "add":
        if len(inputs) != 2:
            raise _unsupported(layer, f"an ADD of {len(inputs)} inputs (the integer ADD takes two)")
        out_source, activation = _output_source(layer), _activation_of(layer)
        if out_source is not None and all(source is not None for source in sources):
            grid_a, grid_b = _signed_grid(sources[0]), _signed_grid(sources[1])
            entry["integer"] = integer.AddOp.lower(grid_a, grid_b, _signed_grid(out_source), activation).to_manifest()
        return emit("add", output_source=out_source, activation=activation)
    if kind == "mean":
        out_source, activation = _output_source(layer), _activation_of(layer)
        if out_source is not None and sources and sources[0] is not None:
            mean = integer.MeanOp.lower(_signed_grid(sources[0]), _signed_grid(out_source), activation)
            entry["integer"] = {"requantize": mean.requantize.to_manifest()}
        return emit("mean", output_source=out_source, keepdims=bool(inner.keepdims), activation=activation)
    if layer.quantized_weights():
        raise _unsupported(layer, f"{type(inner).__name__} with weights")
    kind_name = getattr(kind_of(inner), "name", None)
    if kind_name == "concatenate":
        axis = inner.axis % len(outputs[0].shape)
        return emit("concatenate", axis=axis)
    if layer.passes_grid_through:
        return _moving_op(emit, layer, inner, inputs, outputs)
    if linking.requantized_by_producer(layer):
        return emit("identity")
    if is_last_axis_softmax(inner):
        return _softmax_op(writer, entry, emit, layer, sources)
    if kind_name in ("relu", "leaky_relu", "activation"):
        return _lookup_op(writer, entry, emit, layer, sources)
    raise _unsupported(layer, type(inner).__name__)


def _moving_op(emit, layer, inner, inputs, outputs):
    if getattr(inner, "data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, f"{type(inner).__name__} with channels_first")
    op = getattr(kind_of(inner), "integer_op", None)
    if op == "max_pool":
        return emit("max_pool", **_pool_attributes(inner))
    if op == "pad":
        padding = [list(p) for p in inner.padding] if isinstance(inner.padding[0], (tuple, list)) else [list(inner.padding)]
        return emit("pad", padding=padding)
    if op == "reshape":
        return emit("reshape", shape=[int(d) for d in outputs[0].shape[1:]])
    if op == "identity":
        return emit("identity")
    raise _unsupported(layer, type(inner).__name__)


def _pool_attributes(layer) -> dict:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise _unsupported(layer, "channels_first pooling")
    return {"pool_size": list(layer.pool_size), "strides": list(layer.strides), "padding": layer.padding}


def _numpy(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _kernel_op(writer, entry, emit, layer, inner, kernel, bias, sources, kernel_source) -> None:
    if not emulation.supports_kernel(inner, kernel_source.quantizer):
        raise _unsupported(layer, f"{type(inner).__name__} with these settings (asymmetric weights, groups or channels_first)")
    if not sources or sources[0] is None:
        raise _unsupported(layer, "an input that is not quantized")
    out_source = _output_source(layer)
    if out_source is None:
        raise _unsupported(layer, "an output that is not quantized")
    kernel_grid = emulation.exported_grid(kernel_source)
    codes = kernel_grid.centered_codes(_numpy(kernel))
    scale = np.asarray(kernel_grid.scale, np.float32).reshape(-1)
    weight = writer.packed(codes, kernel_source.quantizer.num_bits)
    zero_point = np.broadcast_to(kernel_grid.as_signed().zero_point, scale.shape)
    weight.update({"scale": [float(s) for s in scale], "zero_point": [int(z) for z in zero_point]})
    entry["weights"]["kernel"] = weight
    activation = _activation_of(layer)
    lowered = integer.KernelOp.lower(
        _signed_grid(sources[0]),
        kernel_grid,
        _signed_grid(out_source),
        None if bias is None else _numpy(bias),
        activation,
        emulation.rounds_once(inner, kernel_source.quantizer),
    )
    if lowered.bias is not None:
        entry["weights"]["bias"] = writer.integers(lowered.bias)
    entry["integer"] = {"requantize": lowered.requantize.to_manifest()}
    op = kind_of(inner).integer_op
    if op == "dense":
        attributes = {"single_rounding": lowered.requantize.single_rounding}
    else:
        rank = len(inner.kernel.shape) - 2
        attributes = {
            "rank": rank,
            "strides": list(inner.strides),
            "padding": inner.padding,
            "dilation_rate": list(inner.dilation_rate),
        }
    attributes["activation"] = activation
    emit(op, output_source=out_source, **attributes)


def _lookup_op(writer, entry, emit, layer, sources) -> None:
    """An elementwise layer as a table: the QAT layer run once on every input code."""
    if not sources or sources[0] is None:
        raise _unsupported(layer, "an input that is not quantized")
    out_source = _output_source(layer)
    if out_source is None:
        raise _unsupported(layer, "an elementwise layer whose output is not quantized")
    in_grid, out_grid = _signed_grid(sources[0]), _signed_grid(out_source)
    real = in_grid.dequantize(np.arange(in_grid.qmin, in_grid.qmax + 1)).reshape(-1, 1)
    # The layer's own output quantizer rounds inside this call; a consumer's (a
    # Concatenate that quantizes this output) rounds here, with the same fake quantization.
    outputs = _numpy(out_source.quantizer(layer(real, training=False), False, out_source.variables)).reshape(-1)
    table = np.clip(out_grid.centered_codes(outputs) + out_grid.zero_point, out_grid.qmin, out_grid.qmax)
    entry["weights"]["table"] = writer.packed(table, out_grid.bits)
    emit("lookup", output_source=out_source)


def _softmax_op(writer, entry, emit, layer, sources) -> None:
    """A softmax over the last axis: ``exp(-scale * d)`` tabulated in fixed point for every
    distance ``d`` from the row's largest code; the runtime normalizes in integers."""
    if not sources or sources[0] is None:
        raise _unsupported(layer, "an input that is not quantized")
    quantizers = layer.output_quantizers()
    if len(quantizers) != 1:
        raise _unsupported(layer, "a softmax without an output quantizer")
    out = grid_entry(emulation.Source(*quantizers[0]))
    if out["bits"] >= 8 and integer.softmax_levels(out["scale"]) is None:
        raise _unsupported(layer, f"a softmax whose output scale {out['scale']} is not 1/integer")
    inp = grid_entry(sources[0])
    size = inp["qmax"] - inp["qmin"] + 1
    # With the backend's exponential, as the QAT model's inference computes the table (NumPy's
    # where the backend lacks float64, and inference is fake quantization anyway).
    xp = keras.ops if qops.exact_integer_arithmetic() else np
    table = _numpy(integer.softmax_exp_table(np.float32(inp["scale"]), SOFTMAX_BITS, size, xp)).astype(np.int64)
    entry["weights"]["exp_table"] = writer.integers(table)
    emit("softmax", output_source=emulation.Source(*quantizers[0]))


__all__ = ["save_artifact", "build", "refusals", "grid_entry", "TARGET"]
