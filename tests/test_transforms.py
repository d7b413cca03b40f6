"""The graph transforms that quantize_apply carries out: folding, activation fusion, concat."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import ops as qops
from tests.conftest import same_bits, to_numpy

pytestmark = pytest.mark.api
L = keras.layers


def _layer(model, name):
    """The quantized layer that stands for the original layer ``name``."""
    for layer in model.layers:
        if getattr(getattr(layer, "layer", None), "name", None) == name:
            return layer
    raise KeyError(name)


def _quantizes_output(layer) -> bool:
    if isinstance(layer, kq.QuantizeWrapper):
        return bool(layer.output_quantizers() or layer.activation_quantizers())
    return bool(layer.output_quantizers())


def _quantizes_weights(layer) -> bool:
    return bool(layer.quantized_weights())


def test_conv_batch_norm_relu_is_one_folded_layer_quantized_after_the_relu():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    outputs = L.ReLU(6.0, name="relu")(x)
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    folded = _layer(quantized, "conv")
    assert isinstance(folded, kq.QuantizeFoldedBatchNorm) and folded.batch_norm.name == "bn"
    assert _quantizes_weights(folded) and not _quantizes_output(folded)
    assert _quantizes_output(_layer(quantized, "relu"))
    assert not any(getattr(getattr(l, "layer", None), "name", None) == "bn" for l in quantized.layers)


@pytest.mark.parametrize("activation", [L.ReLU(name="act"), L.Activation("relu", name="act"), L.ReLU(6.0, name="act")])
def test_a_separate_relu_quantizes_once_and_the_weights_stay_quantized(activation):
    inputs = keras.Input((8, 8, 3))
    outputs = activation(L.Conv2D(4, 3, name="conv")(inputs))
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    conv = _layer(quantized, "conv")
    assert _quantizes_weights(conv) and not _quantizes_output(conv)
    assert _quantizes_output(_layer(quantized, "act"))


def test_add_followed_by_relu_is_quantized_after_the_relu():
    inputs = keras.Input((6,))
    a = L.Dense(6, name="a")(inputs)
    added = L.Add(name="add")([a, inputs])
    outputs = L.ReLU(name="relu")(added)
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    assert not _quantizes_output(_layer(quantized, "add"))
    assert _quantizes_output(_layer(quantized, "a"))  # feeds Add, not an activation
    assert _quantizes_output(_layer(quantized, "relu"))


def test_leaky_relu_and_sigmoid_are_not_fused():
    inputs = keras.Input((6,))
    leaky = L.LeakyReLU(name="leaky")(L.Dense(6, name="d1")(inputs))
    outputs = L.Activation("sigmoid", name="sig")(L.Dense(6, name="d2")(leaky))
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    assert _quantizes_output(_layer(quantized, "d1")) and _quantizes_output(_layer(quantized, "d2"))


def test_concatenated_inputs_share_the_concatenation_range():
    inputs = keras.Input((6,))
    small = L.Dense(3, activation="relu", name="small")(inputs)
    large = L.Dense(3, name="large", kernel_initializer=keras.initializers.Constant(5.0))(inputs)
    outputs = L.Concatenate(name="concat")([small, large])
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    assert not _quantizes_output(_layer(quantized, "small"))
    assert not _quantizes_output(_layer(quantized, "large"))
    concat = _layer(quantized, "concat")
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    quantized(x, training=True)
    (_, variables), = concat.output_quantizers()
    lo, hi = variables["min_var"], variables["max_var"]
    out = to_numpy(quantized(x, training=False))
    # Both halves lie on the one grid of the concatenation's range.
    assert same_bits(to_numpy(qops.fake_quant(out, lo, hi)), out)


def test_a_tensor_with_two_consumers_or_a_model_output_keeps_its_quantizer():
    inputs = keras.Input((8, 8, 3))
    shared = L.Conv2D(4, 3, name="shared")(inputs)
    out_a = L.ReLU(name="relu_a")(shared)
    out_b = L.MaxPooling2D(name="pool")(shared)
    visible = L.Conv2D(4, 3, name="visible")(inputs)
    out_c = L.ReLU(name="relu_c")(visible)
    bn_input = L.Conv2D(4, 3, name="conv_bn")(inputs)
    out_d = L.BatchNormalization(name="bn")(bn_input)
    model = keras.Model(inputs, [out_a, out_b, visible, out_c, out_d, bn_input])
    quantized = kq.quantize_model(model)
    assert _quantizes_output(_layer(quantized, "shared"))
    assert _quantizes_output(_layer(quantized, "visible"))
    assert isinstance(_layer(quantized, "conv_bn"), kq.QuantizeWrapper)  # its output is a model output
    assert isinstance(_layer(quantized, "bn"), kq.QuantizeWrapper)


def test_layers_with_a_users_config_are_left_alone():
    inputs = keras.Input((8, 8, 3))
    config = kq.LayerQuantizeConfig(
        weight_attrs=["kernel"],
        weight_quantizer=kq.LastValueQuantizer(num_bits=4, per_axis=True, symmetric=True),
        activation_attrs=["activation"],
        activation_quantizer=kq.MovingAverageQuantizer(num_bits=4),
    )
    x = kq.quantize_annotate_layer(L.Conv2D(4, 3, name="conv"), config)(inputs)
    x = kq.quantize_annotate_layer(L.BatchNormalization(name="bn"))(x)
    outputs = kq.quantize_annotate_layer(L.ReLU(name="relu"))(x)
    quantized = kq.quantize_apply(keras.Model(inputs, outputs))
    assert isinstance(_layer(quantized, "conv"), kq.QuantizeWrapper)
    assert _quantizes_output(_layer(quantized, "conv"))
    assert not _quantizes_output(_layer(quantized, "bn"))  # the BN still fuses into the ReLU


@pytest.mark.parametrize("fold,fuse", [(False, True), (True, False), (False, False)])
def test_transforms_can_be_turned_off(fold, fuse):
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    outputs = L.ReLU(name="relu")(x)
    scheme = kq.Default8BitScheme(fold_batch_norm=fold, fuse_activations=fuse)
    quantized = kq.quantize_model(keras.Model(inputs, outputs), scheme)
    assert isinstance(_layer(quantized, "conv"), kq.QuantizeFoldedBatchNorm) == fold
    last = _layer(quantized, "conv") if fold else _layer(quantized, "bn")
    assert _quantizes_output(last) == (not fuse)


def test_sequential_models_are_transformed_too():
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn"), L.ReLU(name="relu")]
    )
    quantized = kq.quantize_model(model)
    assert isinstance(_layer(quantized, "conv"), kq.QuantizeFoldedBatchNorm)
    assert not _quantizes_output(_layer(quantized, "conv"))
