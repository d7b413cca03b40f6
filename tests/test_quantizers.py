"""The four quantizers: variables, per-axis layouts, range rules, training vs inference."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import quantizers as kqq
from tests.conftest import QuantizerHost, same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.numerics

ALL_QUANTIZERS = (
    kq.LastValueQuantizer,
    kq.MovingAverageQuantizer,
    kq.AllValuesQuantizer,
    kq.FixedQuantizer,
)

# (layer, input shape, expected channel count of its kernel's per-axis range)
KERNEL_LAYERS = {
    "Dense": (lambda: keras.layers.Dense(7), (None, 5), 7),
    "Conv1D": (lambda: keras.layers.Conv1D(6, 3), (None, 10, 4), 6),
    "Conv2D": (lambda: keras.layers.Conv2D(6, 3), (None, 10, 10, 4), 6),
    "Conv3D": (lambda: keras.layers.Conv3D(5, 3), (None, 6, 6, 6, 4), 5),
    "DepthwiseConv2D": (
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=3),
        (None, 10, 10, 4),
        4 * 3,
    ),
}


def _build(quantizer, tensor, name="kernel", layer=None):
    host = QuantizerHost(layer)
    return quantizer.build(tuple(tensor.shape), name, host), host


@pytest.mark.parametrize("layer_name", list(KERNEL_LAYERS))
@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS, ids=lambda c: c.__name__)
def test_per_axis_ranges_have_one_entry_per_output_channel(quantizer_cls, layer_name):
    make, input_shape, channels = KERNEL_LAYERS[layer_name]
    layer = make()
    layer.build(input_shape)
    quantizer = quantizer_cls(num_bits=4, per_axis=True, symmetric=True, narrow_range=True)
    weights, _ = _build(quantizer, layer.kernel, layer=layer)
    assert tuple(weights["min_var"].shape) == (channels,)
    assert tuple(weights["max_var"].shape) == (channels,)
    assert weights["min_var"].path.endswith("kernel_min")
    out = quantizer(layer.kernel, True, weights)
    lo, hi = to_numpy(weights["min_var"]), to_numpy(weights["max_var"])
    kernel = to_numpy(layer.kernel)
    axis = (-2, -1) if layer_name == "DepthwiseConv2D" else -1
    assert same_bits(to_numpy(out), tf_fake_quant(kernel, lo, hi, 4, True, axis))


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS, ids=lambda c: c.__name__)
def test_per_axis_on_any_axis_of_inputs_of_any_rank(quantizer_cls):
    rng = np.random.default_rng(3)
    for rank in range(1, 6):
        shape = tuple(range(2, 2 + rank))
        for axis in {0, rank - 1, -1} | ({1} if rank > 1 else set()):
            quantizer = quantizer_cls(num_bits=5, per_axis=True, axis=axis)
            x = rng.normal(size=shape).astype(np.float32)
            weights, _ = _build(quantizer, x, name="activation")
            assert tuple(weights["min_var"].shape) == (shape[axis],)
            out = to_numpy(quantizer(x, True, weights))
            want = tf_fake_quant(x, to_numpy(weights["min_var"]), to_numpy(weights["max_var"]), 5, False, axis)
            assert same_bits(out, want)


def test_per_axis_on_a_scalar_is_rejected_naming_the_tensor():
    with pytest.raises(ValueError, match=r"'bias'.*scalar"):
        kq.LastValueQuantizer(per_axis=True).build((), "bias", QuantizerHost(name="dense"))


def test_axis_out_of_range_names_the_layer_and_the_allowed_axes():
    with pytest.raises(ValueError, match=r"layer 'dense_q'.*axis=3 is out of range.*rank 2.*-2\.\.1"):
        kq.LastValueQuantizer(per_axis=True, axis=3).build((4, 5), "kernel", QuantizerHost(name="dense_q"))


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("num_bits", [1, 17, 4.5])
def test_num_bits_is_validated_on_construction(quantizer_cls, num_bits):
    with pytest.raises(ValueError, match=f"{quantizer_cls.__name__}: num_bits"):
        quantizer_cls(num_bits=num_bits)


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS, ids=lambda c: c.__name__)
def test_integer_inputs_are_rejected(quantizer_cls):
    quantizer = quantizer_cls()
    weights, _ = _build(quantizer, np.zeros((3,)))
    with pytest.raises(ValueError, match="floating point, got dtype int32"):
        quantizer(np.arange(3, dtype=np.int32), True, weights)


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_config_round_trips_through_keras_serialization(quantizer_cls, per_axis, symmetric):
    quantizer = quantizer_cls(num_bits=3, per_axis=per_axis, symmetric=symmetric, narrow_range=True)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(quantizer))
    assert restored == quantizer and type(restored) is quantizer_cls
    assert restored.get_config() == quantizer.get_config()


# ---- LastValue -------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_last_value_takes_the_batch_range_in_training_and_keeps_it_in_inference(symmetric):
    rng = np.random.default_rng(5)
    quantizer = kq.LastValueQuantizer(num_bits=6, per_axis=True, symmetric=symmetric)
    first = (rng.normal(size=(16, 4)) * [1, 2, 3, 4]).astype(np.float32)
    weights, _ = _build(quantizer, first)
    quantizer(first, True, weights)
    lo, hi = to_numpy(weights["min_var"]), to_numpy(weights["max_var"])
    batch_lo, batch_hi = np.minimum(first.min(0), 0), np.maximum(first.max(0), 0)
    if symmetric:
        m = np.maximum(-batch_lo, batch_hi / (62 / 64))
        np.testing.assert_allclose(lo, -m, rtol=1e-6)
        np.testing.assert_allclose(hi, m * 62 / 64, rtol=1e-6)
    else:
        assert np.array_equal(lo, batch_lo) and np.array_equal(hi, batch_hi)
    second = first * 10
    out = to_numpy(quantizer(second, False, weights))
    assert np.array_equal(to_numpy(weights["min_var"]), lo), "inference must not update the range"
    assert same_bits(out, tf_fake_quant(second, lo, hi, 6, False, -1))


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS + (kq.LSQQuantizer, kq.PACTQuantizer), ids=lambda c: c.__name__)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kernels", ["small", "fused"])
def test_a_channel_factor_quantizes_and_moves_the_range_as_the_product_would(quantizer_cls, symmetric, kernels, request):
    """``quantizer(w, training, vars, factor=f)``: the output, the range variables and the
    gradient of ``w`` are those of ``quantizer(w * f, ...)``, over three training steps and in
    inference, for a depthwise kernel's flattened channels (some factors negative); with
    TF's ops for small tensors, and with the training kernels that multiply inside."""
    if quantizer_cls is kq.PACTQuantizer and symmetric:
        pytest.skip("PACT learns an asymmetric clipping range")
    if kernels == "fused":
        request.getfixturevalue("fused_for_every_size")
    rng = np.random.default_rng(9)
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    layer.build((None, 8, 8, 3))
    quantizer = quantizer_cls(num_bits=5, per_axis=True, symmetric=symmetric)
    with_factor, host_a = _build(quantizer, layer.kernel, layer=layer)
    with_product, host_b = _build(quantizer, layer.kernel, layer=layer)
    factor = (10.0 ** rng.uniform(-1, 1, size=6) * [1, -1, 1, 1, -1, 1]).astype(np.float32)
    for step in range(4):
        kernel = (rng.normal(size=(3, 3, 3, 2)) * (step + 1)).astype(np.float32)
        training = step < 3
        got, d_got = _output_and_gradient(lambda w: quantizer(w, training, with_factor, factor=factor), kernel)
        want, d_want = _output_and_gradient(
            lambda w: quantizer(w * keras.ops.convert_to_tensor(factor.reshape(3, 2)), training, with_product), kernel
        )
        assert same_bits(got, want), step
        assert np.array_equal(d_got, d_want), step
        for key in with_product:
            assert same_bits(to_numpy(with_factor[key]), to_numpy(with_product[key])), (step, key)


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS + (kq.LSQQuantizer, kq.PACTQuantizer), ids=lambda c: c.__name__)
@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("kernels", ["small", "fused"])
def test_an_activation_quantizes_and_moves_the_range_as_its_output_would(quantizer_cls, activation, kernels, request):
    """``quantizer(x, training, vars, activation=a)``: the output, the range variables and the
    gradient of ``x`` are those of ``quantizer(a(x), ...)``, over three training steps and in
    inference; with TF's ops for small tensors, and with the training kernels that apply the
    activation inside."""
    if kernels == "fused":
        request.getfixturevalue("fused_for_every_size")
    rng = np.random.default_rng(10)
    quantizer = quantizer_cls(num_bits=6)
    shape = (4, 5, 5, 3)
    given_activation, _ = _build(quantizer, np.zeros(shape, np.float32), name="output")
    given_output, _ = _build(quantizer, np.zeros(shape, np.float32), name="output")
    apply = keras.ops.relu if activation == "relu" else keras.ops.relu6
    for step in range(4):
        x = (rng.normal(size=shape) * 4 + step).astype(np.float32)
        x.reshape(-1)[::7] = 0.0
        x.reshape(-1)[3::11] = 6.0
        training = step < 3
        got, d_got = _output_and_gradient(lambda v: quantizer(v, training, given_activation, activation=activation), x)
        want, d_want = _output_and_gradient(lambda v: quantizer(apply(v), training, given_output), x)
        assert same_bits(got, want), step
        assert np.array_equal(d_got, d_want), step
        for key in given_output:
            assert same_bits(to_numpy(given_activation[key]), to_numpy(given_output[key])), (step, key)


def _output_and_gradient(fn, x):
    """``fn(x)`` and the gradient of its sum with respect to ``x``, on the active backend."""
    if keras.backend.backend() == "jax":
        import jax

        out = fn(x)
        return to_numpy(out), np.asarray(jax.grad(lambda v: fn(v).sum())(x))
    if keras.backend.backend() == "torch":
        import torch

        value = torch.tensor(x, requires_grad=True)
        out = fn(value)
        out.sum().backward()
        return to_numpy(out.detach()), value.grad.numpy()
    import tensorflow as tf

    value = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(value)
        out = fn(value)
    return to_numpy(out), tape.gradient(out, value).numpy()


def test_an_activation_is_one_the_quantizer_can_apply():
    quantizer = kq.MovingAverageQuantizer()
    x = np.ones((4, 3), np.float32)
    weights, _ = _build(quantizer, x)
    with pytest.raises(ValueError, match="MovingAverageQuantizer: activation= must be one of"):
        quantizer(x, True, weights, activation="tanh")


def test_a_channel_factor_needs_a_per_axis_quantizer():
    quantizer = kq.LastValueQuantizer(per_axis=False)
    x = np.ones((4, 3), np.float32)
    weights, _ = _build(quantizer, x)
    with pytest.raises(ValueError, match="LastValueQuantizer: factor= scales the channels of a per-axis quantizer"):
        quantizer(x, True, weights, factor=np.ones(3, np.float32))


# ---- MovingAverage -----------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(-1.5, 3.0), (0.5, 2.0), (-4.0, -1.0), (-0.01, 0.02)])
def test_moving_average_settles_on_the_data_range_within_20_steps(a, b):
    """A stream in [a, b]: within 1% of [min(a, 0), max(b, 0)] after 20 steps (decay 0.999)."""
    rng = np.random.default_rng(9)
    quantizer = kq.MovingAverageQuantizer(num_bits=8)
    weights, _ = _build(quantizer, np.zeros((256,)))
    for _ in range(20):
        batch = rng.uniform(a, b, size=(256,)).astype(np.float32)
        quantizer(batch, True, weights)
    lo, hi = float(to_numpy(weights["min_var"])), float(to_numpy(weights["max_var"]))
    want_lo, want_hi = min(a, 0.0), max(b, 0.0)
    width = want_hi - want_lo
    assert abs(lo - want_lo) <= 0.01 * width and abs(hi - want_hi) <= 0.01 * width, (lo, hi)


def test_moving_average_first_step_is_the_batch_range_and_later_steps_average():
    quantizer = kq.MovingAverageQuantizer(num_bits=8, ema_decay=0.5)
    weights, _ = _build(quantizer, np.zeros((2,)))
    quantizer(np.float32([-1.0, 2.0]), True, weights)
    assert float(to_numpy(weights["min_var"])) == -1.0 and float(to_numpy(weights["max_var"])) == 2.0
    quantizer(np.float32([-4.0, 5.0]), True, weights)
    # Bias-corrected EMA with d=0.5 after two steps: (0.5 * r1 + r2) / 1.5.
    np.testing.assert_allclose(to_numpy(weights["min_var"]), (0.5 * -1 + -4) / 1.5, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(weights["max_var"]), (0.5 * 2 + 5) / 1.5, rtol=1e-6)
    assert float(to_numpy(weights["steps"])) == 2.0


def test_moving_average_steps_are_its_float32_formula_bit_for_bit():
    """Each step's range is ``r * rate + m * (1 - rate)`` with ``rate = (1 - d) / (1 - d**t)``,
    every operation one float32 rounding (a true division: PyTorch's reflected division by a
    NumPy scalar would multiply by a reciprocal instead), on every backend."""
    decay = np.float32(0.9)
    quantizer = kq.MovingAverageQuantizer(num_bits=8, ema_decay=float(decay))
    weights, _ = _build(quantizer, np.zeros((3,)))
    rng = np.random.default_rng(12)
    want_min = want_max = np.float32(0.0)
    for step in range(1, 31):
        batch = rng.normal(size=(3,)).astype(np.float32) * step
        quantizer(batch, True, weights)
        rate = (np.float32(1.0) - decay) / (np.float32(1.0) - decay ** np.float32(step))
        keep = np.float32(1.0) - rate
        want_min = min(batch.min(), np.float32(0.0)) * rate + want_min * keep
        want_max = max(batch.max(), np.float32(0.0)) * rate + want_max * keep
        assert same_bits(to_numpy(weights["min_var"]).reshape(()), np.float32(want_min)), step
        assert same_bits(to_numpy(weights["max_var"]).reshape(()), np.float32(want_max)), step


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2, "0.9"])
def test_moving_average_rejects_a_bad_decay(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        kq.MovingAverageQuantizer(ema_decay=decay)


# ---- AllValues --------------------------------------------------------------------------


def test_all_values_keeps_the_running_min_and_max_per_channel():
    quantizer = kq.AllValuesQuantizer(num_bits=8, per_axis=True)
    weights, _ = _build(quantizer, np.zeros((2, 3)))
    quantizer(np.float32([[1, -2, 0.5], [0.2, -1, 0.1]]), True, weights)
    quantizer(np.float32([[-3, 0.5, 0.2], [0.1, 4, 0.3]]), True, weights)
    assert np.array_equal(to_numpy(weights["min_var"]), [-3, -2, 0])
    assert np.array_equal(to_numpy(weights["max_var"]), [1, 4, 0.5])


# ---- Fixed ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", [2, 3, 4, 8, 12])
def test_fixed_honours_num_bits(num_bits):
    quantizer = kq.FixedQuantizer(num_bits=num_bits, init_min=-1.0, init_max=1.0)
    x = np.linspace(-2, 2, 40_001, dtype=np.float32)  # finer than 2**12 levels
    weights, _ = _build(quantizer, x)
    out = to_numpy(quantizer(x, True, weights))
    assert len(np.unique(out)) == 2**num_bits
    assert same_bits(out, tf_fake_quant(x, -1.0, 1.0, num_bits, False))
    assert float(to_numpy(weights["min_var"])) == -1.0, "a fixed range never moves"


def test_fixed_per_axis_ranges():
    quantizer = kq.FixedQuantizer(num_bits=4, init_min=[-1.0, -2.0, 0.0], init_max=[1.0, 2.0, 6.0], per_axis=True)
    x = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32) * 3
    weights, _ = _build(quantizer, x)
    out = to_numpy(quantizer(x, False, weights))
    assert same_bits(out, tf_fake_quant(x, [-1, -2, 0], [1, 2, 6], 4, False, -1))


@pytest.mark.parametrize(
    "init_min,init_max,message",
    [(np.nan, 1.0, "finite"), (0.5, 1.0, "contain zero"), (1.0, -1.0, "contain zero"), (0.0, 0.0, "non-empty")],
)
def test_fixed_rejects_bad_ranges(init_min, init_max, message):
    with pytest.raises(ValueError, match=message):
        kq.FixedQuantizer(init_min=init_min, init_max=init_max)


# ---- inside a Keras model (the backend's compiled train and predict steps) ---------------


@keras.saving.register_keras_serializable(package="keras_qat_tests")
class FakeQuantActivation(keras.layers.Layer):
    """Applies a quantizer to its input, as QuantizeWrapper does for outputs."""

    def __init__(self, quantizer, **kwargs):
        super().__init__(**kwargs)
        self.quantizer = quantizer

    def build(self, input_shape):
        self.quantizer_vars = self.quantizer.build(input_shape, "activation", self)

    def call(self, inputs, training=False):
        return self.quantizer(inputs, training, self.quantizer_vars)


@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS[:3], ids=lambda c: c.__name__)
def test_ranges_update_in_fit_and_predict_matches_tensorflow(quantizer_cls):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(64, 6)) * 2).astype(np.float32)
    y = rng.normal(size=(64, 6)).astype(np.float32)
    dense = keras.layers.Dense(6, kernel_initializer="identity", bias_initializer="zeros")
    inputs = keras.Input((6,))
    quant = FakeQuantActivation(quantizer_cls(num_bits=4, per_axis=True))
    model = keras.Model(inputs, quant(dense(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # lr 0: ranges move, weights do not
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    lo, hi = to_numpy(quant.quantizer_vars["min_var"]), to_numpy(quant.quantizer_vars["max_var"])
    np.testing.assert_allclose(lo, np.minimum(x.min(0), 0), rtol=1e-6)
    np.testing.assert_allclose(hi, np.maximum(x.max(0), 0), rtol=1e-6)
    out = model.predict(x, batch_size=64, verbose=0)
    assert same_bits(out, tf_fake_quant(x, lo, hi, 4, False, -1))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the shared update function is TensorFlow's")
@pytest.mark.parametrize("quantizer_cls", ALL_QUANTIZERS[:3], ids=lambda c: c.__name__)
@pytest.mark.parametrize("per_axis", [False, True], ids=["per_tensor", "per_axis"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize(
    "shapes", [((4, 6, 6, 3), (4, 3, 3, 5), (4, 5, 7, 2)), ((8, 64, 64, 4), (8, 48, 80, 6), (8, 64, 128, 5))], ids=["inlined", "called"]
)
def test_a_graph_moves_the_ranges_as_eager_execution_does(quantizer_cls, per_axis, symmetric, shapes):
    """In a TensorFlow graph a range's observation and update run as one function shared by
    the quantizers of the same settings and range length (traced for the first shape, then
    once for any shape;
    inlined below the large-tensor size, called above); over three training steps of three
    such quantizers it gives the outputs and range variables that eager execution, which runs
    the update's ops one by one, gives, bit for bit."""
    import tensorflow as tf

    rng = np.random.default_rng(8)
    batches = [[(rng.normal(size=shape) * (step + 1) + step).astype(np.float32) for shape in shapes] for step in range(3)]
    settings = dict(num_bits=5, per_axis=per_axis, symmetric=symmetric, narrow_range=symmetric)
    eager, graph = ([quantizer_cls(**settings) for _ in shapes] for _ in range(2))
    eager_weights = [_build(q, x, "activation")[0] for q, x in zip(eager, batches[0])]
    graph_weights = [_build(q, x, "activation")[0] for q, x in zip(graph, batches[0])]
    step = tf.function(lambda *xs: [q(x, True, w) for q, x, w in zip(graph, xs, graph_weights)])
    for xs in batches:
        got = step(*(tf.constant(x) for x in xs))
        for out, q, x, w, graph_w in zip(got, eager, xs, eager_weights, graph_weights):
            assert same_bits(to_numpy(out), to_numpy(q(x, True, w)))
            for key in w:
                assert same_bits(to_numpy(graph_w[key]), to_numpy(w[key])), key
    calls = [op for op in step.get_concrete_function(*(tf.constant(x) for x in batches[0])).graph.get_operations()
             if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    functions = [name for name in (op.get_attr("f").name for op in calls) if "_observe_and_update_fn" in name]
    assert len(functions) == 3
    if per_axis:  # ranges of different lengths: a trace each
        assert len(set(functions)) == 3
    else:
        assert functions[1] == functions[2], "one trace for the later shapes"


@pytest.mark.parametrize("per_axis", [False, True], ids=["per_tensor", "per_axis"])
def test_a_subclass_that_observes_ranges_its_own_way_trains_on_them(per_axis):
    """A quantizer that overrides ``observed_range`` (tfmot's contract lets a subclass decide
    what range it sees) moves its range by that range in training, graphs included."""

    class ClippedRange(kq.LastValueQuantizer):
        def observed_range(self, inputs, axes, factor=None, activation=None):
            lo, hi = super().observed_range(inputs, axes, factor, activation)
            return lo * 0.5, hi * 0.5

    x = (np.random.default_rng(13).normal(size=(6, 4)) * 3).astype(np.float32)
    quantizer = ClippedRange(num_bits=8, per_axis=per_axis)
    weights, _ = _build(quantizer, x, "activation")
    train = lambda v: quantizer(v, True, weights)  # noqa: E731
    if keras.backend.backend() == "tensorflow":  # a graph, where the other quantizers' update is shared
        import tensorflow as tf

        train = tf.function(train)
    train(x)
    axis = 0 if per_axis else None
    np.testing.assert_array_equal(to_numpy(weights["min_var"]), np.minimum(x.min(axis), 0) * np.float32(0.5))
    np.testing.assert_array_equal(to_numpy(weights["max_var"]), np.maximum(x.max(axis), 0) * np.float32(0.5))


def test_initial_range_before_any_training_is_tfmots():
    assert kqq.INITIAL_RANGE == (-6.0, 6.0)
    quantizer = kq.MovingAverageQuantizer(num_bits=8)
    weights, _ = _build(quantizer, np.zeros((3,)))
    out = to_numpy(quantizer(np.float32([-7.0, 0.0, 7.0]), False, weights))
    assert same_bits(out, tf_fake_quant(np.float32([-7.0, 0.0, 7.0]), -6.0, 6.0, 8, False))
