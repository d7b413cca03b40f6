"""The LiteRT side of :func:`keras_qat.export.compare`: a flatbuffer run in the interpreter.

:func:`run_tflite` runs it on float inputs (quantizing them as TFLite's QUANTIZE does where the
model takes int8) and returns each output as float values with its quantization step, which
:func:`keras_qat.export.compare` measures differences in.
"""

from __future__ import annotations

import os

import numpy as np

from keras_qat.export.tflite.inspect import _DEQUANTIZE, _Graph, _interpreter


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


def run_tflite(path, inputs: list[np.ndarray], names: list[str], kernels: str) -> list[tuple[np.ndarray, float]]:
    """Run the flatbuffer on ``inputs`` (float arrays in input order; the batch is resized) with
    ``kernels`` (:data:`keras_qat.export.compare.KERNELS`): ``(float value, step)`` per output,
    ``names`` naming them in errors."""
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
    return run_tflite(path, inputs, [], kernels)


__all__ = ["run_tflite", "tflite_outputs"]
