"""Shared test helpers: the TensorFlow oracle, a compile wrapper per backend, a variable host.

The oracle is TensorFlow's own fake-quant ops, called on NumPy arrays, whatever the Keras
backend under test: TensorFlow is installed with the package, so the JAX run compares
against the same kernels.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

L = keras.layers
import pytest
from hypothesis import settings

settings.register_profile("keras_qat", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("keras_qat")

BACKEND = keras.backend.backend()


def tf_fake_quant(x, min, max, num_bits, narrow_range, axis=None):
    """TF's fake quantization of NumPy ``x``: the oracle. Per-axis moves ``axis`` last."""
    import tensorflow as tf

    x = np.asarray(x, np.float32)
    if axis is None:
        return tf.quantization.fake_quant_with_min_max_vars(
            x, np.float32(min), np.float32(max), num_bits=num_bits, narrow_range=narrow_range
        ).numpy()
    axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    moved = np.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    lead = moved.shape[: x.ndim - len(axes)]
    flat = moved.reshape(lead + (-1,))
    out = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        flat,
        np.asarray(min, np.float32),
        np.asarray(max, np.float32),
        num_bits=num_bits,
        narrow_range=narrow_range,
    ).numpy()
    return np.moveaxis(out.reshape(moved.shape), tuple(range(x.ndim - len(axes), x.ndim)), axes)


def tf_gradients(x, min, max, upstream, num_bits, narrow_range, per_channel):
    """TF's gradients of its fake-quant op w.r.t. (x, min, max) for upstream ``upstream``."""
    import tensorflow as tf

    x, lo, hi = (tf.constant(np.asarray(v, np.float32)) for v in (x, min, max))
    with tf.GradientTape() as tape:
        tape.watch([x, lo, hi])
        op = (
            tf.quantization.fake_quant_with_min_max_vars_per_channel
            if per_channel
            else tf.quantization.fake_quant_with_min_max_vars
        )
        y = op(x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)
    return [g.numpy() for g in tape.gradient(y, [x, lo, hi], output_gradients=tf.constant(upstream))]


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def same_bits(a, b) -> bool:
    """Exact equality of float32 arrays, bit for bit (so -0.0 differs from 0.0 and NaN == NaN)."""
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def compiled(fn, static_argnums=()):
    """``fn`` compiled the way Keras runs it on this backend: tf.function or jax.jit."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn, static_argnums=static_argnums)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


class QuantizerHost(keras.layers.Layer):
    """Owns quantizer variables for a wrapped layer, as QuantizeWrapper does."""

    def __init__(self, layer=None, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer


@pytest.fixture
def host():
    return QuantizerHost()


@pytest.fixture
def fused_for_every_size(monkeypatch):
    """Run the training kernels (the fused per-axis one, the per-tensor one with separate
    gradients, the compiled per-channel range) even on small tensors."""
    from keras_qat import ops as qops

    monkeypatch.setattr(qops, "_FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(qops, "_LARGE_TENSOR_MIN_ELEMENTS", 0)


# ---- exact fixed-point arithmetic (the oracle of keras_qat.fixed_point) ----


def _exact_srdhm(a: int, b: int) -> int:
    product = a * b
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    total = product + nudge
    return abs(total) // (1 << 31) * (1 if total >= 0 else -1)  # C++ division truncates


def _exact_rounding_divide_by_pot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def exact_multiply_by_quantized_multiplier(x: int, m0: int, shift: int) -> int:
    """TFLite's MultiplyByQuantizedMultiplier in Python's exact integers: the oracle."""
    return _exact_rounding_divide_by_pot(_exact_srdhm(x * (1 << max(shift, 0)), m0), max(-shift, 0))


def exact_multiply_single_rounding(x: int, m0: int, shift: int) -> int:
    """The single-rounding requantization (reference FULLY_CONNECTED) in exact integers."""
    total = 31 - shift
    return (x * m0 + (1 << (total - 1))) >> total


# ---- the digits CNN that the export and runtime tests train ----


def training_step_results(layer, x) -> list[np.ndarray]:
    """One training call of ``layer`` (a layer or a model) on ``x``: its output, every variable
    afterwards and, on TensorFlow, the gradients of a weighted sum of the output for the
    trainable ones; to compare two ways of training bit for bit."""
    if keras.backend.backend() != "tensorflow":
        return [to_numpy(layer(x, training=True))] + [to_numpy(w) for w in layer.weights]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = layer(x, training=True)
        total = tf.reduce_sum(out * np.linspace(-1, 1, out.shape[-1], dtype="float32"))
    gradients = tape.gradient(total, [w.value for w in layer.trainable_weights])
    return [to_numpy(out)] + [to_numpy(w) for w in layer.weights] + [g.numpy() for g in gradients]


def assert_trains_alike(layer, x, settings, steps: int = 3) -> None:
    """``layer`` trained ``steps`` times on ``x`` from the same variables under each setting
    (a callable that sets one way of training up) gives the same results
    (:func:`training_step_results`), bit for bit."""
    start = [to_numpy(w) for w in layer.weights]
    runs = []
    for setting in settings:
        setting()
        for variable, value in zip(layer.weights, start):
            variable.assign(value)
        runs.append([training_step_results(layer, x) for _ in range(steps)])
    for run in runs[1:]:
        for step, (got, want) in enumerate(zip(run, runs[0])):
            assert len(got) == len(want)
            assert all(same_bits(a, b) for a, b in zip(got, want)), f"step {step} differs"


def fit_briefly(model, x, y, epochs=1):
    """Compile with Adam(1e-2) and fit silently: the short training the export tests use."""
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def qat_inference(model, x) -> np.ndarray:
    """The QAT model's inference on ``x`` as NumPy: one compiled ``predict`` call on JAX (run
    eagerly, JAX compiles each op anew for each new shape: most of a JAX test's time), a
    direct call elsewhere."""
    if keras.backend.backend() == "jax":
        return np.asarray(model.predict(x, batch_size=len(x), verbose=0))
    return keras.ops.convert_to_numpy(model(x, training=False))


def digits_data():
    """The 1797 offline 8x8 digits (sklearn), scaled to [0, 1], shuffled with a fixed seed."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], labels[order]


def digits_cnn() -> keras.Model:
    """Conv+BN+ReLU, DepthwiseConv+BN+ReLU6, a residual Add+ReLU, MaxPool, a Concatenate of
    the pooled tensor and a 1x1 conv of it, AveragePooling, GlobalAveragePooling,
    Dense+BN+ReLU and a Dense softmax. BN momentum 0.9: the moving statistics settle within
    the ~90 steps of the fine-tuning."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = L.BatchNormalization(momentum=0.9, name="bn_dw")(y)
    y = L.ReLU(6.0, name="relu6")(y)
    y = L.Add(name="residual")([x, y])
    y = L.ReLU(name="relu_residual")(y)
    pooled = L.MaxPooling2D(2, name="maxpool")(y)
    branch = L.Conv2D(8, 1, activation="relu", name="conv_branch")(pooled)
    x = L.Concatenate(name="concat")([pooled, branch])
    x = L.AveragePooling2D(2, name="avgpool")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(16, name="fc")(x)
    x = L.BatchNormalization(momentum=0.9, name="bn_fc")(x)
    x = L.ReLU(name="relu_fc")(x)
    outputs = L.Dense(10, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


@pytest.fixture(scope="session")
def digits_qat_8bit() -> keras.Model:
    """The digits CNN quantized with the default 8-bit scheme (per-tensor Dense, which the
    TFLite converter requires) and fine-tuned 2 epochs on the first 1400 digits, seed 1:
    trained once for the export and runtime tests, which only read it."""
    import keras_qat as kq

    keras.utils.set_random_seed(1)
    images, labels = digits_data()
    model = kq.quantize_model(digits_cnn())
    fit_briefly(model, images[:1400], labels[:1400], epochs=2)
    return model


# ---- fresh Python processes ----


def cpu_count() -> int:
    """The CPUs this process may run on (os.cpu_count() counts the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_side_by_side(commands, **kwargs) -> list[subprocess.CompletedProcess]:
    """``subprocess.run(command, **kwargs)`` for each command, as many at a time as there are
    CPUs (at most 4), in order. Each fresh Python that imports TensorFlow spends seconds of one
    core on the import alone; independent ones need not wait for each other."""
    commands = list(commands)
    with ThreadPoolExecutor(max_workers=max(1, min(4, cpu_count(), len(commands)))) as pool:
        return list(pool.map(lambda command: subprocess.run(command, **kwargs), commands))
