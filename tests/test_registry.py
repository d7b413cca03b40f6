"""keras_qat.registry: one table of layer kinds, read by the schemes, transforms and exporters."""

from __future__ import annotations

import keras
import pytest

import keras_qat as kq
from keras_qat.config import NoOpQuantizeConfig
from keras_qat.registry import KINDS, clamp_activation, is_last_axis_softmax, kind_of, supported_type_names

pytestmark = pytest.mark.api
L = keras.layers


def test_each_keras_type_has_one_kind():
    types = [t for kind in KINDS for t in kind.types]
    assert len(types) == len(set(types))
    assert supported_type_names() == sorted({t.__name__ for t in types})


@pytest.mark.parametrize(
    "layer,name,role",
    [
        (L.Dense(3), "dense", "kernel"),
        (L.Conv1DTranspose(2, 3), "conv_transpose", "kernel"),
        (L.DepthwiseConv2D(3), "depthwise_conv", "kernel"),
        (L.AveragePooling2D(2), "average_pool", "same_scale"),
        (L.UpSampling2D(interpolation="nearest"), "upsampling", "moves"),
        (L.UpSampling2D(interpolation="bilinear"), "upsampling_2d", "compute"),
        (L.Flatten(), "reshape", "moves"),
    ],
)
def test_kinds(layer, name, role):
    kind = kind_of(layer)
    assert (kind.name, kind.role) == (name, role)


def test_a_subclass_is_not_taken_for_its_parent():
    class MyDense(L.Dense):
        pass

    assert kind_of(MyDense(3)) is None
    assert kq.Default8BitScheme().config_for(MyDense(3)) is None


def test_the_scheme_config_follows_the_kind():
    scheme = kq.NBitScheme(4, 4)
    transposed = scheme.config_for(L.Conv2DTranspose(2, 3))
    assert transposed.weight_quantizer.axis == -2 and transposed.weight_quantizer.num_bits == 4
    assert scheme.config_for(L.SeparableConv2D(2, 3)).weight_attrs == ("depthwise_kernel", "pointwise_kernel")
    assert isinstance(scheme.config_for(L.MaxPooling2D()), NoOpQuantizeConfig)
    assert scheme.config_for(L.Softmax()).output_quantizer.init_min == 0.0


@pytest.mark.parametrize(
    "layer,clamp",
    [
        (L.ReLU(), "relu"),
        (L.ReLU(6.0), "relu6"),
        (L.Activation("relu"), "relu"),
        (L.ReLU(negative_slope=0.1), None),
        (L.ReLU(3.0), None),
        (L.Activation("tanh"), None),
        (L.LeakyReLU(), None),
    ],
)
def test_clamp_activations_are_only_relu_and_relu6(layer, clamp):
    assert clamp_activation(layer) == clamp


@pytest.mark.parametrize(
    "make,folds",
    [
        (lambda: L.Conv2D(4, 3), True),
        (lambda: L.DepthwiseConv2D(3), True),
        (lambda: L.Dense(4), True),
        (lambda: L.Conv2DTranspose(4, 3), False),
    ],
)
def test_a_following_batch_norm_folds_into_foldable_kinds_only(make, folds):
    inputs = keras.Input((8, 8, 3))
    x = make()(inputs)
    outputs = L.BatchNormalization()(x)
    model = kq.quantize_model(keras.Model(inputs, outputs))
    folded = [layer for layer in model.layers if isinstance(layer, kq.QuantizeFoldedBatchNorm)]
    assert len(folded) == int(folds)
    assert kind_of(make()).foldable is folds


@pytest.mark.parametrize(
    "layer, expected",
    [
        (keras.layers.Softmax(), True),
        (keras.layers.Activation("softmax"), True),
        (keras.layers.Softmax(axis=1), False),
        (keras.layers.Softmax(axis=None), False),  # over every element, the batch included
        (keras.layers.Activation("relu"), False),
    ],
)
def test_the_integer_softmax_is_over_the_last_axis(layer, expected):
    assert is_last_axis_softmax(layer) is expected
