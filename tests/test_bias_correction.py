"""keras_qat.bias_correction (through ``calibrate``): the mean shift that weight quantization
adds to each Conv/Dense output is taken out of its bias.

Oracles: NumPy's matmul and TF's conv2d on the layer's real inputs with the float kernel and
with the kernel TF's fake-quant op quantizes; the shift added must be the difference of their
means.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from tests.conftest import tf_fake_quant

L = keras.layers


def _values(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _upstream(model, name):
    """The real inputs the QAT model gives layer ``name`` (its integer inference)."""
    return keras.Model(model.input, model.get_layer(name).input)


def test_a_dense_bias_takes_the_mean_shift_of_its_quantized_kernel():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,), name="x")
    float_model = keras.Model(inputs, L.Dense(5, name="dense")(inputs))
    model = kq.quantize_model(float_model, kq.NBitScheme(3, 8, per_axis=False, method="minmax"))
    x = np.random.default_rng(0).uniform(0.0, 2.0, (256, 16)).astype("float32")  # a mean far from 0
    layer = model.get_layer("quant_dense")
    ((kernel, quantizer, variables),) = layer.quantized_weights()
    bias_before = _values(layer.layer.bias)

    report = kq.calibrate(model, x, batch_size=64)

    w = _values(kernel)
    w_q = tf_fake_quant(w, _values(variables["min_var"]), _values(variables["max_var"]), 3, narrow_range=True)
    real_inputs = _values(keras.ops.convert_to_numpy(_upstream(model, "quant_dense")(x)))
    expected = (real_inputs @ (w - w_q)).mean(axis=0)
    np.testing.assert_allclose(_values(layer.layer.bias) - bias_before, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(report.bias_shifts["quant_dense"], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected).max() > 1e-3  # a 3-bit kernel on such inputs does shift the mean
    # the float model the QAT model was made from keeps its bias
    assert np.array_equal(_values(float_model.get_layer("dense").bias), np.zeros(5))


def test_a_folded_batch_norm_takes_the_shift_in_its_beta():
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 2), name="image")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs))
    model = kq.quantize_model(keras.Model(inputs, L.ReLU(name="relu")(x)), kq.NBitScheme(4, 8, method="minmax"))
    data = np.random.default_rng(1).uniform(0.0, 1.0, (64, 6, 6, 2)).astype("float32")
    layer = model.get_layer("quant_conv")
    beta_before = _values(layer.batch_norm.beta)

    kq.calibrate(model, data, batch_size=32)

    w = _values(layer.unquantized_kernel())
    variables = layer.kernel_vars
    w_q = tf_fake_quant(w, _values(variables["min_var"]), _values(variables["max_var"]), 4, narrow_range=True, axis=-1)
    real_inputs = np.asarray(keras.ops.convert_to_numpy(_upstream(model, "quant_conv")(data)), np.float32)
    shifted = tf.nn.conv2d(real_inputs, (w - w_q).astype(np.float32), strides=1, padding="SAME").numpy()
    expected = shifted.reshape(-1, 4).mean(axis=0)
    np.testing.assert_allclose(_values(layer.batch_norm.beta) - beta_before, expected, rtol=1e-4, atol=1e-6)


def test_bias_correction_can_be_left_off():
    inputs = keras.Input((16,), name="x")
    model = kq.quantize_model(keras.Model(inputs, L.Dense(5, name="dense")(inputs)), kq.NBitScheme(3, 8))
    bias = model.get_layer("quant_dense").layer.bias
    before = _values(bias)
    report = kq.calibrate(model, np.ones((32, 16), "float32"), bias_correction=False)
    assert report.bias_shifts == {} and np.array_equal(_values(bias), before)
    with pytest.raises(ValueError, match="calibrate: bias_correction must be True or False, got 'yes'"):
        kq.calibrate(model, np.ones((32, 16), "float32"), bias_correction="yes")
