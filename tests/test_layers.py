"""QuantizeWrapper and the layer a QuantizeConfig sees.

A tfmot program written for Keras 2 reads and sets Keras 2 attribute names in its
QuantizeConfig (``layer.depthwise_kernel`` of a DepthwiseConv2D, which Keras 3 calls
``kernel``). Oracle: TF's fake-quant op on the float kernel with the trained range, run
through the float layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.compat import tfmot
from tests.conftest import assert_trains_alike, same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.api
L = keras.layers


class Keras2DepthwiseConfig(tfmot.quantization.keras.QuantizeConfig):
    """A tfmot config as written for Keras 2's DepthwiseConv2D/1D."""

    def get_weights_and_quantizers(self, layer):
        assert isinstance(layer, (L.DepthwiseConv2D, L.DepthwiseConv1D)), "the view is still the layer's type"
        quantizer = kq.LastValueQuantizer(num_bits=4, per_axis=False, symmetric=True, narrow_range=True)
        return [(layer.depthwise_kernel, quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        layer.depthwise_kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


@pytest.mark.parametrize("layer_type,shape", [(L.DepthwiseConv2D, (2, 6, 6, 3)), (L.DepthwiseConv1D, (2, 7, 3))])
def test_a_keras2_config_reads_and_sets_depthwise_kernel(layer_type, shape):
    keras.utils.set_random_seed(0)
    layer = layer_type(3, depth_multiplier=2, name="dw")
    wrapper = kq.QuantizeWrapper(layer, Keras2DepthwiseConfig())
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    got = to_numpy(wrapper(x, training=True))
    ((weight, quantizer, variables),) = wrapper.quantized_weights()
    assert weight is layer.kernel
    kernel = to_numpy(layer.kernel)
    fake = tf_fake_quant(kernel, to_numpy(variables["min_var"]), to_numpy(variables["max_var"]), 4, True)
    reference = layer_type(3, depth_multiplier=2, name="reference")
    reference.build(shape)
    reference.set_weights([fake, to_numpy(layer.bias)])
    want = to_numpy(reference(x))
    assert same_bits(got, want)
    assert not np.allclose(got, to_numpy(layer(x))), "the quantized kernel is used, not the float one"
    assert not hasattr(layer, "depthwise_kernel") or layer.depthwise_kernel is layer.kernel


def test_keras2_names_are_offered_only_where_keras3_renamed_them():
    """A name that the layer has neither in Keras 3 nor under a Keras 2 alias is still an error."""

    class ReadsMissing(Keras2DepthwiseConfig):
        def get_weights_and_quantizers(self, layer):
            return [(layer.pointwise_kernel, kq.LastValueQuantizer())]

    wrapper = kq.QuantizeWrapper(L.DepthwiseConv2D(3, name="dw"), ReadsMissing())
    with pytest.raises(AttributeError, match="pointwise_kernel"):
        wrapper(np.zeros((1, 5, 5, 2), "float32"))


def _dense_with_ranges(model, name: str, seed: int) -> None:
    """Set ``name``'s kernel to -1/0/1 on a [-1, 1] weight range, no bias."""
    layer = model.get_layer(name)
    (_, _, kernel_range), = layer.quantized_weights()
    kernel_range["min_var"].assign(keras.ops.full(kernel_range["min_var"].shape, -1.0))
    kernel_range["max_var"].assign(keras.ops.full(kernel_range["max_var"].shape, 1.0))
    layer.layer.kernel.assign(np.random.default_rng(seed).choice([-1.0, 0.0, 1.0], (4, 6)).astype("float32"))
    layer.layer.bias.assign(np.zeros(6, "float32"))


@pytest.mark.skipif(not kq.ops.exact_integer_arithmetic(), reason="exact inference needs int64/float64 on the backend")
@pytest.mark.parametrize("consumer", ["relu", "concatenate"])
def test_inference_leaves_values_on_the_grid_their_producer_requantized_them_onto(tmp_path, consumer):
    """A ReLU fused into the Dense before it runs no op in the deployed model, and a
    Concatenate of two Dense outputs concatenates codes: each Dense requantizes onto the
    consumer's grid. The QAT model's inference leaves those values as they are. Fake-quantizing
    them again moved values: a symmetric 4-bit range (here one LSQ learned on JAX) puts the
    zero point within float32 rounding of a tie, which TF's nudging breaks one way (codes
    -8..7) and the converter's arithmetic of the deployed grid the other (-7..8), so the
    deployed top code came back one step lower. Oracle: the .kqat runtime (exact integers)."""
    from keras_qat import runtime
    from keras_qat.export import save_artifact

    inputs = keras.Input((4,), name="x")
    if consumer == "relu":
        outputs = keras.layers.ReLU(name="consumer")(keras.layers.Dense(6, name="fc")(inputs))
    else:
        branches = [keras.layers.Dense(6, name=name)(inputs) for name in ("fc", "fc_2")]
        outputs = keras.layers.Concatenate(name="consumer")(branches)
    model = kq.quantize_model(keras.Model(inputs, outputs), kq.schemes.NBitScheme(4, 4))
    model.get_layer("quantize_x").quantizer_vars["min_var"].assign(-4.0)
    model.get_layer("quantize_x").quantizer_vars["max_var"].assign(4.0)
    (_, consumer_range), = model.get_layer("quant_consumer").output_quantizers()
    consumer_range["min_var"].assign(-5.3692946)
    consumer_range["max_var"].assign(5.3692946)
    for seed, layer in enumerate(layer for layer in model.layers if layer.name.startswith("quant_fc")):
        _dense_with_ranges(model, layer.name, seed)
    x = np.random.default_rng(1).uniform(-4, 4, (256, 4)).astype("float32")

    want = runtime.load(save_artifact(model, tmp_path / "model.kqat")).run(x)
    got = keras.ops.convert_to_numpy(model.predict(x, batch_size=len(x), verbose=0))
    top = runtime.load(tmp_path / "model.kqat").output_grids[0].dequantize(np.array(7))
    assert np.any(want == top) and top > 5.3692946, "the data must reach the deployed grid's top code, beyond TF's"
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not kq.ops.exact_integer_arithmetic(), reason="exact inference needs int64/float64 on the backend")
def test_a_relu_called_twice_clamps_both_inputs():
    """A ReLU shared by two branches: only one of its inputs could have been requantized for it,
    and the graph records only its latest call, so inference runs it on both (here the first
    branch is the model input's quantizer, which does not clamp)."""
    inputs = keras.Input((4,), name="x")
    relu = keras.layers.ReLU(name="shared")
    outputs = keras.layers.Concatenate(name="cat")([relu(inputs), relu(keras.layers.Dense(4, name="fc")(inputs))])
    model = kq.quantize_model(keras.Model(inputs, outputs))
    x = np.random.default_rng(0).uniform(-4, 4, (64, 4)).astype("float32")
    got = keras.ops.convert_to_numpy(model(x, training=False))
    assert got.min() >= 0.0, "a negative value passed the shared ReLU"


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_a_relu_layer_hands_its_activation_to_its_quantizer_with_the_same_training(activation, monkeypatch):
    """In training a ReLU/ReLU6 layer leaves its activation to its output quantizer (whose
    kernel keeps a byte per element for the backward pass) and the model trains as when the
    layer runs it: the same outputs, variables and, on TensorFlow, gradients, over three
    steps, bit for bit."""
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.BatchNormalization(gamma_initializer=keras.initializers.Constant(5.0))(x)  # many values above 6
    x = (L.ReLU(6.0) if activation == "relu6" else L.Activation("relu"))(x)
    x = L.Conv2D(5, 1)(x)
    model = kq.quantize_model(keras.Model(inputs, x))
    relu = [layer for layer in model.layers if isinstance(layer, kq.QuantizeWrapper) and kq.registry.clamp_activation(layer.layer)]
    assert len(relu) == 1
    data = np.random.default_rng(4).normal(size=(8, 6, 6, 3)).astype("float32") * 3
    quantizer_class = kq.quantizers._RangeQuantizer
    probe = keras.ops.ones((8, 6, 6, 4))
    assert relu[0]._quantizes_activation_itself(probe, True) is (keras.backend.backend() == "tensorflow")
    monkeypatch.setattr(quantizer_class, "takes_activation", False)
    assert not relu[0]._quantizes_activation_itself(probe, True)
    assert_trains_alike(model, data, [
        lambda: monkeypatch.setattr(quantizer_class, "takes_activation", True),
        lambda: monkeypatch.setattr(quantizer_class, "takes_activation", False),
    ])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras compiles TensorFlow steps with XLA on request")
def test_a_step_compiled_with_xla_trains_as_the_graph_step():
    """Keras compiles the whole training step with XLA where asked (``jit_compile=True``; its
    default on GPUs): the shared range updates, the byte-per-element fake quant and the
    per-channel kernels then run inside one compiled step. It moves the ranges and the moving
    statistics as the uncompiled step does; XLA's convolutions round differently, so up to
    float32 rounding of values near 1."""
    inputs = keras.Input((32, 32, 3))
    x = L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = L.ReLU(6.0)(L.BatchNormalization()(x))  # 8 x 32 x 32 x 16: the large-tensor kernels
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Add()([x, L.ReLU()(L.BatchNormalization()(x))])
    outputs = L.Dense(4)(L.GlobalAveragePooling2D()(x))
    rng = np.random.default_rng(6)
    data, labels = rng.normal(size=(8, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 8)
    states = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(3)
        model = kq.quantize_model(keras.Model(inputs, outputs))
        model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
        model.fit(data, labels, batch_size=8, epochs=2, verbose=0)
        states.append({v.path: to_numpy(v) for v in model.non_trainable_variables})
    assert states[0].keys() == states[1].keys()
    for path in states[0]:
        np.testing.assert_allclose(states[1][path], states[0][path], rtol=1e-5, atol=1e-6, err_msg=path)
