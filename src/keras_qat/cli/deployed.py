"""Running a deployed model next to the QAT model: accuracy, agreement, size.

Agreement is counted as :func:`keras_qat.export.compare` counts it: each output element's
difference from the QAT model's inference in the output's quantization steps. The LiteRT model
runs on the interpreter's reference kernels, whose arithmetic the QAT model reproduces; the ONNX
model in ONNX Runtime without graph optimizations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from keras_qat.cli.data import accuracy

#: The deployed formats the command line writes and runs.
FORMATS = ("kqat", "tflite", "onnx")

#: Their file suffixes.
SUFFIXES = tuple(f".{fmt}" for fmt in FORMATS)


@dataclass(frozen=True)
class DeployedResult:
    """One deployed form of a QAT model, run on the evaluation data."""

    format: str
    path: str
    size_bytes: int
    accuracy: float | None
    identical_fraction: float
    max_step_difference: int

    def as_dict(self) -> dict:
        return asdict(self)


def qat_outputs(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``model(x, training=False)`` in batches, as NumPy (what every deployed form must match)."""
    import keras

    parts = [keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def deployed_outputs(path: str | Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The float outputs of the deployed model at ``path`` (``.kqat``, ``.tflite`` or ``.onnx``)
    on ``x``, and its output quantization step."""
    path = Path(path)
    if path.suffix == ".kqat":
        from keras_qat import runtime

        integer_model = runtime.load(path)
        return np.asarray(integer_model.run(x)), float(integer_model.output_grids[0].scale)
    if path.suffix == ".tflite":
        from keras_qat.export.tflite.compare import tflite_outputs

        (values, scale), *_ = tflite_outputs(path, x)
        return np.asarray(values), float(scale)
    if path.suffix == ".onnx":
        from keras_qat.export.onnx.run import onnx_outputs

        (values, scale), *_ = onnx_outputs(path, [np.asarray(x, np.float32)], [], "reference")
        return np.asarray(values), float(scale)
    raise ValueError(f"{path}: a deployed model is a .kqat, .tflite or .onnx file.")


def evaluate(path: str | Path, x: np.ndarray, y: np.ndarray | None, expected: np.ndarray) -> DeployedResult:
    """Run the deployed model at ``path`` on ``x``; its accuracy against ``y`` and its agreement
    with ``expected`` (the QAT model's outputs on ``x``)."""
    from keras_qat.export.compare import steps_apart

    path = Path(path)
    outputs, scale = deployed_outputs(path, x)
    steps = steps_apart(outputs, expected, scale)
    return DeployedResult(
        format=path.suffix.lstrip("."),
        path=str(path),
        size_bytes=path.stat().st_size,
        accuracy=accuracy(outputs, y),
        identical_fraction=float(np.mean(steps == 0)) if steps.size else 1.0,
        max_step_difference=int(steps.max()) if steps.size else 0,
    )


def export(model, fmt: str, path: str | Path) -> Path:
    """Write ``model`` as ``fmt`` (one of :data:`FORMATS`) at ``path``."""
    from keras_qat import export as exporters

    if fmt == "kqat":
        return Path(exporters.save_artifact(model, path))
    if fmt == "tflite":
        return Path(exporters.to_tflite(model, path).path)
    if fmt == "onnx":
        return Path(exporters.to_onnx(model, path))
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")


def float_weight_bytes(model) -> int:
    """The float32 bytes of a model's weights: what a deployed form's size is measured against."""
    return int(sum(int(np.prod(w.shape)) for w in model.weights) * 4)


__all__ = ["DeployedResult", "FORMATS", "SUFFIXES", "qat_outputs", "deployed_outputs", "evaluate", "export", "float_weight_bytes"]
