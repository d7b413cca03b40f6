"""keras_qat.calibrate: every range set from data before training, and weight ranges from the
weights when a model is quantized.

Oracles: NumPy's min, max and percentile of the values each quantizer sees; TF's fake-quant op
for the quantization error the MSE method minimises.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from tests.conftest import digits_cnn, digits_data, tf_fake_quant

L = keras.layers


def _dense_model():
    inputs = keras.Input((6,), name="x")
    return keras.Model(inputs, L.Dense(3, name="dense")(inputs))


def _ranges(layer, prefix):
    return tuple(float(np.asarray(keras.ops.convert_to_numpy(v))) for v in layer.weights if v.name in (f"{prefix}_min", f"{prefix}_max"))


def test_minmax_sets_the_input_range_to_the_data_and_zero():
    model = kq.quantize_model(_dense_model())
    x = np.random.default_rng(0).uniform(0.5, 3.0, (100, 6)).astype("float32")
    report = kq.calibrate(model, x, batch_size=30)
    assert report.batches == 4 and report.method == "minmax"
    quantize = model.get_layer("quantize_x")
    low, high = (float(keras.ops.convert_to_numpy(v)) for v in (quantize.quantizer_vars["min_var"], quantize.quantizer_vars["max_var"]))
    assert (low, high) == (0.0, float(x.max()))  # the range holds zero


def test_weight_ranges_are_the_weights_per_channel_from_the_start():
    model = kq.quantize_model(_dense_model(), kq.NBitScheme(8, 8, per_axis=True))
    layer = model.get_layer("quant_dense")
    ((kernel, quantizer, variables),) = layer.quantized_weights()
    kernel = np.asarray(keras.ops.convert_to_numpy(kernel))
    bound = np.abs(kernel).max(axis=0)  # symmetric, per output channel
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variables["max_var"]), bound, rtol=1e-6)
    assert np.all(keras.ops.convert_to_numpy(variables["min_var"]) < 0)


def test_percentile_ignores_the_outliers_it_is_told_to():
    model = kq.quantize_model(_dense_model())
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 6)).astype("float32")
    kq.calibrate(model, (x, None), method="percentile", percentile=99.0, batch_size=500)
    quantize = model.get_layer("quantize_x")
    high = float(keras.ops.convert_to_numpy(quantize.quantizer_vars["max_var"]))
    low = float(keras.ops.convert_to_numpy(quantize.quantizer_vars["min_var"]))
    assert high == pytest.approx(np.percentile(x, 99.0), rel=1e-5)
    assert low == pytest.approx(np.percentile(x, 1.0), rel=1e-5)


def test_mse_clipping_quantizes_with_less_error_than_minmax_at_two_bits():
    """2-bit per-channel weights of a heavy-tailed (Laplace) kernel: min/max spends the four
    levels on the tails; the MSE range clips them."""
    rng = np.random.default_rng(2)
    inputs = keras.Input((512,), name="x")
    model = keras.Model(inputs, L.Dense(16, name="dense")(inputs))
    model.get_layer("dense").kernel.assign(rng.laplace(size=(512, 16)).astype("float32"))
    errors = {}
    for method in ("minmax", "mse"):
        quantized = kq.quantize_model(model, kq.NBitScheme(2, 8))
        kq.calibrate(quantized, rng.normal(size=(8, 512)).astype("float32"), method=method)
        ((kernel, _, variables),) = quantized.get_layer("quant_dense").quantized_weights()
        kernel = np.asarray(keras.ops.convert_to_numpy(kernel))
        low, high = (np.asarray(keras.ops.convert_to_numpy(variables[k])) for k in ("min_var", "max_var"))
        errors[method] = float(np.mean((tf_fake_quant(kernel, low, high, 2, True, axis=-1) - kernel) ** 2))
    assert errors["mse"] < 0.7 * errors["minmax"], errors


def test_a_moving_average_continues_from_the_calibrated_range():
    model = kq.quantize_model(_dense_model())
    x = np.random.default_rng(3).uniform(-1.0, 1.0, (64, 6)).astype("float32")
    kq.calibrate(model, x, batch_size=16)
    variables = model.get_layer("quantize_x").quantizer_vars
    assert float(keras.ops.convert_to_numpy(variables["steps"])) == 4.0
    calibrated = float(keras.ops.convert_to_numpy(variables["max_var"]))
    model(x[:16] * 10.0, training=True)  # one training batch ten times wider moves it by 1/5
    moved = float(keras.ops.convert_to_numpy(variables["max_var"]))
    assert calibrated < moved < 10.0 * calibrated * 0.5


@pytest.mark.slow
def test_a_calibrated_model_is_a_sound_post_training_quantized_model():
    """The digits CNN, trained in float: before any QAT step, W8A8 is within a point of float
    and W4A8 (MSE clipping, bias correction) within three, the issue's bar for calibration."""
    keras.utils.set_random_seed(0)
    images, labels = digits_data()
    model = digits_cnn()
    # Adam(1e-2) fitted the training digits (loss 0.07) yet held out 73% on one CPU family,
    # not a model worth quantizing; 5e-3 holds out 90%.
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss="sparse_categorical_crossentropy")
    model.fit(images[:1400], labels[:1400], epochs=20, batch_size=32, verbose=0)

    def accuracy(m):
        return float(np.mean(np.argmax(keras.ops.convert_to_numpy(m(images[1400:], training=False)), -1) == labels[1400:]))

    float_accuracy = accuracy(model)
    w8a8 = kq.quantize_model(model)
    kq.calibrate(w8a8, images[:1400], steps=10)
    w4a8 = kq.quantize_model(model, kq.NBitScheme(4, 8))
    kq.calibrate(w4a8, images[:1400], steps=10, method="mse")
    assert float_accuracy >= 0.8  # a model worth quantizing
    assert accuracy(w8a8) >= float_accuracy - 0.01
    assert accuracy(w4a8) >= float_accuracy - 0.03


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "kl"}, "method must be one of minmax, percentile, mse"),
        ({"bias_correction": 1}, "bias_correction must be True or False"),
        ({"method": "percentile", "percentile": 40}, r"percentile must be a number in \(50, 100\]"),
        ({"steps": 0}, "steps must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused_naming_what_is_allowed(kwargs, match):
    model = kq.quantize_model(_dense_model())
    with pytest.raises(ValueError, match=match):
        kq.calibrate(model, np.zeros((4, 6), "float32"), **kwargs)


def test_data_without_a_batch_is_refused():
    model = kq.quantize_model(_dense_model())
    with pytest.raises(ValueError, match="gave no batch"):
        kq.calibrate(model, np.zeros((0, 6), "float32"))
