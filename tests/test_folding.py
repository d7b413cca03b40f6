"""QuantizeFoldedBatchNorm: folded weights, training with batch statistics, freezing.

Oracles: TF's fake-quant op applied to the BN-folded kernel computed in NumPy, TF's own
convolution, and Keras's BatchNormalization layer for the training-mode statistics.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import ops as qops
from tests.conftest import assert_trains_alike, same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.api

EPSILON = 1e-3


def _model(kind: str, use_bias: bool, freeze=None, output_quantized=True):
    """``kind`` + BatchNormalization (+ a Flatten so that the BN output is not fused)."""
    if kind == "dense":
        inputs = keras.Input((12,))
        x = keras.layers.Dense(5, use_bias=use_bias, name="k")(inputs)
    else:
        inputs = keras.Input((7, 7, 4))
        if kind == "conv":
            x = keras.layers.Conv2D(6, 3, use_bias=use_bias, name="k")(inputs)
        else:
            x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=use_bias, name="k")(inputs)
    x = keras.layers.BatchNormalization(epsilon=EPSILON, name="bn")(x)
    if not output_quantized:
        x = keras.layers.ReLU(name="relu")(x)
    model = keras.Model(inputs, x)
    _randomize_batch_norm(model.get_layer("bn"))
    scheme = kq.Default8BitScheme(freeze_bn_after_steps=freeze)
    return kq.quantize_model(model, scheme)


def _randomize_batch_norm(bn, seed=1):
    rng = np.random.default_rng(seed)
    channels = bn.gamma.shape[0]
    bn.gamma.assign(rng.uniform(0.5, 2.0, channels).astype("float32") * rng.choice([-1, 1], channels))
    bn.beta.assign(rng.normal(size=channels).astype("float32"))
    bn.moving_mean.assign(rng.normal(size=channels).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, channels).astype("float32"))


def _folded(model):
    (layer,) = [l for l in model.layers if isinstance(l, kq.QuantizeFoldedBatchNorm)]
    return layer


def _inputs(model, batch=8, seed=0):
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _numpy_fold(folded):
    """The folded kernel and bias, in float32 NumPy, from the layer's variables.

    The BN factor is the layer's own, checked here against NumPy's ``gamma /
    sqrt(moving_variance + epsilon)`` to the float32 rounding of the two formulas: the layer
    computes ``gamma * rsqrt(...)`` in the backend, whose rsqrt is up to 2 ulp from the correctly
    rounded value on TensorFlow and JAX (NumPy's quotient up to 1), and one ulp of the factor
    can move a folded weight across a half step of its grid.
    """
    bn, layer = folded.batch_norm, folded.layer
    factor = to_numpy(folded._factor())
    numpy_factor = to_numpy(bn.gamma) / np.sqrt(to_numpy(bn.moving_variance) + np.float32(EPSILON))
    np.testing.assert_allclose(factor, numpy_factor, rtol=4 * np.finfo(np.float32).eps, atol=0)
    kernel = to_numpy(layer.kernel)
    shaped = factor.reshape(kernel.shape[-2:]) if isinstance(layer, keras.layers.DepthwiseConv2D) else factor
    bias = to_numpy(layer.bias) if layer.use_bias else np.float32(0)
    return kernel * shaped, to_numpy(bn.beta) + (bias - to_numpy(bn.moving_mean)) * factor


def _tf_layer_output(layer, x, kernel, bias):
    """The deployed computation with TF's own ops: conv/depthwise/matmul, plus the bias."""
    import tensorflow as tf

    if isinstance(layer, keras.layers.Dense):
        out = tf.matmul(x, kernel)
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        out = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")
    else:
        out = tf.nn.conv2d(x, kernel, strides=1, padding="VALID")
    return out.numpy() + bias


@pytest.mark.parametrize("use_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_inference_quantizes_the_folded_weights_as_deployed(kind, use_bias):
    model = _model(kind, use_bias, output_quantized=False)
    folded = _folded(model)
    x = _inputs(model)
    model(x, training=True)  # the weight quantizer observes the folded kernel
    kernel, bias = _numpy_fold(folded)
    (_, quantizer, variables), = folded.quantized_weights()
    lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
    per_channel = kind != "dense"  # the default scheme: per-channel conv, per-tensor Dense
    if per_channel:
        assert lo.shape == (kernel.shape[-1] * (kernel.shape[-2] if kind == "depthwise" else 1),)
    else:
        assert lo.shape == ()
    flat = kernel.reshape(kernel.shape[:-2] + (-1,)) if kind == "depthwise" else kernel
    want_kernel = tf_fake_quant(flat, lo, hi, 8, True, -1 if per_channel else None).reshape(kernel.shape)
    assert same_bits(to_numpy(folded.folded_kernel()), want_kernel)
    assert not same_bits(want_kernel, kernel)

    want = _tf_layer_output(folded.layer, x, want_kernel, bias)
    with qops.exporting():  # the fake-quant graph, as the converter reads it
        got = to_numpy(folded(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["kernel", "output"], ids=["divides_kernel", "divides_output"])
def divided(request, monkeypatch):
    """Which tensor training divides by the BN factor (the smaller one, normally): both."""
    monkeypatch.setattr(kq.QuantizeFoldedBatchNorm, "_divides_kernel", lambda self, inputs: request.param == "kernel")
    return request.param


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate_ops"])
@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_training_normalizes_with_batch_statistics_as_keras_batch_norm_does(kind, fused, divided, monkeypatch):
    """With batch statistics the output is BN(conv(x, q(w f)) / f + b), and the moving
    statistics move as Keras's BatchNormalization moves them on that tensor, whether the
    normalization runs as one fused kernel (TensorFlow, large tensors; forced here) or not,
    and whether the kernel or the output is divided by f."""
    if fused and keras.backend.backend() != "tensorflow":
        pytest.skip("the fused kernel is TensorFlow's")
    monkeypatch.setattr(qops, "_FUSED_BATCH_NORM_MIN_ELEMENTS", 0 if fused else float("inf"))
    model = _model(kind, use_bias=True, output_quantized=False)
    folded = _folded(model)
    x = _inputs(model)
    bn = folded.batch_norm
    reference = keras.layers.BatchNormalization(epsilon=EPSILON, momentum=bn.momentum)
    reference.build(tuple(folded.compute_output_shape(x.shape)))
    reference.set_weights(bn.get_weights())

    folded(x, training=True)  # a first step moves the statistics away from their start
    reference.set_weights(bn.get_weights())
    kernel, _ = _numpy_fold(folded)  # folded with the statistics this step starts from
    factor = to_numpy(folded._factor())
    got = to_numpy(folded(x, training=True))

    (_, _, variables), = folded.quantized_weights()  # the range this step observed
    lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
    flat = kernel.reshape(kernel.shape[:-2] + (-1,)) if kind == "depthwise" else kernel
    quantized_kernel = tf_fake_quant(flat, lo, hi, 8, True, None if kind == "dense" else -1).reshape(kernel.shape)
    raw = _tf_layer_output(folded.layer, x, quantized_kernel, 0.0) / factor + to_numpy(folded.layer.bias)
    want = to_numpy(reference(raw, training=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(bn.moving_mean), to_numpy(reference.moving_mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(bn.moving_variance), to_numpy(reference.moving_variance), rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("kind", ["conv", "depthwise"])
def test_training_hands_the_kernel_and_factor_to_the_quantizer_with_the_products_results(kind, divided, monkeypatch):
    """The quantizer given the kernel and the BN factor (its kernels multiply inside) trains
    as the quantizer given their product: the same output, ranges and moving statistics, bit
    for bit, and on TensorFlow the same gradients, over three steps."""
    model = _model(kind, use_bias=True, output_quantized=False)
    folded = _folded(model)
    x = _inputs(model)
    quantizer_class = type(folded.weight_quantizer)
    assert_trains_alike(folded, x, [
        lambda: monkeypatch.setattr(quantizer_class, "takes_channel_factor", True),
        lambda: monkeypatch.setattr(quantizer_class, "takes_channel_factor", False),
    ])


def test_freezing_batch_statistics_makes_training_compute_the_deployed_output(divided):
    model = _model("conv", use_bias=True, freeze=2, output_quantized=False)
    folded = _folded(model)
    x = _inputs(model)
    before = to_numpy(folded.batch_norm.moving_mean)
    first = to_numpy(folded(x, training=True))
    assert not np.array_equal(to_numpy(folded.batch_norm.moving_mean), before), "steps before freezing update"
    folded(x, training=True)
    frozen_mean = to_numpy(folded.batch_norm.moving_mean)
    training = to_numpy(folded(x, training=True))
    assert np.array_equal(to_numpy(folded.batch_norm.moving_mean), frozen_mean)
    with qops.exporting():  # inference as fake quantization (not the integer kernel)
        assert same_bits(training, to_numpy(folded(x, training=False)))
    assert not np.allclose(first, training)


def test_the_output_quantizer_follows_the_normalization():
    model = _model("conv", use_bias=False, output_quantized=True)
    folded = _folded(model)
    x = _inputs(model)
    model(x, training=True)
    (quantizer, variables), = folded.output_quantizers()
    lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
    unquantized = kq.QuantizeFoldedBatchNorm(
        folded.layer, folded.batch_norm, folded.weight_quantizer, None
    )
    unquantized.kernel_vars = folded.kernel_vars
    unquantized.output_vars, unquantized.bn_steps, unquantized.built = None, None, True
    (input_layer,) = [l for l in model.layers if isinstance(l, kq.QuantizeLayer)]
    with qops.exporting():  # fake quantization in inference, as TF's ops compute it
        quantized_x = input_layer(x, training=False)
        want = tf_fake_quant(to_numpy(unquantized(quantized_x, training=False)), lo, hi, 8, False)
        assert same_bits(to_numpy(model(x, training=False)), want)


def test_folded_models_save_and_load_bit_identically(tmp_path):
    model = _model("depthwise", use_bias=True, freeze=3)
    x = _inputs(model)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros_like(to_numpy(model(x))), epochs=2, verbose=0)
    path = tmp_path / "folded.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert same_bits(to_numpy(loaded(x, training=False)), to_numpy(model(x, training=False)))
    for ours, theirs in zip(model.weights, loaded.weights):
        assert np.array_equal(to_numpy(ours), to_numpy(theirs))


@pytest.mark.parametrize(
    "kwargs,message",
    [({"freeze_bn_after_steps": -1}, "freeze_bn_after_steps"), ({"fold_batch_norm": 1}, "fold_batch_norm")],
)
def test_scheme_transform_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kq.Default8BitScheme(**kwargs)
