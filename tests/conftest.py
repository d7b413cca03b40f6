"""Shared test helpers: the TensorFlow oracle, a compile wrapper per backend, a variable host.

The oracle is TensorFlow's own fake-quant ops, called on NumPy arrays, whatever the Keras
backend under test: TensorFlow is installed with the package, so the JAX run compares
against the same kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
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
