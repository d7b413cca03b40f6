"""quantize_annotate_* / quantize_apply / quantize_model / quantize_scope: behaviour and errors."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

import keras_qat as kq
from tests.conftest import same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.api


def _wrappers(model):
    return {layer.layer.name: layer for layer in model.layers if isinstance(layer, kq.QuantizeWrapper)}


def _random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# ---- what gets quantized ----------------------------------------------------------------


@pytest.mark.parametrize("kernel_layer", ["conv", "dense"])
def test_kernel_followed_by_a_separate_relu_still_quantizes_its_weights(kernel_layer):
    inputs = keras.Input((6, 6, 2))
    if kernel_layer == "conv":
        x = keras.layers.Conv2D(3, 3, name="k")(inputs)
    else:
        x = keras.layers.Dense(3, name="k")(keras.layers.Flatten()(inputs))
    outputs = keras.layers.ReLU(name="relu")(x)
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    wrapper = _wrappers(quantized)["k"]
    (kernel, quantizer, variables), = wrapper.quantized_weights()
    quantized(_random((4, 6, 6, 2)), training=True)
    lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
    axis = -1 if kernel_layer == "conv" else None  # the default scheme: per-channel conv, per-tensor Dense
    want = tf_fake_quant(to_numpy(kernel), lo, hi, 8, True, axis)
    assert same_bits(to_numpy(quantizer(kernel, False, variables)), want)
    assert not same_bits(want, to_numpy(kernel)), "the weights must change under 8-bit quantization"


@keras.saving.register_keras_serializable(package="keras_qat_tests")
class SplitLayer(keras.layers.Layer):
    """A custom layer with two outputs of different scale."""

    def call(self, inputs):
        return inputs * 0.5, inputs * 40.0

    def compute_output_shape(self, input_shape):
        return input_shape, input_shape


class TwoOutputConfig(kq.QuantizeConfig):
    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [kq.MovingAverageQuantizer(num_bits=8), kq.MovingAverageQuantizer(num_bits=4)]

    def get_config(self):
        return {}


def test_a_layer_with_two_outputs_gets_two_output_quantizers_with_separate_ranges():
    inputs = keras.Input((5,))
    low, high = kq.quantize_annotate_layer(SplitLayer(name="split"), TwoOutputConfig())(inputs)
    model = keras.Model(inputs, [keras.layers.Identity()(low), keras.layers.Identity()(high)])
    with kq.quantize_scope({"TwoOutputConfig": TwoOutputConfig, "SplitLayer": SplitLayer}):
        quantized = kq.quantize_apply(model)
    x = np.abs(_random((16, 5))) + 0.1
    out_low, out_high = (to_numpy(t) for t in quantized(x, training=True))
    outputs = _wrappers(quantized)["split"].output_quantizers()
    assert len(outputs) == 2
    (q_low, v_low), (q_high, v_high) = outputs
    assert v_low["min_var"].path.endswith("output_0_min") and v_high["min_var"].path.endswith("output_1_min")
    assert float(to_numpy(v_low["max_var"])) == pytest.approx(float(x.max()) * 0.5)
    assert float(to_numpy(v_high["max_var"])) == pytest.approx(float(x.max()) * 40.0)
    assert same_bits(out_low, tf_fake_quant(x * 0.5, 0.0, x.max() * 0.5, 8, False))
    assert same_bits(out_high, tf_fake_quant(x * 40.0, 0.0, x.max() * 40.0, 4, False))


def test_model_inputs_feeding_quantized_layers_are_quantized_once():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3, name="a")(inputs)
    b = keras.layers.Dense(3, name="b")(inputs)
    quantized = kq.quantize_model(keras.Model(inputs, keras.layers.Add(name="add")([a, b])))
    input_layers = [layer for layer in quantized.layers if isinstance(layer, kq.QuantizeLayer)]
    assert len(input_layers) == 1


def test_unannotated_layers_stay_float_and_weights_are_copied_not_shared():
    inputs = keras.Input((4,))
    first = keras.layers.Dense(3, name="first")
    hidden = kq.quantize_annotate_layer(keras.layers.Dense(3, name="second"))(first(inputs))
    model = keras.Model(inputs, hidden)
    quantized = kq.quantize_apply(model)
    names = {type(layer).__name__: layer for layer in quantized.layers}
    assert "Dense" in names and set(_wrappers(quantized)) == {"second"}
    float_copy = next(l for l in quantized.layers if l.name == "first")
    assert float_copy is not first
    assert np.array_equal(to_numpy(float_copy.kernel), to_numpy(first.kernel))
    float_copy.kernel.assign(np.zeros((4, 3), "float32"))
    assert not np.allclose(to_numpy(first.kernel), 0), "the original model must not change"


def test_nested_models_are_quantized_inside():
    inner_inputs = keras.Input((6,))
    inner = keras.Model(inner_inputs, keras.layers.Dense(4, name="inner_dense")(inner_inputs), name="inner")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2, name="outer_dense")(inner(inputs))
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    nested = next(layer for layer in quantized.layers if isinstance(layer, keras.Model))
    assert set(_wrappers(nested)) == {"inner_dense"} and set(_wrappers(quantized)) == {"outer_dense"}
    assert quantized.predict(_random((3, 6)), verbose=0).shape == (3, 2)


def test_sequential_models_are_accepted():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    quantized = kq.quantize_model(model)
    assert len(_wrappers(quantized)) == 2
    np.testing.assert_allclose(quantized.predict(_random((2, 5)), verbose=0).shape, (2, 2))


# ---- schemes -------------------------------------------------------------------------------


def test_default_scheme_is_tflite_int8():
    scheme = kq.Default8BitScheme()
    conv = scheme.config_for(keras.layers.Conv2D(4, 3))
    dense = scheme.config_for(keras.layers.Dense(4))
    for config, per_axis in ((conv, True), (dense, False)):
        weight = config.weight_quantizer
        assert (weight.num_bits, weight.symmetric, weight.narrow_range, weight.per_axis) == (8, True, True, per_axis)
        activation = config.activation_quantizer
        assert isinstance(activation, kq.MovingAverageQuantizer) and not activation.symmetric
    assert isinstance(scheme.config_for(keras.layers.MaxPooling2D()), kq.NoOpQuantizeConfig)
    assert isinstance(scheme.config_for(keras.layers.Reshape((2, 2))), kq.NoOpQuantizeConfig)
    assert scheme.config_for(keras.layers.Add()).output_quantizer is not None
    softmax = scheme.config_for(keras.layers.Activation("softmax")).output_quantizer
    assert isinstance(softmax, kq.FixedQuantizer) and (softmax.init_min, softmax.init_max) == (0.0, 255 / 256)
    transposed = scheme.config_for(keras.layers.Conv2DTranspose(4, 3)).weight_quantizer
    assert transposed.axis == -2, "a transposed conv's output channels are on axis -2"


def test_n_bit_scheme_mixes_precisions_by_name_and_type():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="first")(inputs)
    x = keras.layers.Conv2D(4, 3, name="middle")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, name="last")(x)
    scheme = kq.NBitScheme(
        weight_bits=4,
        activation_bits=4,
        overrides={"first": {"weight_bits": 8, "activation_bits": 8}, keras.layers.Dense: {"weight_bits": 8}},
    )
    quantized = kq.quantize_model(keras.Model(inputs, outputs), scheme=scheme)
    wrappers = _wrappers(quantized)
    bits = {name: w.quantized_weights()[0][1].num_bits for name, w in wrappers.items() if w.quantized_weights()}
    assert bits == {"first": 8, "middle": 4, "last": 8}
    activation_bits = {name: w.activation_quantizers()[0].quantizer.num_bits for name, w in wrappers.items() if w.activation_quantizers()}
    assert activation_bits == {"first": 8, "middle": 4, "last": 4}
    assert wrappers["middle"].quantized_weights()[0][1].per_axis


def test_an_override_of_none_keeps_a_layer_float():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="keep")(keras.layers.Dense(3, name="q")(inputs))
    quantized = kq.quantize_model(keras.Model(inputs, outputs), scheme=kq.NBitScheme(4, 4, overrides={"keep": None}))
    assert set(_wrappers(quantized)) == {"q"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(weight_bits=1), "weight_bits"),
        (dict(activation_bits=17), "activation_bits"),
        (dict(overrides={"x": {"bits": 4}}), "unknown settings"),
        (dict(overrides={"x": 4}), "dict of settings"),
        (dict(overrides={3: None}), "layer names or layer classes"),
    ],
)
def test_scheme_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kq.NBitScheme(**kwargs)


# ---- serialization ----------------------------------------------------------------------


def test_save_and_load_restore_weights_ranges_and_outputs(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    quantized = kq.quantize_model(keras.Model(inputs, outputs), scheme=kq.NBitScheme(4, 6))
    quantized.compile("adam", "sparse_categorical_crossentropy")
    x_data = _random((32, 8, 8, 1))
    quantized.fit(x_data, np.arange(32) % 3, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    quantized.save(path)
    for loader in (lambda: keras.models.load_model(path), lambda: _load_in_scope(path)):
        restored = loader()
        assert len(restored.variables) == len(quantized.variables)
        for a, b in zip(restored.variables, quantized.variables):
            assert a.path.endswith(b.name) and np.array_equal(to_numpy(a), to_numpy(b)), (a.path, b.path)
        assert same_bits(restored.predict(x_data, verbose=0), quantized.predict(x_data, verbose=0))


def _load_in_scope(path):
    with kq.quantize_scope():
        return keras.models.load_model(path)


# ---- bad input --------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_qat_tests")
class Unknown(keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0


def test_a_layer_no_scheme_supports_names_the_layer_and_the_ways_out():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, Unknown(name="mystery")(keras.layers.Dense(3)(inputs)))
    with pytest.raises(ValueError, match=r"'mystery' \(Unknown\) is not supported.*quantize_config=.*float"):
        kq.quantize_model(model)


class WrongCountConfig(TwoOutputConfig):
    def get_output_quantizers(self, layer):
        return [kq.MovingAverageQuantizer()] * 3


class MissingWeightConfig(TwoOutputConfig):
    def get_weights_and_quantizers(self, layer):
        return [(keras.Variable(np.zeros(3)), kq.LastValueQuantizer())]


@pytest.mark.parametrize(
    "config,message",
    [
        (WrongCountConfig(), r"returned 3 quantizers, but the layer has 2 outputs"),
        (MissingWeightConfig(), r"not a weight of the layer"),
    ],
)
def test_a_config_that_does_not_fit_its_layer_is_explained(config, message):
    inputs = keras.Input((5,))
    low, high = kq.quantize_annotate_layer(SplitLayer(name="split"), config)(inputs)
    model = keras.Model(inputs, [low, high])
    with pytest.raises(ValueError, match=rf"for layer 'split'.*{message}"):
        kq.quantize_apply(model)


def test_quantize_apply_without_annotations_says_what_to_do():
    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match="no annotated layer.*quantize_annotate_layer.*quantize_model"):
        kq.quantize_apply(keras.Model(inputs, keras.layers.Dense(2)(inputs)))


class Subclassed(keras.Model):
    def __init__(self, annotate=False, **kwargs):
        super().__init__(**kwargs)
        dense = keras.layers.Dense(2, name="hidden")
        self.dense = kq.quantize_annotate_layer(dense) if annotate else dense

    def call(self, inputs):
        return self.dense(inputs)


def test_a_subclassed_model_is_rejected_with_how_to_annotate():
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match=r"subclassed Model.*functional API.*keras\.Input"):
        kq.quantize_model(model)


def test_an_annotated_layer_inside_a_subclassed_model_is_rejected():
    inner = Subclassed(annotate=True, name="block")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    with pytest.raises(ValueError, match=r"annotated layer 'hidden' is inside 'block', a subclassed Model"):
        kq.quantize_apply(model)


def test_annotating_a_model_as_a_layer_is_rejected():
    with pytest.raises(ValueError, match="is a Model"):
        kq.quantize_annotate_layer(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


def test_plain_operations_in_the_graph_are_accepted():
    """keras.applications' MobileNetV3 writes ``x + 3.0`` between layers: no layer to wrap
    (its quantization is tested with the transforms)."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="d")(inputs)
    outputs = keras.layers.ReLU(name="r")(x + 3.0)
    quantized = kq.quantize_model(keras.Model(inputs, outputs))
    assert set(_wrappers(quantized)) == {"d", "r"}
    assert quantized.predict(_random((2, 4)), verbose=0).shape == (2, 3)


def test_a_conv3d_model_trains_with_per_channel_weights():
    """TF's per-channel fake-quant gradient takes rank <= 4; 3-D kernels use the fused kernel."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 4, 2))
    x = keras.layers.Conv3D(3, 2, name="conv3d")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    q = kq.quantize_model(model, kq.NBitScheme(4, 8, per_axis=True))
    q.compile("adam", "mse")
    rng = np.random.default_rng(0)
    history = q.fit(rng.normal(size=(8, 4, 4, 4, 2)).astype("float32"), rng.normal(size=(8, 2)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert tuple(q.get_layer("quant_conv3d").quantized_weights()[0][2]["min_var"].shape) == (3,)


# ---- rough edges a new user hits (issue 10) ---------------------------------------------------


def _three_layer_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv_first")(inputs)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_an_override_naming_no_layer_of_the_model_is_refused_listing_its_layers():
    model = _three_layer_model()
    scheme = kq.NBitScheme(4, 4, overrides={"conv_frist": {"weight_bits": 8}, "head": None})
    with pytest.raises(ValueError) as info:
        kq.quantize_model(model, scheme=scheme)
    message = str(info.value)
    assert "unknown" in message and "'conv_frist'" in message
    assert "'head'" not in message.split("unknown")[1].split(";")[0], "a known name is not reported as unknown"
    for name in ("conv_first", "flat", "head"):
        assert f"'{name}'" in message
    # The same names spelled right are taken, and do what they say.
    fixed = kq.quantize_model(model, scheme=kq.NBitScheme(4, 4, overrides={"conv_first": {"weight_bits": 8}, "head": None}))
    assert _wrappers(fixed)["conv_first"].quantized_weights()[0][1].num_bits == 8
    assert "head" not in _wrappers(fixed)


def test_an_override_may_name_a_layer_of_a_nested_model():
    inner_inputs = keras.Input((4,))
    inner = keras.Model(inner_inputs, keras.layers.Dense(3, name="inner_dense")(inner_inputs), name="block")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="outer")(inner(inputs)))
    quantized = kq.quantize_model(model, scheme=kq.NBitScheme(4, 4, overrides={"inner_dense": {"weight_bits": 8}}))
    nested = _wrappers(quantized.get_layer("block"))
    assert nested["inner_dense"].quantized_weights()[0][1].num_bits == 8
    with pytest.raises(ValueError, match=r"nested model\(s\) \['block'\].*name that model's layers.*'inner_dense'"):
        kq.quantize_model(model, scheme=kq.NBitScheme(4, 4, overrides={"block": None}))


def test_quantizing_a_quantized_model_says_it_is_already_quantized():
    quantized = kq.quantize_model(_three_layer_model())
    for quantize in (kq.quantize_model, kq.quantize_annotate_model):
        with pytest.raises(ValueError, match=r"already quantized") as info:
            quantize(quantized)
        assert "QuantizeConfig" not in str(info.value)
        assert "float model" in str(info.value)
    with pytest.raises(ValueError, match=r"already quantized"):
        kq.quantize_annotate_layer(quantized.layers[1])  # the input's QuantizeLayer
    annotated = keras.models.clone_model(quantized, clone_function=lambda layer: kq.QuantizeAnnotate(layer) if isinstance(layer, kq.QuantizeWrapper) else layer)
    with pytest.raises(ValueError, match=r"already quantized"):
        kq.quantize_apply(annotated)


def test_every_unsupported_layer_is_reported_at_once_with_its_way_out():
    inner_inputs = keras.Input((3,))
    inner = keras.Model(inner_inputs, Unknown(name="mystery_c")(inner_inputs), name="block")
    inputs = keras.Input((3,))
    x = Unknown(name="mystery_a")(keras.layers.Dense(3, name="fc")(inputs))
    x = Unknown(name="mystery_b")(x)
    model = keras.Model(inputs, inner(x))
    with pytest.raises(ValueError) as info:
        kq.quantize_model(model)
    message = str(info.value)
    assert "3 layers" in message
    for name in ("mystery_a", "mystery_b", "mystery_c"):
        assert re.search(rf"'{name}' \(Unknown\).*quantize_config=.*overrides=\{{'{name}': None\}}", message), message
    assert sorted(info.value.layers) == ["mystery_a", "mystery_b", "mystery_c"]


def _lambda_model(middle):
    inputs = keras.Input((6,), name="features")
    x = keras.layers.Dense(5, name="fc")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(middle(x)))


def _calibrated(model, x):
    model(x, training=True)
    return model


def test_a_lambda_layer_is_refused_with_a_replacement_that_saves_safely_and_exports(tmp_path):
    from keras_qat import runtime
    from keras_qat.export import save_artifact

    lambda_model = _lambda_model(keras.layers.Lambda(lambda t: keras.activations.swish(t), name="swish_fn"))
    with pytest.raises(ValueError) as info:
        kq.quantize_model(lambda_model)
    message = str(info.value)
    assert "'swish_fn' (Lambda)" in message and "safe_mode" in message
    assert "overrides={'swish_fn': None}" not in message, "keeping a Lambda float does not load in safe mode"
    assert "keras.layers.Activation('swish')" in message
    # The way out, as the message gives it: the built-in layer that computes the same.
    replaced = _lambda_model(keras.layers.Activation("swish", name="swish_fn"))
    x = _random((64, 6), seed=1)
    quantized = _calibrated(kq.quantize_model(replaced), x)
    quantized.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras", safe_mode=True)
    want = to_numpy(quantized(x, training=False))
    assert same_bits(to_numpy(loaded(x, training=False)), want)
    integer_model = runtime.load(save_artifact(loaded, tmp_path / "q.kqat"))
    steps = np.abs(integer_model.run(x) - want) / float(integer_model.output_grids[0].scale)
    assert np.rint(steps).max() <= 1


class TwoDense(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(5, name="hidden")
        self.act = keras.layers.ReLU(name="act")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, inputs):
        return self.head(self.act(self.hidden(inputs)))


def test_a_subclassed_model_is_refused_with_a_functional_rebuild_that_quantizes_and_exports(tmp_path):
    from keras_qat import runtime
    from keras_qat.export import save_artifact

    model = TwoDense(name="two_dense")
    x = _random((64, 4), seed=2)
    float_outputs = to_numpy(model(x))
    with pytest.raises(ValueError) as info:
        kq.quantize_model(model)
    message = str(info.value)
    assert "keras.Input" in message and "keras.Model(inputs, outputs)" in message
    assert "QuantizeWrapper" not in message, "a subclassed model of QuantizeWrappers exports nowhere"
    # The way out, as the message gives it: call the model's own layers on a keras.Input.
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, model.head(model.act(model.hidden(inputs))))
    assert same_bits(to_numpy(functional(x)), float_outputs), "the rebuilt model keeps the trained weights"
    quantized = _calibrated(kq.quantize_model(functional), x)
    want = to_numpy(quantized(x, training=False))
    integer_model = runtime.load(save_artifact(quantized, tmp_path / "q.kqat"))
    steps = np.abs(integer_model.run(x) - want) / float(integer_model.output_grids[0].scale)
    assert np.rint(steps).max() <= 1

