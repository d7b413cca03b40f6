"""``keras-qat demo``: the whole story on real data, in one command.

It trains a small CNN on the offline 8x8 digits (scikit-learn's copy of the UCI set, no
download), fine-tunes a copy with QAT for each scheme (W8A8, W4A8, W4A4 by default), exports
each to ``.kqat``, LiteRT and ONNX, runs every deployed form on the held-out digits, and writes the
report folder (:mod:`keras_qat.cli.report`). Every number is measured in the run: another
``--seed`` draws another split, other initial weights and other results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from keras_qat.cli import deployed, report
from keras_qat.cli.data import accuracy
from keras_qat.cli.errors import UsageError
from keras_qat.cli.schemes import DEMO_SCHEMES, bits_of, label, scheme_from_name


@dataclass(frozen=True)
class DemoSettings:
    """What ``keras-qat demo`` runs; the defaults finish in under a minute on two cores (32 s measured, with the ONNX export)."""

    out: Path = Path("keras-qat-demo")
    schemes: tuple[str, ...] = DEMO_SCHEMES
    seed: int = 0
    float_epochs: int = 30
    qat_epochs: int = 5
    held_out: int = 397
    formats: tuple[str, ...] = deployed.FORMATS


def digits(seed: int, held_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: the 1797 8x8 digits scaled to [0, 1], shuffled
    by ``seed``, the last ``held_out`` kept for testing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(
            "the demo reads scikit-learn's offline copy of the digits: pip install 'keras-qat[demo]' "
            "(make demo installs it)."
        ) from None

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order].astype("int64")
    return images[:-held_out], labels[:-held_out], images[-held_out:], labels[-held_out:]


def digits_cnn():
    """A small CNN of the layers deployed models are made of: Conv+BN+ReLU, a residual
    DepthwiseConv+BN+ReLU6 block, max pooling, global average pooling and a softmax Dense."""
    import keras

    L = keras.layers
    inputs = keras.Input((8, 8, 1), name="digit")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="conv_bn")(x)
    x = L.ReLU(name="conv_relu")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(x)
    y = L.BatchNormalization(name="depthwise_bn")(y)
    y = L.ReLU(6.0, name="depthwise_relu6")(y)
    x = L.Add(name="residual")([x, y])
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Conv2D(32, 3, padding="same", name="conv2", activation="relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(10, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def _compile(model, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def _weights(qat_model) -> tuple[dict, dict, dict]:
    """Per deployed weight: per-channel ranges of its values, its rounding error in steps, and
    which weights lie outside the grid's range (clipped)."""
    from keras_qat.export import quantized_weights, real_weights

    quantized, real = quantized_weights(qat_model), real_weights(qat_model)
    ranges, errors, clipped = {}, {}, {}
    for name, tensor in quantized.items():
        if not name.endswith("kernel"):
            continue
        values = tensor.dequantize()
        axes = tensor.axis or ()
        channel_axes = tuple(a % values.ndim for a in axes)
        moved = np.moveaxis(values, channel_axes, tuple(range(len(channel_axes)))) if channel_axes else values[None]
        flat = moved.reshape(int(np.prod(moved.shape[: max(len(channel_axes), 1)])), -1)
        ranges[name] = (flat.min(axis=1), flat.max(axis=1))
        step = tensor.grid.along(np.asarray(tensor.scale, np.float32), values.shape)
        step = np.where(step == 0, 1.0, step)
        errors[name] = (real[name] - values) / step
        codes = real[name] / step + tensor.grid.along(np.asarray(tensor.zero_point), values.shape)
        clipped[name] = (codes < tensor.grid.qmin - 0.5) | (codes > tensor.grid.qmax + 0.5)
    return ranges, errors, clipped


Progress = Callable[[str, float], None]


def run(settings: DemoSettings, progress: Progress = lambda message, done: None) -> report.Report:
    """Train, quantize, export and evaluate; write the report folder; return the report.

    ``progress(message, fraction_done)`` is called as the work advances.
    """
    import keras

    import keras_qat as kq

    started = time.perf_counter()
    schemes = [(name, scheme_from_name(name)) for name in settings.schemes]  # unknown names fail first
    settings.out.mkdir(parents=True, exist_ok=True)
    models_dir = settings.out / "models"
    models_dir.mkdir(exist_ok=True)
    steps_total = 1 + len(schemes) * (1 + len(settings.formats))
    done = 0

    def advance(message: str) -> None:
        nonlocal done
        done += 1
        progress(message, done / steps_total)

    x_train, y_train, x_test, y_test = digits(settings.seed, settings.held_out)
    keras.utils.set_random_seed(settings.seed)
    progress(f"training the float CNN ({settings.float_epochs} epochs)", 0.0)
    float_model = digits_cnn()
    _compile(float_model, 3e-3)
    float_model.fit(x_train, y_train, epochs=settings.float_epochs, batch_size=64, verbose=0)
    float_accuracy = float(float_model.evaluate(x_test, y_test, verbose=0, batch_size=512)[1])
    advance(f"float CNN: {float_accuracy:.2%} held-out accuracy")

    results = []
    for name, scheme in schemes:
        keras.utils.set_random_seed(settings.seed)
        qat_model = kq.quantize_model(float_model, scheme, target="tflite" if "tflite" in settings.formats else None)
        _compile(qat_model, 1e-3)
        qat_model.fit(x_train, y_train, epochs=settings.qat_epochs, batch_size=64, verbose=0)
        expected = deployed.qat_outputs(qat_model, x_test)
        bits = bits_of(name) or (None, None)
        result = report.SchemeResult(label(name), bits[0], bits[1], accuracy(expected, y_test))
        result.weight_ranges, result.weight_errors, result.weight_clipped = _weights(qat_model)
        advance(f"{result.scheme}: QAT model {result.qat_accuracy:.2%}")
        for fmt in settings.formats:
            path = deployed.export(qat_model, fmt, models_dir / f"{result.scheme.lower()}.{fmt}")
            result.deployed.append(deployed.evaluate(path, x_test, y_test, expected))
            advance(f"{result.scheme}: exported and ran .{fmt}")
        results.append(result)

    outcome = report.Report(float_accuracy, deployed.float_weight_bytes(float_model), len(x_test), settings.seed, results)
    outcome.elapsed_s = time.perf_counter() - started
    report.write(outcome, settings.out)
    return outcome


__all__ = ["DemoSettings", "run", "digits", "digits_cnn"]
