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


def test_plain_arithmetic_on_quantized_tensors_gets_an_output_quantizer():
    """MobileNetV3's hard-swish, ``x * relu6(x + 3) * (1 / 6)``, written with keras.ops."""
    inputs = keras.Input((6,))
    x = L.Dense(6, name="d")(inputs)
    gate = L.ReLU(6.0, name="relu6")(x + 3.0) * (1.0 / 6.0)
    outputs = L.Multiply(name="swish")([x, gate])
    untouched = keras.ops.reshape(inputs, (-1, 3, 2))  # moves values only: stays as it is
    quantized = kq.quantize_model(keras.Model(inputs, [outputs, untouched]))
    added = [l for l in quantized.layers if isinstance(l, kq.QuantizeLayer) and l.name.endswith("_output")]
    assert len(added) == 1, "x + 3.0 fuses into the ReLU6; only the scaling by 1/6 gets a quantizer"
    x_in = np.random.default_rng(0).normal(size=(8, 6)).astype("float32") * 4
    quantized(x_in, training=True)
    probe = keras.Model(quantized.inputs[0], added[0].output)
    out = to_numpy(probe(x_in, training=False))
    variables = added[0].quantizer_vars
    assert same_bits(to_numpy(qops.fake_quant(out, variables["min_var"], variables["max_var"])), out)
    assert len(np.unique(out)) > 1


def test_separable_conv_is_deployed_as_depthwise_and_pointwise_with_a_quantizer_between():
    import tensorflow as tf

    from tests.conftest import tf_fake_quant

    inputs = keras.Input((9, 9, 3))
    outputs = L.SeparableConv2D(5, 3, depth_multiplier=2, activation="relu", name="sep")(inputs)
    model = keras.Model(inputs, outputs)
    quantized = kq.quantize_model(model)
    depthwise = _layer(quantized, "sep_depthwise")
    pointwise = _layer(quantized, "sep_pointwise")
    assert _quantizes_output(depthwise) and _quantizes_output(pointwise)
    x = np.random.default_rng(0).normal(size=(4, 9, 9, 3)).astype("float32")
    quantized(x, training=True)

    def weight(wrapper):
        (kernel, _, v), = wrapper.quantized_weights()
        k = to_numpy(kernel)
        flat = k.reshape(k.shape[:-2] + (-1,)) if k.shape[-1] != to_numpy(v["min_var"]).shape[0] else k
        return tf_fake_quant(flat, to_numpy(v["min_var"]), to_numpy(v["max_var"]), 8, True, -1).reshape(k.shape)

    def range_of(wrapper):
        quantizer = wrapper.activation_quantizers()[0]
        return to_numpy(quantizer.quantizer_vars["min_var"]), to_numpy(quantizer.quantizer_vars["max_var"])

    (input_layer,) = [l for l in quantized.layers if isinstance(l, kq.QuantizeLayer)]
    with qops.exporting():  # fake quantization in inference, as TF's ops compute it
        xq = to_numpy(input_layer(x, training=False))
        got = to_numpy(quantized(x, training=False))
    middle = tf.nn.depthwise_conv2d(xq, weight(depthwise), [1, 1, 1, 1], "VALID").numpy()
    middle = tf_fake_quant(middle, *range_of(depthwise), 8, False)
    out = tf.nn.relu(tf.nn.conv2d(middle, weight(pointwise), 1, "VALID") + to_numpy(pointwise.layer.bias)).numpy()
    want = tf_fake_quant(out, *range_of(pointwise), 8, False)
    steps = np.abs(got - want) / ((range_of(pointwise)[1] - range_of(pointwise)[0]) / 255)
    assert np.max(steps) <= 1.0001 and np.mean(steps < 0.5) >= 0.99
    np.testing.assert_allclose(
        to_numpy(model(x)), got, atol=float(range_of(pointwise)[1] - range_of(pointwise)[0]) / 8
    )


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "tanh", "swish"])
def test_an_activation_tflite_cannot_fuse_is_split_from_its_kernel(activation):
    """The kernel's output is quantized before the activation, which gets its own range."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    outputs = L.Dense(4, activation=activation, name="dense")(inputs)
    model = keras.Model(inputs, outputs)
    quantized = kq.quantize_model(model)
    kernel = [l for l in quantized.layers if isinstance(l, kq.QuantizeWrapper) and l.layer.name == "dense"][0]
    act = _layer(quantized, "dense_activation")
    assert kq.schemes.base.activation_name(kernel.activation_quantizers()[0].activation) == "linear"
    assert _quantizes_weights(kernel) and _quantizes_output(kernel) and _quantizes_output(act)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(quantized(x)), atol=0.1)


def test_rescaling_with_scale_and_offset_quantizes_the_tensor_between_them():
    """Deployed as an integer MUL then ADD, each with an output scale (MobileNetV3's input)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = L.Dense(3, name="d")(L.Rescaling(1 / 127.5, -1.0, name="rescale")(inputs))
    model = keras.Model(inputs, outputs)
    quantized = kq.quantize_model(model)
    assert _quantizes_output(_layer(quantized, "rescale_scale")) and _quantizes_output(_layer(quantized, "rescale_offset"))
    x = np.random.default_rng(0).random((8, 4)).astype("float32") * 255
    quantized(x, training=True)
    np.testing.assert_allclose(to_numpy(quantized(x)), to_numpy(model(x)), atol=0.1)


def _conv_avgpool_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    outputs = L.AveragePooling2D(2, name="avgpool")(x)
    return kq.quantize_model(keras.Model(inputs, outputs))


def test_average_pooling_keeps_its_inputs_range_and_saves(tmp_path):
    quantized = _conv_avgpool_model()
    avgpool = quantized.get_layer("quant_avgpool")
    assert isinstance(avgpool, kq.QuantizeSameScale)
    assert not _quantizes_output(_layer(quantized, "conv"))
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    quantized(x, training=True)
    quantized.save(tmp_path / "avgpool.keras")
    restored = keras.models.load_model(tmp_path / "avgpool.keras")
    assert same_bits(to_numpy(restored(x, training=False)), to_numpy(quantized(x, training=False)))


def test_average_pooling_rounds_as_the_integer_kernel_does():
    """Oracle: integer arithmetic on the signed int8 codes, as TFLite's AVERAGE_POOL_2D:
    sum the 2x2 window, divide rounding half away from zero."""
    quantized = _conv_avgpool_model()
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    quantized(x, training=True)
    avgpool = quantized.get_layer("quant_avgpool")
    variables = avgpool.quantizer_vars
    grid = qops.nudge(variables["min_var"], variables["max_var"], 8, False)
    scale, zero = float(to_numpy(grid.scale)), int(to_numpy(grid.zero_point)) - 128
    conv_out = keras.Model(quantized.inputs[0], quantized.get_layer("quant_conv").output)(x, training=False)
    codes_in = np.rint(to_numpy(qops.fake_quant(conv_out, variables["min_var"], variables["max_var"])) / scale).astype(np.int64) + zero
    windows = codes_in.reshape(16, 3, 2, 3, 2, 4).sum(axis=(2, 4))
    expected = np.sign(windows) * ((np.abs(windows) + 2) // 4)
    got = np.rint(to_numpy(quantized(x, training=False)) / scale).astype(np.int64) + zero
    np.testing.assert_array_equal(got, expected)
    assert np.any((windows % 4 == 2) & (windows < 0)), "the data must contain ties below zero"


def _readme_four_bit_model(fold: bool) -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(6, 3, name="conv_first")(inputs)
    if fold:
        x = L.BatchNormalization(name="bn_first")(x)
    x = L.ReLU(name="relu_first")(x)
    x = L.Conv2D(6, 3, name="conv_middle")(x)
    x = L.ReLU(name="relu_middle")(x)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(10, name="classifier")(x))


@pytest.mark.parametrize("fold", [False, True], ids=["conv_relu", "conv_bn_relu"])
def test_a_per_layer_override_reaches_the_fused_relu_that_quantizes_the_layers_output(fold):
    """The README's 4-bit example: ``conv_first`` at 8 bits. Its output is quantized by the
    ReLU fused after it; that quantizer (the grid the output lies on) takes the override's
    activation bits, and the output has more than the 16 values of a 4-bit grid."""
    from keras_qat import linking

    eight = {"weight_bits": 8, "activation_bits": 8}
    scheme = kq.NBitScheme(weight_bits=4, activation_bits=4, overrides={"conv_first": eight, L.Dense: eight})
    quantized = kq.quantize_model(_readme_four_bit_model(fold), scheme=scheme)
    first, middle = _layer(quantized, "conv_first"), _layer(quantized, "conv_middle")
    assert not _quantizes_output(first), "the ReLU after it quantizes its output"
    assert linking.source_of(first.output).quantizer.num_bits == 8
    assert linking.source_of(middle.output).quantizer.num_bits == 4, "the other layers keep the scheme's bits"

    x = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype("float32")
    quantized(x, training=True)
    relu_first = keras.Model(quantized.input, _layer(quantized, "relu_first").output)
    relu_middle = keras.Model(quantized.input, _layer(quantized, "relu_middle").output)
    assert len(np.unique(to_numpy(relu_first(x, training=False)))) > 16
    assert len(np.unique(to_numpy(relu_middle(x, training=False)))) <= 16


def test_a_fused_relu_with_an_override_of_its_own_keeps_it():
    eight, six = {"activation_bits": 8}, {"activation_bits": 6}
    scheme = kq.NBitScheme(4, 4, overrides={"conv_first": eight, "relu_first": six})
    quantized = kq.quantize_model(_readme_four_bit_model(False), scheme=scheme)
    from keras_qat import linking

    assert linking.source_of(_layer(quantized, "conv_first").output).quantizer.num_bits == 6


def test_an_override_reaches_the_layers_a_split_makes_of_its_layer():
    """A SeparableConv is split into depthwise and pointwise halves, a Dense with a softmax into
    the Dense and the softmax: an override of the original layer governs every part."""
    inputs = keras.Input((8, 8, 2))
    x = L.SeparableConv2D(4, 3, name="sep")(inputs)
    x = L.Flatten(name="flat")(x)
    outputs = L.Dense(3, activation="softmax", name="classifier")(x)
    eight = {"weight_bits": 8, "activation_bits": 8}
    scheme = kq.NBitScheme(4, 4, overrides={"sep": eight, "classifier": eight})
    quantized = kq.quantize_model(keras.Model(inputs, outputs), scheme=scheme)
    weight_bits = {l.name: l.quantized_weights()[0][1].num_bits for l in quantized.layers if isinstance(l, kq.QuantizeWrapper) and l.quantized_weights()}
    assert weight_bits == {"quant_sep_depthwise": 8, "quant_sep_pointwise": 8, "quant_classifier": 8}
    from keras_qat import linking

    for name in ("quant_sep_depthwise", "quant_sep_pointwise", "quant_classifier", "quant_classifier_activation"):
        assert linking.source_of(quantized.get_layer(name).output).quantizer.num_bits == 8, name


def test_an_override_may_name_a_part_of_a_split_layer():
    inputs = keras.Input((8, 8, 2))
    outputs = L.Flatten(name="flat")(L.SeparableConv2D(4, 3, name="sep")(inputs))
    scheme = kq.NBitScheme(4, 4, overrides={"sep_pointwise": {"weight_bits": 8}})
    quantized = kq.quantize_model(keras.Model(inputs, outputs), scheme=scheme)
    bits = {name: quantized.get_layer(f"quant_sep_{name}").quantized_weights()[0][1].num_bits for name in ("depthwise", "pointwise")}
    assert bits == {"depthwise": 4, "pointwise": 8}
