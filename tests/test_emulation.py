"""keras_qat.emulation: whether inference reproduces the integer kernels, and saying so when
it cannot (the arithmetic itself is checked against the runtime in test_integer_ops)."""

import warnings

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import ops as qops
from keras_qat.errors import InexactInferenceWarning

pytestmark = pytest.mark.api


def _quantized_dense():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="relu")(inputs))
    return kq.quantize_model(model)


def test_inference_warns_once_where_it_cannot_be_exact():
    """TensorFlow and PyTorch (and JAX with x64) compute the integer kernels and say nothing;
    JAX without x64 computes fake quantization and says how to enable 64-bit types."""
    model = _quantized_dense()
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    if qops.exact_integer_arithmetic():
        with warnings.catch_warnings():
            warnings.simplefilter("error", InexactInferenceWarning)
            model(x, training=False)
    else:
        with pytest.warns(InexactInferenceWarning, match="jax_enable_x64"):
            model(x, training=False)


def test_training_never_warns():
    model = _quantized_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactInferenceWarning)
        model(np.ones((2, 4), np.float32), training=True)
