"""quantized_weights: the integers, scales and zero points of every quantized weight.

Oracle: TF's fake-quant op applied to the (folded) weight on the quantizer's range; the
integers must reproduce it bit for bit through ``dequantize``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export.weights import QuantizedTensor, quantized_weights, real_weights
from tests.conftest import same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.api
L = keras.layers


def _model():
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(6, 3, name="conv")(inputs)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(4, name="dense")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_integers_reproduce_the_fake_quantized_weights_bit_for_bit(bits):
    model = kq.quantize_model(_model(), kq.NBitScheme(weight_bits=bits, activation_bits=8, per_axis=True))
    model(np.random.default_rng(0).normal(size=(4, 8, 8, 2)).astype("float32"), training=True)
    tensors = quantized_weights(model)
    assert set(tensors) == {"quant_conv/kernel", "quant_depthwise/kernel", "quant_dense/kernel"}
    for name, tensor in tensors.items():
        assert isinstance(tensor, QuantizedTensor) and tensor.bits == bits
        assert tensor.values.dtype == (np.int8 if bits <= 8 else np.int16)
        assert tensor.values.min() >= -(2 ** (bits - 1)) + 1 and tensor.values.max() <= 2 ** (bits - 1) - 1
        np.testing.assert_array_equal(tensor.zero_point, 0)  # symmetric narrow range
        layer = model.get_layer(name.split("/")[0])
        if isinstance(layer, kq.QuantizeFoldedBatchNorm):
            weight, variables = to_numpy(layer.folded_kernel(training=False)), layer.kernel_vars
            # The layer's own factor: it is gamma * rsqrt(variance + epsilon) in the backend's
            # rsqrt, which NumPy does not reproduce to the last bit, and at 16 bits one ulp of
            # the factor can move a weight across a half step. The factor's formula is checked
            # against NumPy in test_real_weights_are_what_quantization_rounds.
            oracle_input = _numpy_folded_kernel(layer, to_numpy(layer._factor()))
        else:
            (kernel, _, variables), = layer.quantized_weights()
            weight, oracle_input = None, to_numpy(kernel)
        lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
        axis = (-2, -1) if "depthwise" in name else -1
        want = tf_fake_quant(oracle_input, lo, hi, bits, True, axis)
        assert same_bits(tensor.dequantize(), want), name
        if weight is not None:
            assert same_bits(weight, want)
        channels = lo.shape[0]
        assert tensor.scale.shape == (channels,)
        per_channel = tensor.values.reshape(-1, channels)
        assert max(len(np.unique(per_channel[:, c])) for c in range(channels)) <= 2**bits


def _numpy_folded_kernel(folded, factor=None):
    """The folded kernel in NumPy, with ``gamma / sqrt(moving_variance + epsilon)`` unless
    ``factor`` is given."""
    bn = folded.batch_norm
    if factor is None:
        factor = to_numpy(bn.gamma) / np.sqrt(to_numpy(bn.moving_variance) + np.float32(bn.epsilon))
    kernel = to_numpy(folded.layer.kernel)
    return kernel * factor.reshape(kernel.shape[-2:])


def test_per_tensor_weights_have_one_scale():
    model = kq.quantize_model(_model())  # Default8BitScheme: Dense per tensor
    model(np.ones((2, 8, 8, 2), "float32"), training=True)
    dense = quantized_weights(model)["quant_dense/kernel"]
    assert dense.axis is None and dense.scale.shape == () and dense.values.dtype == np.int8
    (kernel, _, variables), = model.get_layer("quant_dense").quantized_weights()
    want = tf_fake_quant(to_numpy(kernel), to_numpy(variables["min_var"]), to_numpy(variables["max_var"]), 8, True)
    assert same_bits(dense.dequantize(), want)


def test_nan_in_a_weight_names_the_layer():
    model = kq.quantize_model(_model())
    kernel = model.get_layer("quant_conv").layer.kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match="layer 'quant_conv'.*NaN or Inf"):
        quantized_weights(model)


@pytest.mark.parametrize("bits", [4, 8])
def test_real_weights_are_what_quantization_rounds(bits):
    """TF's fake quantization of each real weight, on its layer's range, is the deployed weight."""
    model = kq.quantize_model(_model(), kq.NBitScheme(weight_bits=bits, activation_bits=8, per_axis=True))
    model(np.random.default_rng(1).normal(size=(4, 8, 8, 2)).astype("float32"), training=True)
    real, quantized = real_weights(model), quantized_weights(model)
    assert set(real) == set(quantized)
    for name, values in real.items():
        layer = model.get_layer(name.split("/")[0])
        variables = layer.kernel_vars if isinstance(layer, kq.QuantizeFoldedBatchNorm) else layer.quantized_weights()[0][2]
        lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
        axis = (-2, -1) if "depthwise" in name else -1
        assert same_bits(tf_fake_quant(values, lo, hi, bits, True, axis), quantized[name].dequantize()), name
    folded = model.get_layer("quant_depthwise")
    np.testing.assert_allclose(real["quant_depthwise/kernel"], _numpy_folded_kernel(folded), rtol=1e-6)
