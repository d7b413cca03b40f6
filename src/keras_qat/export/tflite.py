"""TFLite (LiteRT) int8 export of a QAT model, and its agreement with the QAT model.

:func:`to_tflite` traces the QAT model in inference mode, where every quantizer runs TF's
``FakeQuantWithMinMaxVars(PerChannel)`` op, and lets the TFLite converter turn those ops into
int8 tensors with the trained scales and zero points. A converted model can still differ from
what training simulated in two ways, which the returned :class:`TFLiteCheck` lists, each op
named with the Keras layer it comes from:

* ops left computing in float (a range the converter needed was not simulated, so it kept the
  op in float between a DEQUANTIZE and a QUANTIZE);
* requantizations: a QUANTIZE whose input is already an integer tensor (the kernel needs
  another scale than the QAT model produced, e.g. a concatenation whose inputs must share its
  output's scale), or a DEQUANTIZE that feeds a QUANTIZE. Each rounds a second time, where
  the QAT model rounded once.

:func:`compare` measures the result: it runs the flatbuffer in the LiteRT interpreter and the
QAT model on the same data, and counts the differences in output quantization steps.

Both use ``ai_edge_litert.interpreter.Interpreter``; ``tf.lite.Interpreter`` is deprecated.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import keras
import numpy as np

from keras_qat.format.atomic import write_atomically
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeLayer, QuantizeSameScale, QuantizeWrapper

#: The widest integers an int8 TFLite model holds, for weights and activations alike.
TFLITE_MAX_BITS = 8

_QUANTIZE = "QUANTIZE"
_DEQUANTIZE = "DEQUANTIZE"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TFLiteOp:
    """One op of a TFLite model that a check reports.

    Attributes:
        op: the TFLite op type (``"CONV_2D"``, ``"QUANTIZE"``, ...).
        index: the op's position in the model's (first) subgraph.
        tensor: the name of the tensor it produces (the converter names tensors after the TF
            ops fused into them, so the name says where it came from).
        layer: the Keras layer of the QAT model that the tensor comes from, or None if its
            name matches no layer.
        detail: what is wrong with it, in words.
    """

    op: str
    index: int
    tensor: str
    layer: str | None
    detail: str

    def __str__(self) -> str:
        layer = f"layer '{self.layer}'" if self.layer else "no matching layer"
        return f"{self.op} #{self.index} ({layer}), tensor '{self.tensor}': {self.detail}"


@dataclass
class TFLiteCheck:
    """What :func:`to_tflite` wrote, and what in it differs from the QAT model's arithmetic.

    Attributes:
        path: where the flatbuffer was written.
        float_ops: ops that compute in float, apart from the QUANTIZE of a graph input and
            the DEQUANTIZE of a graph output.
        redundant_quantize_pairs: QUANTIZE ops that requantize an integer tensor, and
            DEQUANTIZE ops whose output is quantized again.
    """

    path: Path
    float_ops: list[TFLiteOp] = field(default_factory=list)
    redundant_quantize_pairs: list[TFLiteOp] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the model is integer-only and quantizes each tensor once."""
        return not self.float_ops and not self.redundant_quantize_pairs

    def __str__(self) -> str:
        verdict = "integer-only, each tensor quantized once" if self.ok else "issues found"
        lines = [f"TFLite model {self.path}: {verdict}"]
        for title, entries in (
            ("ops computing in float", self.float_ops),
            ("redundant (re)quantizations", self.redundant_quantize_pairs),
        ):
            lines.append(f"  {title}: {len(entries)}")
            lines.extend(f"    - {entry}" for entry in entries)
        return "\n".join(lines)


@dataclass(frozen=True)
class OutputAgreement:
    """Agreement of one model output, in output quantization steps.

    Attributes:
        name: the Keras output name.
        scale: the output's quantization step in the TFLite model.
        identical_fraction: fraction of elements that are equal (0 steps apart).
        max_step_difference: the largest difference, in steps.
        argmax_agreement: fraction of rows (all axes but the last) whose argmax over the last
            axis is the same.
    """

    name: str
    scale: float
    identical_fraction: float
    max_step_difference: int
    argmax_agreement: float

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.identical_fraction:.4%} identical, max {self.max_step_difference} "
            f"step(s) apart (step {self.scale:.6g}), argmax agreement {self.argmax_agreement:.4%}"
        )


@dataclass(frozen=True)
class AgreementReport:
    """How closely a TFLite model reproduces the QAT model, over all outputs together.

    Attributes:
        identical_fraction: fraction of all output elements 0 steps apart.
        max_step_difference: the largest difference of any element, in its output's steps.
        argmax_agreement: fraction of all rows, of all outputs, whose argmax agrees.
        per_output: the same, output by output, in the model's output order.
        samples: the batch size compared.
    """

    identical_fraction: float
    max_step_difference: int
    argmax_agreement: float
    per_output: list[OutputAgreement]
    samples: int

    def __str__(self) -> str:
        lines = [
            f"TFLite vs QAT model on {self.samples} samples: {self.identical_fraction:.4%} of "
            f"outputs identical, max {self.max_step_difference} step(s) apart, argmax agreement "
            f"{self.argmax_agreement:.4%}"
        ]
        if len(self.per_output) > 1:
            lines.extend(f"  {output}" for output in self.per_output)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# to_tflite
# --------------------------------------------------------------------------------------


def to_tflite(model: keras.Model, path: str | os.PathLike, int8_io: bool = False) -> TFLiteCheck:
    """Convert the QAT ``model`` to an int8 TFLite flatbuffer at ``path``, and check it.

    The model is traced in inference mode (``model(inputs, training=False)``) with a dynamic
    batch dimension; the converter folds its fake-quant ops into int8 quantization. The file
    is written atomically: a failed conversion leaves nothing at ``path``.

    Args:
        model: a model from ``keras_qat.quantize_model`` / ``quantize_apply`` (TensorFlow
            backend), with every quantizer at 8 bits or fewer.
        path: the ``.tflite`` file to write; its directory must exist.
        int8_io: make the model's inputs and outputs int8 tensors (quantized with the first
            and last quantizers' scales) instead of float ones.

    Returns:
        A :class:`TFLiteCheck` listing ops left in float and redundant requantizations.

    Raises:
        ValueError: on another backend than TensorFlow, or if a quantizer has more than 8 bits.
    """
    _require_tensorflow("to_tflite")
    if not isinstance(model, keras.Model):
        raise ValueError(f"to_tflite: expected a keras.Model, got {type(model).__name__}.")
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"to_tflite: model '{model.name}' has no symbolic inputs to trace; export the "
            "functional model that keras_qat.quantize_model returns (or build yours with keras.Input)."
        )
    _check_bit_widths(model)
    content = _convert(model, int8_io)
    float_ops, redundant = analyse_flatbuffer(content, layer_names(model))
    path = Path(path)
    write_atomically(path, content)
    return TFLiteCheck(path=path, float_ops=float_ops, redundant_quantize_pairs=redundant)


def _require_tensorflow(caller: str) -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"{caller}: TFLite conversion traces the model with TensorFlow, but the Keras backend "
            f"is '{backend}' (keras.backend.backend()). Set KERAS_BACKEND=tensorflow before "
            "importing keras, load the saved QAT model (model.save / keras.models.load_model) "
            "and export it there; or use keras_qat.export.save_artifact, which works on any backend."
        )


# ---- bit widths --------------------------------------------------------------------------


def iter_layers(model) -> Iterator[Any]:
    """Every layer of ``model``, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def layer_quantizers(layer) -> list[tuple[str, Any]]:
    """``(what it quantizes, quantizer)`` for every quantizer of a keras-qat layer."""
    found: list[tuple[str, Any]] = []
    if isinstance(layer, QuantizeWrapper):
        found += [(f"weight '{weight.name}'", quantizer) for weight, quantizer, _ in layer.quantized_weights()]
        found += [("activation", activation.quantizer) for activation in layer.activation_quantizers()]
        found += [("output", quantizer) for quantizer, _ in layer.output_quantizers()]
    elif isinstance(layer, QuantizeFoldedBatchNorm):
        found.append(("folded kernel", layer.weight_quantizer))
        if layer.output_quantizer is not None:
            found.append(("output", layer.output_quantizer))
    elif isinstance(layer, (QuantizeLayer, QuantizeSameScale)):
        found.append(("input", layer.quantizer))
    return found


def _check_bit_widths(model) -> None:
    """Raise if a quantizer is wider than TFLite's int8, naming every such layer."""
    too_wide = [
        f"'{layer.name}' ({what}: {quantizer.num_bits} bits)"
        for layer in iter_layers(model)
        for what, quantizer in layer_quantizers(layer)
        if getattr(quantizer, "num_bits", TFLITE_MAX_BITS) > TFLITE_MAX_BITS
    ]
    if too_wide:
        raise ValueError(
            f"to_tflite: TFLite int8 models hold at most {TFLITE_MAX_BITS}-bit weights and "
            f"activations, but these layers quantize wider: {', '.join(too_wide)}. Export wider "
            "bit widths with the integer artifact (keras_qat.export.save_artifact) or as an ONNX "
            "QDQ model, or quantize those layers at 8 bits (e.g. NBitScheme overrides)."
        )


# ---- conversion --------------------------------------------------------------------------


def _inference_function(model, batch: int | None):
    """A concrete ``tf.function`` of ``model(inputs, training=False)``, outputs flattened in
    the model's output order."""
    import tensorflow as tf

    specs = [
        tf.TensorSpec((batch,) + tuple(tensor.shape[1:]), tensor.dtype, name=_input_name(tensor, i))
        for i, tensor in enumerate(model.inputs)
    ]

    def inference(*inputs):
        outputs = model(_structured(model, list(inputs)), training=False)
        return tuple(keras.tree.flatten(outputs))

    return tf.function(inference, input_signature=specs, autograph=False).get_concrete_function()


def _structured(model, flat: list):
    """``flat`` (in ``model.inputs`` order) in the structure the model was built with: one
    tensor, a list or a dict."""
    structure = getattr(model, "input", None)
    if structure is None:
        return flat if len(flat) > 1 else flat[0]
    return keras.tree.pack_sequence_as(structure, flat)


def _input_name(tensor, index: int) -> str:
    name = getattr(tensor, "name", None) or f"input_{index}"
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


def _convert(model, int8_io: bool) -> bytes:
    """The flatbuffer: dynamic batch if the converter takes it, else batch 1. Traced in
    :func:`keras_qat.ops.exporting` mode, so layers emit the fake-quant patterns the
    converter folds."""
    from keras_qat import ops as qops

    with qops.exporting():
        try:
            return _convert_with_batch(model, int8_io, batch=None)
        except Exception as dynamic_error:  # the converter raises several types
            try:
                return _convert_with_batch(model, int8_io, batch=1)
            except Exception:
                raise dynamic_error from None


def _convert_with_batch(model, int8_io: bool, batch: int | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([_inference_function(model, batch)], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # Freeze every variable into a constant. Lowered to a SavedModel, the converter keeps
    # the range variables of a model without trainable weights as resource variables, and
    # then cannot fold the fake-quant ops that read them.
    converter.experimental_lower_to_saved_model = False
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The input ranges come from the model's fake-quant ops, not from statistics.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


# ---- analysis of the flatbuffer ------------------------------------------------------------


def _interpreter(**kwargs):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(**kwargs)


class _Graph:
    """The first subgraph of a TFLite model: ops, tensors, producers and consumers."""

    def __init__(self, interpreter):
        self.tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
        self.ops = [
            dict(op, inputs=[int(i) for i in op["inputs"] if i >= 0], outputs=[int(i) for i in op["outputs"]])
            for op in interpreter._get_ops_details()  # -1 marks an omitted optional input
        ]
        self.producer = {t: op for op in self.ops for t in op["outputs"]}
        self.consumers: dict[int, list[dict]] = {}
        for op in self.ops:
            for t in op["inputs"]:
                self.consumers.setdefault(t, []).append(op)
        self.graph_inputs = {int(d["index"]) for d in interpreter.get_input_details()}
        self.graph_outputs = {int(d["index"]) for d in interpreter.get_output_details()}

    def is_float(self, tensor: int) -> bool:
        return np.issubdtype(self.tensors[tensor]["dtype"], np.floating)

    def name(self, tensor: int) -> str:
        return self.tensors[tensor]["name"]

    def quantization(self, tensor: int) -> str:
        """``dtype scale s, zero point z`` of a per-tensor quantized tensor."""
        details = self.tensors[tensor]
        scale, zero_point = details["quantization"]
        return f"{np.dtype(details['dtype']).name} (scale {scale:.6g}, zero point {zero_point})"

    def consumer_names(self, tensor: int) -> str:
        names = [op["op_name"] for op in self.consumers.get(tensor, [])]
        return ", ".join(names) if names else "nothing"


def layer_names(model) -> list[str]:
    """The names of every layer of ``model`` and of its nested models."""
    return [layer.name for layer in iter_layers(model)]


def layer_of_tensor(tensor_name: str, names: Iterable[str]) -> str | None:
    """The Keras layer a TFLite tensor name comes from, or None.

    The converter names a tensor after the TF ops fused into it, ``;``-separated, each a
    path of name scopes (``functional_1/quant_conv1_1/conv1_1/convolution``) in which Keras
    adds ``_<n>`` to layer names. In the first fused name that mentions a layer, the
    innermost scope that is a layer name (exactly, or with that suffix) wins, and among
    names matching one scope the longest.
    """
    names = sorted(set(names), key=len, reverse=True)
    for fused in tensor_name.split(";"):
        for scope in reversed(fused.split("/")):
            for name in names:
                if scope == name or re.fullmatch(re.escape(name) + r"_\d+", scope):
                    return name
    return None


def _op_layer(graph: _Graph, op: dict, names: list[str]) -> str | None:
    """The layer of an op: that of its output; else of its constant inputs (its weights,
    which belong to its layer), else of its other inputs. A graph output is named
    ``Identity``, after no layer."""
    constants = [t for t in op["inputs"] if t not in graph.producer and t not in graph.graph_inputs]
    others = [t for t in op["inputs"] if t not in constants]
    for tensor in op["outputs"] + constants + others:
        layer = layer_of_tensor(graph.name(tensor), names)
        if layer is not None:
            return layer
    return None


def analyse_flatbuffer(content: bytes, names: Sequence[str]) -> tuple[list[TFLiteOp], list[TFLiteOp]]:
    """``(float ops, redundant quantizations)`` of a TFLite model, attributed to ``names``."""
    graph = _Graph(_interpreter(model_content=content))
    names = list(names)

    def entry(op, detail):
        tensor = op["outputs"][0] if op["outputs"] else op["inputs"][0]
        return TFLiteOp(op["op_name"], int(op["index"]), graph.name(tensor), _op_layer(graph, op, names), detail)

    redundant, paired = _redundant_quantizations(graph, entry, names)
    float_ops = [
        entry(op, _float_detail(graph, op))
        for op in graph.ops
        if op["index"] not in paired and _computes_in_float(graph, op)
    ]
    return float_ops, redundant


def _redundant_quantizations(graph: _Graph, entry, names: list[str]) -> tuple[list[TFLiteOp], set[int]]:
    """Requantizing QUANTIZE ops and DEQUANTIZE -> QUANTIZE pairs; also the indices of the
    ops they cover, which are not reported again as float ops."""
    found: list[TFLiteOp] = []
    covered: set[int] = set()
    for op in graph.ops:
        if op["op_name"] == _QUANTIZE and not graph.is_float(op["inputs"][0]):
            source, target = op["inputs"][0], op["outputs"][0]
            found.append(entry(op, (
                f"requantizes {graph.quantization(source)} to {graph.quantization(target)}; "
                f"feeds {graph.consumer_names(target)}"
            )))
            covered.add(op["index"])
        elif op["op_name"] == _DEQUANTIZE:
            output = op["outputs"][0]
            quantizes = [c for c in graph.consumers.get(output, []) if c["op_name"] == _QUANTIZE]
            if not quantizes:
                continue
            targets = " and ".join(
                f"QUANTIZE (layer '{_op_layer(graph, q, names)}') to {graph.quantization(q['outputs'][0])}"
                for q in quantizes
            )
            found.append(entry(op, (
                f"dequantizes {graph.quantization(op['inputs'][0])} to float, then {targets} quantizes it again"
            )))
            covered.add(op["index"])
            covered.update(q["index"] for q in quantizes)
    return found, covered


def _computes_in_float(graph: _Graph, op: dict) -> bool:
    """Whether an op reads or writes a float tensor, boundary conversions apart."""
    if not any(graph.is_float(t) for t in op["inputs"] + op["outputs"]):
        return False
    if op["op_name"] == _QUANTIZE and op["inputs"][0] in graph.graph_inputs:
        return False
    if op["op_name"] == _DEQUANTIZE and op["outputs"][0] in graph.graph_outputs:
        return False
    return True


def _float_detail(graph: _Graph, op: dict) -> str:
    def dtypes(tensors):
        return ", ".join(np.dtype(graph.tensors[t]["dtype"]).name for t in tensors) or "none"

    return f"computes in float (inputs {dtypes(op['inputs'])}; outputs {dtypes(op['outputs'])})"


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------


#: The interpreter's kernels that :func:`compare` can run: the reference kernels (the
#: arithmetic of TFLite's quantization spec, which the QAT model's inference reproduces), the
#: built-in optimized kernels, or the interpreter's default (XNNPACK where it applies, as
#: deployed on CPU). They requantize differently: the reference kernels round twice
#: (gemmlowp), the optimized x86 kernels round negative halves up in their second rounding,
#: XNNPACK rounds once.
KERNELS = ("reference", "builtin", "default")


def compare(model: keras.Model, tflite_path: str | os.PathLike, x, *, kernels: str = "reference") -> AgreementReport:
    """Run the TFLite model and ``model(x, training=False)`` on ``x``; count the differences.

    Each output's difference is measured in its TFLite quantization step (the scale of the
    int8 tensor that the final DEQUANTIZE reads, or of the int8 output itself):
    ``steps = round(|tflite - qat| / scale)``.

    Args:
        model: the QAT model that was converted.
        tflite_path: the flatbuffer :func:`to_tflite` wrote.
        x: the inputs: one array, or a list (in ``model.inputs`` order) or dict (by input
            name) of arrays for several inputs. Float values; int8 model inputs are quantized
            with their own scale and zero point.
        kernels: which of the interpreter's kernels run (:data:`KERNELS`). The default,
            the reference kernels, is the arithmetic the QAT model reproduces bit for bit;
            the others round some ties differently (see :data:`KERNELS`).

    Returns:
        An :class:`AgreementReport`, overall and per output.
    """
    _resolver(kernels)  # reject an unknown choice before running anything
    inputs = _input_arrays(model, x)
    qat = _qat_outputs(model, inputs)
    tflite = _tflite_outputs(tflite_path, inputs, [name for name, _ in qat], kernels)
    if len(tflite) != len(qat):
        raise ValueError(
            f"compare: the TFLite model at {tflite_path} has {len(tflite)} outputs but model "
            f"'{model.name}' has {len(qat)}; was it converted from this model?"
        )
    per_output = []
    all_steps, all_rows = [], []
    for (name, expected), (actual, scale) in zip(qat, tflite):
        if actual.shape != expected.shape:
            raise ValueError(
                f"compare: output '{name}' has shape {expected.shape} in the QAT model but "
                f"{actual.shape} in the TFLite model; was it converted from this model?"
            )
        steps, rows = _step_differences(actual, expected, scale), _argmax_agrees(actual, expected)
        all_steps.append(steps.ravel())
        all_rows.append(rows)
        per_output.append(OutputAgreement(name, scale, *_summary(steps, rows)))
    identical, max_steps, argmax = _summary(np.concatenate(all_steps), np.concatenate(all_rows))
    return AgreementReport(identical, max_steps, argmax, per_output, samples=int(inputs[0].shape[0]))


def _input_arrays(model, x) -> list[np.ndarray]:
    """``x`` as a list of float arrays in ``model.inputs`` order."""
    names = [getattr(t, "name", f"input_{i}") for i, t in enumerate(model.inputs)]
    if isinstance(x, Mapping):
        missing = [name for name in names if name not in x]
        if missing:
            raise ValueError(f"compare: x has no value for the model inputs {missing}; its keys are {sorted(x)}.")
        arrays = [x[name] for name in names]
    elif isinstance(x, (list, tuple)):
        arrays = list(x)
    else:
        arrays = [x]
    if len(arrays) != len(names):
        raise ValueError(
            f"compare: model '{model.name}' has {len(names)} inputs {names}, but x gives "
            f"{len(arrays)}; pass a list in that order, or a dict by input name."
        )
    return [np.asarray(keras.ops.convert_to_numpy(a)) for a in arrays]


def _qat_outputs(model, inputs: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """``(name, value)`` of every output of ``model(x, training=False)``, flattened as in
    the converted function."""
    outputs = model(_structured(model, inputs), training=False)
    flat = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(outputs)]
    if isinstance(outputs, Mapping):
        names = keras.tree.flatten({key: key for key in outputs})
    else:
        names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(flat):
        names = [f"output_{i}" for i in range(len(flat))]
    return list(zip(names, flat))


def _resolver(kernels: str):
    from ai_edge_litert.interpreter import OpResolverType

    choices = {
        "default": OpResolverType.AUTO,
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "reference": OpResolverType.BUILTIN_REF,
    }
    if kernels not in choices:
        raise ValueError(f"compare: kernels must be one of {list(choices)}, got {kernels!r}.")
    return choices[kernels]


def _tflite_outputs(path, inputs: list[np.ndarray], names: list[str], kernels: str) -> list[tuple[np.ndarray, float]]:
    """Run the flatbuffer on ``inputs`` (batch resized); ``(float value, step)`` per output."""
    interpreter = _interpreter(model_path=str(path), experimental_op_resolver_type=_resolver(kernels))
    graph = _Graph(interpreter)  # before delegates replace ops, at allocation
    details = interpreter.get_input_details()
    if len(details) != len(inputs):
        raise ValueError(f"compare: the TFLite model at {path} has {len(details)} inputs, but x gives {len(inputs)}.")
    for detail, array in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], array.shape)
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], _to_input_type(array, detail))
    interpreter.invoke()
    results = []
    for index, detail in enumerate(interpreter.get_output_details()):
        name = names[index] if index < len(names) else detail["name"]
        scale, zero_point = _output_step(graph, detail, name)
        value = interpreter.get_tensor(detail["index"]).astype(np.float64)
        if not np.issubdtype(detail["dtype"], np.floating):
            value = (value - zero_point) * scale
        results.append((value, scale))
    return results


def _to_input_type(array: np.ndarray, detail: dict) -> np.ndarray:
    """``array`` in the input tensor's type: quantized (rounding half away from zero, as
    TFLite's QUANTIZE does) for an integer input, cast for a float one."""
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.floating):
        return array.astype(dtype)
    scale, zero_point = detail["quantization"]
    scaled = array.astype(np.float32) / np.float32(scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + zero_point
    info = np.iinfo(dtype)
    return np.clip(rounded, info.min, info.max).astype(dtype)


def _output_step(graph: _Graph, detail: dict, name: str) -> tuple[float, int]:
    """``(scale, zero point)`` of an output: its own if integer, else of the integer tensor
    that the DEQUANTIZE producing it reads."""
    tensor = int(detail["index"])
    if not graph.is_float(tensor):
        source = tensor
    else:
        producer = graph.producer.get(tensor)
        if producer is None or producer["op_name"] != _DEQUANTIZE:
            op = producer["op_name"] if producer is not None else "no op"
            raise ValueError(
                f"compare: output '{name}' of the TFLite model is computed in float by {op}, "
                "so it has no quantization step to measure differences in; quantize that "
                "output in the QAT model (see TFLiteCheck.float_ops from to_tflite)."
            )
        source = producer["inputs"][0]
    scale, zero_point = graph.tensors[source]["quantization"]
    if not scale:
        raise ValueError(f"compare: output '{name}' of the TFLite model has no quantization scale.")
    return float(scale), int(zero_point)


def _step_differences(actual: np.ndarray, expected: np.ndarray, scale: float) -> np.ndarray:
    """``round(|actual - expected| / scale)``, as integers."""
    difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / scale
    return np.rint(difference).astype(np.int64)


def _argmax_agrees(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Per row (all axes but the last), whether the argmax over the last axis agrees."""
    width = actual.shape[-1] if actual.ndim > 1 else 1
    return np.argmax(actual.reshape(-1, width), axis=-1) == np.argmax(expected.reshape(-1, width), axis=-1)


def _summary(steps: np.ndarray, rows: np.ndarray) -> tuple[float, int, float]:
    """``(identical fraction, max steps, argmax agreement)``."""
    if steps.size == 0:
        return 1.0, 0, 1.0
    return float(np.mean(steps == 0)), int(steps.max()), float(np.mean(rows)) if rows.size else 1.0


__all__ = [
    "to_tflite",
    "compare",
    "TFLiteCheck",
    "TFLiteOp",
    "AgreementReport",
    "OutputAgreement",
    "analyse_flatbuffer",
    "layer_of_tensor",
    "layer_names",
    "layer_quantizers",
    "TFLITE_MAX_BITS",
    "KERNELS",
]
