"""``compare``: the LiteRT interpreter next to the QAT model, counted in output quantization steps.

It runs the flatbuffer in the LiteRT interpreter and the QAT model in inference mode on the
same data, and counts their differences in each output's quantization step
(:class:`AgreementReport`). By default the interpreter's reference kernels run: the arithmetic
of TFLite's quantization spec, which the QAT model's inference reproduces bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import keras
import numpy as np

from keras_qat import emulation
from keras_qat.export.tflite.convert import _structured
from keras_qat.export.tflite.inspect import _DEQUANTIZE, _Graph, _interpreter
from keras_qat.inputs import InputSpec, check_floats
from keras_qat.layers import QuantizeLayer


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
            name) of arrays for several inputs. Batches of finite float values (the real values
            the model was trained on, not integer pixels or codes), each of its input's shape
            with the batch axis first; int8 model inputs are quantized with their own scale and
            zero point. Anything else is refused, naming the input and what it takes.
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
        steps, rows = steps_apart(actual, expected, scale), _argmax_agrees(actual, expected)
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
    arrays = [np.asarray(keras.ops.convert_to_numpy(a)) for a in arrays]
    return [check_floats(a, spec, "compare", model.name) for a, spec in zip(arrays, input_specs(model))]


def input_specs(model) -> list[InputSpec]:
    """What each input of ``model`` takes: name, one example's shape, and the real range its
    QuantizeLayer covers (where the model quantizes it and the range is known)."""
    ranges = {}
    for layer in model.layers:
        if isinstance(layer, QuantizeLayer) and layer.built:
            try:
                ranges[id(layer.input)] = _quantized_range(layer)
            except (AttributeError, ValueError):  # called more than once: no single input
                continue
    return [
        InputSpec(getattr(tensor, "name", f"input_{i}"), tuple(tensor.shape[1:]), ranges.get(id(tensor)))
        for i, tensor in enumerate(model.inputs)
    ]


def _quantized_range(layer) -> tuple[float, float] | None:
    """The real values ``layer``'s quantizer covers: its lowest and highest codes, dequantized."""
    try:
        grid = emulation.exported_grid(emulation.Source(layer.quantizer, layer.quantizer_vars))
    except (AttributeError, ValueError):  # not built, or an empty range
        return None
    low, high = ((q - grid.zero_point) * grid.scale for q in (grid.qmin, grid.qmax))
    low, high = float(np.min(low)), float(np.max(high))
    return (low, high) if np.isfinite(low) and np.isfinite(high) and low < high else None


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


def tflite_outputs(path: str | os.PathLike, x, kernels: str = "reference") -> list[tuple[np.ndarray, float]]:
    """Run the flatbuffer at ``path`` on ``x`` (one array or a list in input order; float
    values): ``(float outputs, output quantization step)`` per output, in the model's order."""
    inputs = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
    return _tflite_outputs(path, inputs, [], kernels)


def steps_apart(actual: np.ndarray, expected: np.ndarray, scale: float) -> np.ndarray:
    """How many quantization steps of size ``scale`` each element of ``actual`` is from
    ``expected``: ``round(|actual - expected| / scale)``, as integers."""
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


__all__ = ["compare", "tflite_outputs", "steps_apart", "AgreementReport", "OutputAgreement", "KERNELS"]
