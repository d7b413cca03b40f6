"""keras_qat.learned: LSQ and PACT quantizers, whose learned ranges are the deployed ones.

Oracles: the LSQ paper's gradient of the quantized value with respect to the step size (in
NumPy); TF's fake-quant gradients for PACT (``tf_gradients``); the integer runtime, LiteRT's
reference kernels and ONNX Runtime for the exports.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import runtime
from keras_qat.export import compare, save_artifact, to_onnx, to_tflite
from keras_qat.learned import LSQQuantizer, PACTQuantizer
from tests.conftest import tf_fake_quant, digits_data, tf_gradients

L = keras.layers
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="gradients are taken with tf.GradientTape")


def _variables(quantizer, shape, name="w"):
    layer = keras.layers.Layer()
    return layer, quantizer.build(shape, name, layer)


def _gradient(quantizer, variables, x, key):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = quantizer(tf.constant(x), True, variables)
        total = tf.reduce_sum(out)
    return out.numpy(), tape.gradient(total, variables[key].value).numpy()


def test_lsq_step_gradient_is_the_papers():
    """Symmetric narrow 4 bits on [-m, m]: step s = m / 7; d(x_hat)/ds = round(x/s) - x/s
    inside the range, +-7 outside; d/dm = that / 7, scaled by 1 / sqrt(N * 7)."""
    quantizer = LSQQuantizer(num_bits=4, symmetric=True, narrow_range=True)
    _, variables = _variables(quantizer, (64,))
    m = np.float32(1.3)
    variables["max_var"].assign(m)
    variables["min_var"].assign(-m)
    variables["steps"].assign(1.0)
    x = np.random.default_rng(0).normal(scale=1.0, size=64).astype(np.float32)
    out, gradient = _gradient(quantizer, variables, x, "max_var")
    s = m / 7
    v = x / s
    inside = np.abs(v) <= 7
    d_step = np.where(inside, np.floor(v + 0.5) - v, np.sign(v) * 7)
    expected = np.sum(d_step) / 7 / np.sqrt(64 * 7)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4)
    np.testing.assert_allclose(out, np.clip(np.floor(v + 0.5), -7, 7) * s, rtol=1e-6)


def test_a_symmetric_learned_range_stays_symmetric_after_the_optimizer_moves_its_maximum():
    """The optimizer updates ``{name}_max`` after the step that stored ``{name}_min``; what
    inference and every export read is the range of the maximum alone (TF's fake quant on
    ``[-max, max]``), so the codes stay in ``[-qmax, qmax]``."""
    quantizer = LSQQuantizer(num_bits=8, symmetric=True, narrow_range=True)
    _, variables = _variables(quantizer, (64,))
    x = np.random.default_rng(2).normal(size=64).astype(np.float32)
    variables["max_var"].assign(np.float32(np.abs(x).max()))
    variables["min_var"].assign(-np.float32(np.abs(x).max()))
    variables["steps"].assign(1.0)
    quantizer(x, True, variables)
    variables["max_var"].assign(variables["max_var"] * 0.97)  # as an optimizer step would
    m = float(keras.ops.convert_to_numpy(variables["max_var"]))
    out = keras.ops.convert_to_numpy(quantizer(x, False, variables))
    np.testing.assert_array_equal(out, tf_fake_quant(x, -m, m, 8, narrow_range=True))
    low, high = (float(keras.ops.convert_to_numpy(end)) for end in quantizer.range_of(variables))
    assert (low, high) == (-m, m)
    codes = np.rint(out / (2 * m / 254))
    assert codes.min() >= -127 and codes.max() <= 127


@pytest.mark.parametrize("stored, deployed", [((-0.01, 0.5), (-0.01, 0.5)), ((0.03, 0.2), (0.0, 0.2)), ((0.03, -0.0007), (0.0, 1e-6))])
def test_a_learned_range_an_optimizer_step_carried_past_zero_keeps_a_grid(stored, deployed):
    """Adam at 1e-2 on an activation range of 0.04 can move a bound past zero or past the other
    bound (seen: [0.038, -0.0007] after one epoch); what trains, infers and deploys is the range
    with zero inside and at least MIN_LEARNED_WIDTH wide."""
    quantizer = LSQQuantizer(num_bits=4)
    _, variables = _variables(quantizer, (None, 8), "activation")
    variables["min_var"].assign(stored[0])
    variables["max_var"].assign(stored[1])
    variables["steps"].assign(1.0)
    low, high = (float(keras.ops.convert_to_numpy(end)) for end in quantizer.range_of(variables))
    assert (low, high) == (float(np.float32(deployed[0])), float(np.float32(deployed[1])))
    x = np.random.default_rng(3).uniform(-0.1, 0.6, (4, 8)).astype(np.float32)
    out = keras.ops.convert_to_numpy(quantizer(x, False, variables))
    np.testing.assert_array_equal(out, tf_fake_quant(x, low, high, 4, narrow_range=False))


def test_pact_bounds_get_the_gradient_of_the_values_they_clip():
    quantizer = PACTQuantizer(num_bits=3)
    _, variables = _variables(quantizer, (None, 16), "activation")
    variables["min_var"].assign(-0.5)
    variables["max_var"].assign(1.0)
    variables["steps"].assign(1.0)
    x = np.linspace(-1.5, 2.0, 32, dtype=np.float32).reshape(2, 16)
    _, gradient = _gradient(quantizer, variables, x, "max_var")
    _, _, expected = tf_gradients(x, -0.5, 1.0, np.ones_like(x), 3, False, False)
    np.testing.assert_allclose(gradient, expected)


def test_a_range_nothing_set_starts_from_the_first_batch():
    quantizer = LSQQuantizer(num_bits=4)
    _, variables = _variables(quantizer, (None, 8), "activation")
    x = np.random.default_rng(1).uniform(0.0, 3.0, (4, 8)).astype(np.float32)
    quantizer(x, True, variables)
    assert float(keras.ops.convert_to_numpy(variables["max_var"])) == pytest.approx(float(x.max()))
    assert float(keras.ops.convert_to_numpy(variables["min_var"])) == 0.0
    assert variables["max_var"].trainable and variables["min_var"].trainable


def test_schemes_choose_the_quantizers_by_method():
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(L.Conv2D(4, 3, activation="relu", name="conv")(inputs))))
    for method, weights, activations in (("lsq", LSQQuantizer, LSQQuantizer), ("pact", kq.LastValueQuantizer, PACTQuantizer)):
        layer = kq.quantize_model(model, kq.NBitScheme(4, 4, method=method)).get_layer("quant_conv")
        ((_, weight_quantizer, _),) = layer.quantized_weights()
        assert type(weight_quantizer) is weights
        assert type(layer.output_target().source.quantizer) is activations
    with pytest.raises(ValueError, match="method must be one of auto, minmax, lsq, pact, got 'kl'"):
        kq.NBitScheme(4, 4, method="kl")


def _cnn():
    inputs = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    x = L.DepthwiseConv2D(3, name="dw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(L.ReLU(6.0, name="relu6")(x))
    return keras.Model(inputs, L.Dense(10, activation="softmax", name="classifier")(x))


@pytest.mark.slow
@pytest.mark.parametrize("method, weight_bits, activation_bits", [("lsq", 4, 4), ("pact", 4, 4), ("lsq", 2, 2)])
def test_learned_ranges_are_the_deployed_ranges(tmp_path, method, weight_bits, activation_bits):
    keras.utils.set_random_seed(0)
    images, labels = digits_data()
    model = kq.quantize_model(_cnn(), kq.NBitScheme(weight_bits, activation_bits, method=method))
    kq.calibrate(model, images[:256], method="mse")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights if v.name.endswith("_max")]
    model.fit(images[:512], labels[:512], epochs=1, batch_size=32, verbose=0)
    after = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights if v.name.endswith("_max")]
    assert before and any(not np.array_equal(a, b) for a, b in zip(after, before))  # learned

    x = images[1400:1600]
    want = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(runtime.load(save_artifact(model, tmp_path / "m.kqat")).run(x), want)
    onnx_report = compare(model, to_onnx(model, tmp_path / "m.onnx"), x)
    assert onnx_report.identical_fraction == 1.0 and onnx_report.max_step_difference == 0, str(onnx_report)
    if weight_bits >= 4:
        report = compare(model, to_tflite(model, tmp_path / "m.tflite").path, x)
        assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)

    saved = tmp_path / "m.keras"
    model.save(saved)
    loaded = keras.models.load_model(saved)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), want)
