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


def _conv_bn(momentum: float = 0.99):
    inputs = keras.Input((6, 6, 2), name="image")
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(momentum=momentum, name="bn")(x)
    return keras.Model(inputs, L.ReLU(name="relu")(x))


def test_a_folded_batch_norm_takes_the_shift_in_its_moving_mean():
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    model = kq.quantize_model(_conv_bn(), kq.NBitScheme(3, 8, method="minmax"))
    data = np.random.default_rng(1).uniform(0.0, 1.0, (64, 6, 6, 2)).astype("float32")
    layer = model.get_layer("quant_conv")
    folded_before = _values(layer.folded_bias())
    beta_before = _values(layer.batch_norm.beta)

    kq.calibrate(model, data, batch_size=32)

    w = _values(layer.unquantized_kernel())
    variables = layer.kernel_vars
    w_q = tf_fake_quant(w, _values(variables["min_var"]), _values(variables["max_var"]), 3, narrow_range=True, axis=-1)
    real_inputs = np.asarray(keras.ops.convert_to_numpy(_upstream(model, "quant_conv")(data)), np.float32)
    shifted = tf.nn.conv2d(real_inputs, (w - w_q).astype(np.float32), strides=1, padding="SAME").numpy()
    expected = shifted.reshape(-1, 4).mean(axis=0)
    assert np.abs(expected).max() > 1e-3  # a 3-bit kernel does shift the mean
    np.testing.assert_allclose(_values(layer.folded_bias()) - folded_before, expected, rtol=1e-4, atol=1e-6)
    assert np.array_equal(_values(layer.batch_norm.beta), beta_before)


def test_a_folded_correction_is_what_batch_statistics_then_converge_to():
    """Training normalizes with batch statistics and moves the moving mean to the mean of the
    quantized kernel's output: with momentum 0 and the calibration's data, one step leaves the
    corrected moving mean where it is (up to what the 8-bit input grid moves), instead of
    counting the shift twice as a shift put in ``beta`` would."""
    keras.utils.set_random_seed(2)
    data = np.random.default_rng(2).uniform(0.0, 1.0, (64, 6, 6, 2)).astype("float32")
    float_model = _conv_bn(momentum=0.0)
    float_model(data, training=True)  # moving statistics = the data's
    model = kq.quantize_model(float_model, kq.NBitScheme(3, 8, method="minmax"))
    bn = model.get_layer("quant_conv").batch_norm
    before = _values(bn.moving_mean)
    kq.calibrate(model, data, batch_size=64)
    corrected = _values(bn.moving_mean)
    moved = np.abs(corrected - before).max()
    assert moved > 1e-2

    model(data, training=True)  # one step of batch statistics (no weight update)

    assert np.abs(_values(bn.moving_mean) - corrected).max() < 0.1 * moved


def test_layers_are_corrected_in_order_each_on_the_inputs_the_corrected_ones_give():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12,), name="x")
    hidden = L.Dense(8, name="first")(inputs)
    model = kq.quantize_model(keras.Model(inputs, L.Dense(3, name="second")(hidden)), kq.NBitScheme(3, 8, method="minmax", per_axis=False))
    x = np.random.default_rng(3).uniform(0.0, 2.0, (128, 12)).astype("float32")

    report = kq.calibrate(model, x, batch_size=64)

    for name in ("quant_first", "quant_second"):
        layer = model.get_layer(name)
        ((kernel, _, variables),) = layer.quantized_weights()
        w = _values(kernel)
        w_q = tf_fake_quant(w, _values(variables["min_var"]), _values(variables["max_var"]), 3, narrow_range=True)
        real_inputs = _values(keras.ops.convert_to_numpy(_upstream(model, name)(x)))  # after the correction before it
        np.testing.assert_allclose(report.bias_shifts[name], (real_inputs @ (w - w_q)).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_bias_correction_can_be_left_off():
    inputs = keras.Input((16,), name="x")
    model = kq.quantize_model(keras.Model(inputs, L.Dense(5, name="dense")(inputs)), kq.NBitScheme(3, 8))
    bias = model.get_layer("quant_dense").layer.bias
    before = _values(bias)
    report = kq.calibrate(model, np.ones((32, 16), "float32"), bias_correction=False)
    assert report.bias_shifts == {} and np.array_equal(_values(bias), before)
    with pytest.raises(ValueError, match="calibrate: bias_correction must be True or False, got 'yes'"):
        kq.calibrate(model, np.ones((32, 16), "float32"), bias_correction="yes")
