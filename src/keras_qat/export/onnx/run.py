"""The ONNX Runtime side of :func:`keras_qat.export.compare`: an ``.onnx`` file run on the CPU.

:func:`onnx_outputs` runs the model on float inputs and returns each output as float values with
its quantization step: the scale of the DequantizeLinear that produces it.
"""

from __future__ import annotations

import os

import numpy as np

#: ONNX Runtime's graph optimization level for each choice of ``kernels`` in
#: :func:`keras_qat.export.compare`: "reference" runs every node as written, "builtin" its basic
#: optimizations (constant folding, redundant nodes removed), "default" its own default (all
#: optimizations: layout changes and fusions as well).
OPTIMIZATION_LEVELS = {"reference": "ORT_DISABLE_ALL", "builtin": "ORT_ENABLE_BASIC", "default": "ORT_ENABLE_ALL"}


def session(path: str | os.PathLike, kernels: str = "reference"):
    """An ONNX Runtime CPU session of the model at ``path`` with ``kernels``' optimization level."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[kernels])
    options.log_severity_level = 4  # its own errors reach the user as ours
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own exception types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"compare: ONNX Runtime {ort.__version__} cannot load {path} ({first}).") from None


def onnx_outputs(path, inputs: list[np.ndarray], names: list[str], kernels: str) -> list[tuple[np.ndarray, float]]:
    """Run the model at ``path`` on ``inputs`` (float arrays in input order): ``(float value,
    step)`` per output, ``names`` naming them in errors."""
    import onnx

    runner = session(path, kernels)
    declared = runner.get_inputs()
    if len(declared) != len(inputs):
        raise ValueError(f"compare: the ONNX model at {path} has {len(declared)} inputs, but x gives {len(inputs)}.")
    feed = {spec.name: np.asarray(array, np.float32) for spec, array in zip(declared, inputs)}
    try:
        values = runner.run(None, feed)
    except Exception as error:  # ONNX Runtime raises its own exception types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"compare: ONNX Runtime failed to run {path} ({first}).") from None
    steps = output_steps(onnx.load(str(path)))
    results = []
    for index, (spec, value) in enumerate(zip(runner.get_outputs(), values)):
        name = names[index] if index < len(names) else spec.name
        if spec.name not in steps:
            raise ValueError(
                f"compare: output '{name}' of the ONNX model at {path} is not produced by a DequantizeLinear, so "
                "it has no quantization step to measure differences in; was it written by to_onnx?"
            )
        results.append((np.asarray(value, np.float64), steps[spec.name]))
    return results


def output_steps(model) -> dict[str, float]:
    """``{output name: scale}`` for each graph output produced (through Identity nodes) by a
    per-tensor DequantizeLinear whose scale is an initializer."""
    from onnx import numpy_helper

    producer = {output: node for node in model.graph.node for output in node.output}
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    steps = {}
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in constants:
            continue
        scale = numpy_helper.to_array(constants[node.input[1]])
        if scale.size == 1:
            steps[output.name] = float(scale.reshape(()))
    return steps


__all__ = ["onnx_outputs", "output_steps", "session", "OPTIMIZATION_LEVELS"]
