"""``compare``: a deployed model next to the QAT model, counted in output quantization steps.

It runs the deployed file (a LiteRT flatbuffer in the LiteRT interpreter, an ONNX model in ONNX
Runtime) and the QAT model in inference mode on the same data, and counts their differences in
each output's quantization step (:class:`AgreementReport`). Each format's runner lives with its
exporter (:mod:`keras_qat.export.tflite.compare`, :mod:`keras_qat.export.onnx.run`) and returns
``(float values, output step)`` per output; everything else is here, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import keras
import numpy as np

from keras_qat import emulation
from keras_qat.inputs import InputSpec, check_floats
from keras_qat.layers import QuantizeLayer

#: Which kernels run the deployed model. For LiteRT: the interpreter's reference kernels (the
#: arithmetic of TFLite's quantization spec, which the QAT model's inference reproduces: two
#: roundings, gemmlowp), its built-in optimized kernels (the x86 ones round negative halves up in
#: their second rounding), or its default (XNNPACK where it applies, as deployed on CPU; rounds
#: once). For ONNX Runtime: graph optimizations off (every node run as written), basic, or all
#: (its default).
KERNELS = ("reference", "builtin", "default")


@dataclass(frozen=True)
class OutputAgreement:
    """Agreement of one model output, in output quantization steps.

    Attributes:
        name: the Keras output name.
        scale: the output's quantization step in the deployed model.
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
    """How closely a deployed model reproduces the QAT model, over all outputs together.

    Attributes:
        identical_fraction: fraction of all output elements 0 steps apart.
        max_step_difference: the largest difference of any element, in its output's steps.
        argmax_agreement: fraction of all rows, of all outputs, whose argmax agrees.
        per_output: the same, output by output, in the model's output order.
        samples: the batch size compared.
        deployed: what ran the deployed model (``"TFLite"``, ``"ONNX"``).
    """

    identical_fraction: float
    max_step_difference: int
    argmax_agreement: float
    per_output: list[OutputAgreement]
    samples: int
    deployed: str = "TFLite"

    def __str__(self) -> str:
        lines = [
            f"{self.deployed} vs QAT model on {self.samples} samples: {self.identical_fraction:.4%} of "
            f"outputs identical, max {self.max_step_difference} step(s) apart, argmax agreement "
            f"{self.argmax_agreement:.4%}"
        ]
        if len(self.per_output) > 1:
            lines.extend(f"  {output}" for output in self.per_output)
        return "\n".join(lines)



def compare(model: keras.Model, path: str | os.PathLike, x, *, kernels: str = "reference") -> AgreementReport:
    """Run the deployed model at ``path`` and ``model(x, training=False)`` on ``x``; count the
    differences.

    Each output's difference is measured in its deployed quantization step (the scale of the
    integer tensor that the final dequantization reads): ``steps = round(|deployed - qat| / scale)``.

    Args:
        model: the QAT model that was exported.
        path: a ``.tflite`` file from :func:`~keras_qat.export.to_tflite` (run in the LiteRT
            interpreter) or an ``.onnx`` file from :func:`~keras_qat.export.to_onnx` (run in ONNX
            Runtime on the CPU).
        x: the inputs: one array, or a list (in ``model.inputs`` order) or dict (by input
            name) of arrays for several inputs. Batches of finite float values (the real values
            the model was trained on, not integer pixels or codes), each of its input's shape
            with the batch axis first; int8 model inputs are quantized with their own scale and
            zero point. Anything else is refused, naming the input and what it takes.
        kernels: which kernels run the deployed model (:data:`KERNELS`). The default,
            ``"reference"``, is LiteRT's reference kernels, whose arithmetic the QAT model
            reproduces bit for bit, or ONNX Runtime without graph optimizations.

    Returns:
        An :class:`AgreementReport`, overall and per output.
    """
    deployed, run = _runner(path)
    if kernels not in KERNELS:
        raise ValueError(f"compare: kernels must be one of {list(KERNELS)}, got {kernels!r}.")
    inputs = _input_arrays(model, x)
    qat = _qat_outputs(model, inputs)
    outputs = run(path, inputs, [name for name, _ in qat], kernels)
    if len(outputs) != len(qat):
        raise ValueError(
            f"compare: the {deployed} model at {path} has {len(outputs)} outputs but model "
            f"'{model.name}' has {len(qat)}; was it exported from this model?"
        )
    per_output = []
    all_steps, all_rows = [], []
    for (name, expected), (actual, scale) in zip(qat, outputs):
        if actual.shape != expected.shape:
            raise ValueError(
                f"compare: output '{name}' has shape {expected.shape} in the QAT model but "
                f"{actual.shape} in the {deployed} model; was it exported from this model?"
            )
        steps, rows = steps_apart(actual, expected, scale), _argmax_agrees(actual, expected)
        all_steps.append(steps.ravel())
        all_rows.append(rows)
        per_output.append(OutputAgreement(name, scale, *_summary(steps, rows)))
    identical, max_steps, argmax = _summary(np.concatenate(all_steps), np.concatenate(all_rows))
    return AgreementReport(identical, max_steps, argmax, per_output, samples=int(inputs[0].shape[0]), deployed=deployed)


Runner = Callable[[str | os.PathLike, list, list, str], list]


def _runner(path) -> tuple[str, Runner]:
    """``(format name, runner)`` for the deployed file at ``path``, by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".onnx", ".tflite", ".lite") and Path(path).is_file():
        with open(path, "rb") as stream:  # no telling suffix: a flatbuffer says TFL3 at byte 4
            suffix = ".tflite" if stream.read(8)[4:8] == b"TFL3" else ".onnx"
    if suffix == ".onnx":
        from keras_qat.export.onnx.run import onnx_outputs

        return "ONNX", onnx_outputs
    if suffix in (".tflite", ".lite"):
        from keras_qat.export.tflite.compare import run_tflite

        return "TFLite", run_tflite
    raise ValueError(f"compare: {path} is neither a .tflite nor an .onnx file; compare runs those two formats.")


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
    outputs = model(structured_inputs(model, inputs), training=False)
    flat = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(outputs)]
    if isinstance(outputs, Mapping):
        names = keras.tree.flatten({key: key for key in outputs})
    else:
        names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(flat):
        names = [f"output_{i}" for i in range(len(flat))]
    return list(zip(names, flat))


def structured_inputs(model, flat: list):
    """``flat`` (in ``model.inputs`` order) in the structure the model was built with: one
    tensor, a list or a dict."""
    structure = getattr(model, "input", None)
    if structure is None:
        return flat if len(flat) > 1 else flat[0]
    return keras.tree.pack_sequence_as(structure, flat)


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


__all__ = ["compare", "steps_apart", "structured_inputs", "input_specs", "AgreementReport", "OutputAgreement", "KERNELS"]
