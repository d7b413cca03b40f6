"""keras_qat.emulation: whether inference reproduces the integer kernels, and saying so when
it cannot (the arithmetic itself is checked against the runtime in test_integer_ops)."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import emulation
from keras_qat import ops as qops
from keras_qat.errors import InexactInferenceWarning
from tests.conftest import digits_cnn, digits_data, same_bits

pytestmark = pytest.mark.api


def _quantized_dense():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="relu")(inputs))
    return kq.quantize_model(model)


def test_inference_warns_once_where_it_cannot_be_exact(monkeypatch):
    """TensorFlow and PyTorch (and JAX with x64) compute the integer kernels and say nothing;
    JAX without x64 computes fake quantization and says how to enable 64-bit types."""
    monkeypatch.setattr(emulation, "_inexact_said", False)  # as in a fresh process
    model = _quantized_dense()
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    if qops.exact_integer_arithmetic():
        with warnings.catch_warnings():
            warnings.simplefilter("error", InexactInferenceWarning)
            model(x, training=False)
    else:
        with pytest.warns(InexactInferenceWarning, match="jax_enable_x64"):
            model(x, training=False)


def test_training_never_warns():
    model = _quantized_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactInferenceWarning)
        model(np.ones((2, 4), np.float32), training=True)


_WITHOUT_X64 = """
import warnings
import numpy as np
import keras
import keras_qat as kq
from keras_qat.errors import InexactInferenceWarning
inputs = keras.Input((4,))
model = kq.quantize_model(keras.Model(inputs, keras.layers.Dense(3, activation="relu")(inputs)))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        model(np.ones((2, 4), np.float32), training=False)
said = [str(w.message) for w in caught if issubclass(w.category, InexactInferenceWarning)]
print(len(said), said[0] if said else "")
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="runs its own JAX process once, from the TF suite")
def test_jax_without_x64_says_once_how_to_enable_it():
    """CI runs JAX with x64; a user who has not enabled it gets one warning, however many calls."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "0"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_X64], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, _, message = done.stdout.strip().splitlines()[-1].partition(" ")
    assert count == "1"
    assert "jax_enable_x64" in message and "JAX_ENABLE_X64=1" in message


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.Conv2D(3, 3, padding="same"), (2, 5, 5, 300)),  # 2700 terms: 6 channel groups
        (keras.layers.Conv2D(3, 1), (2, 2, 2, 1001)),  # 1x1: 2 groups
        (keras.layers.Dense(3), (4, 1500)),  # 3 groups
        (keras.layers.DepthwiseConv2D(24), (2, 24, 24, 2)),  # 576 terms per channel: halves
    ],
    ids=["conv3x3", "conv1x1", "dense", "depthwise"],
)
def test_wide_accumulators_are_exact(layer, input_shape):
    """Accumulators whose bound passes 2**24 (8-bit codes, hundreds of terms) equal the exact
    accumulation (int64 in NumPy; float64, which holds these integers, for convolutions), at the
    extremes of the codes and at random."""
    rng = np.random.default_rng(0)
    layer.build(input_shape)
    kernel_shape = tuple(layer.kernel.shape)
    x = rng.integers(-255, 256, size=input_shape).astype(np.float32)
    x[0] = 255.0  # the largest accumulator of each sign, with the weights below
    w = rng.integers(-128, 128, size=kernel_shape).astype(np.float32)
    w[..., 0] = 127.0  # odd products: sums past 2**24 that float32 cannot hold
    terms = emulation._reduction_terms(layer)
    assert terms * 2**15 >= 2**24
    got = emulation._accumulate(layer, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(w), terms, 8, 8)
    if isinstance(layer, keras.layers.Dense):
        expected = x.astype(np.int64) @ w.astype(np.int64)
    else:  # the backend's float64 convolution, exact for integers this small
        expected = keras.ops.convert_to_numpy(
            emulation.linear_map(layer, keras.ops.convert_to_tensor(x.astype(np.float64)), keras.ops.convert_to_tensor(w.astype(np.float64)))
        )
        assert expected.dtype == np.float64
    assert np.array_equal(keras.ops.convert_to_numpy(got), expected)


@pytest.mark.parametrize(
    "quantizer, expected",
    [
        (kq.FixedQuantizer(num_bits=8, init_min=0.0, init_max=255.0 / 256.0), True),  # the schemes' softmax grid
        (kq.FixedQuantizer(num_bits=8, init_min=0.0, init_max=1.0), True),  # 255 levels
        (kq.FixedQuantizer(num_bits=8, init_min=-1.0, init_max=1.0), False),  # scale 2/255: 127.5 levels
        (kq.MovingAverageQuantizer(num_bits=8), False),  # a learned range: unknown when traced
        (kq.MovingAverageQuantizer(num_bits=4), True),  # below 8 bits: requantized from the int8 kernel
    ],
)
def test_the_integer_softmax_writes_only_grids_the_runtime_writes(quantizer, expected):
    """As the runtime's SoftmaxOutput: 1/scale levels at 8 bits and more, so only a fixed range
    whose scale is 1/integer; any grid below 8 bits."""
    assert emulation.writes_integer_softmax(quantizer) is expected


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the tails compile with XLA on TensorFlow only")
@pytest.mark.parametrize(
    "multipliers", [[0.0123, 0.5, 1.9, 2.0**-7], [0.0123, 2.0**-30, 0.3]], ids=["clipped fits", "a tiny multiplier"]
)
def test_a_compiled_tail_told_whether_the_clipped_form_fits_is_exact(multipliers):
    """A kernel's compiled requantization tail, given whether the clipped form fits, computes
    NumPy's codes times the scale near every tie, for multipliers where the clipped form fits
    and with one where it does not (2**-30), which takes the split form."""
    import tensorflow as tf

    from keras_qat.grid import from_range
    from keras_qat.integer import Requantize

    ops = keras.ops
    out = from_range(np.float32(-1.5), np.float32(7.0), 8).as_signed()
    requantize = Requantize.lower(np.array(multipliers), out, "relu6")
    ties = np.round((np.arange(-140, 140)[:, None] + 0.5) / np.array(multipliers)[None, :]).astype(np.int64)
    accumulator = np.clip(np.concatenate([ties + d for d in (-1, 0, 1)]), -(2**31) + 1, 2**31 - 1)  # int32
    graph = Requantize.lower(ops.convert_to_tensor(np.array(multipliers)), out, "relu6", xp=ops)
    fits = graph.clipped_fits(ops)
    assert bool(ops.convert_to_numpy(fits)) == (min(multipliers) > 2.0**-20)
    bias = ops.zeros((), "float64")
    arguments = (graph.float64_multiplier(ops), ops.cast(graph.zero_point, "float32"), graph.low, graph.high, out.scale)
    tail = tf.function(lambda acc: emulation._kernel_output.compiled(acc, bias, *arguments, fits))
    # float64, as a wide accumulator comes (float32 ones are exact below 2**24 only)
    got = ops.convert_to_numpy(tail(ops.convert_to_tensor(accumulator.astype(np.float64))))
    want = (requantize(accumulator) - out.zero_point).astype(np.float32) * np.float32(out.scale)
    assert np.array_equal(got, want)


@pytest.mark.skipif(not qops.exact_integer_arithmetic(), reason="exact inference needs int64/float64 on the backend")
def test_traced_inference_follows_the_weights_after_it_was_traced():
    """``predict`` traces its graph once and keeps it across ``fit``: the integer parameters it
    computed for the first weights (on TensorFlow, kept by :func:`keras_qat.ops.memoized`) must
    give way to the new ones, bit for bit as eager inference computes them."""
    keras.utils.set_random_seed(3)
    images, labels = digits_data()
    model = kq.quantize_model(digits_cnn())
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(images[:128], labels[:128], batch_size=32, epochs=1, verbose=0)
    x = images[:64]
    before = np.asarray(model.predict_on_batch(x))
    assert same_bits(before, keras.ops.convert_to_numpy(model(x, training=False)))
    model.fit(images[128:256], labels[128:256], batch_size=32, epochs=1, verbose=0)
    after = np.asarray(model.predict_on_batch(x))
    assert not np.array_equal(after, before), "training moved the weights, ranges and statistics"
    assert same_bits(after, keras.ops.convert_to_numpy(model(x, training=False)))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="only TensorFlow graphs keep parameters in a Python op")
def test_predict_computes_the_layers_parameters_in_numpy_with_the_eager_bits(monkeypatch):
    """Every layer's parameters (folded kernels, plain kernels, the Add) are computed in NumPy,
    none by eager ops, and ``predict`` gives eager inference's bits: also where a channel's BN
    factor is subnormal (TensorFlow's CPU kernels flush it to zero, NumPy would keep it)."""
    from keras_qat.folding import QuantizeFoldedBatchNorm

    eager_runs = []
    real = qops._eager_outputs
    monkeypatch.setattr(qops, "_eager_outputs", lambda fn, *rest: eager_runs.append(fn.__name__) or real(fn, *rest))
    images, _ = digits_data()
    model = kq.quantize_model(digits_cnn())
    folded = [layer for layer in model.layers if isinstance(layer, QuantizeFoldedBatchNorm)]
    batch_norm = folded[0].batch_norm
    gamma, variance = keras.ops.convert_to_numpy(batch_norm.gamma), keras.ops.convert_to_numpy(batch_norm.moving_variance)
    gamma[0], variance[0] = 1e-36, 1e4  # a factor of 1e-38, below the smallest normal float32
    batch_norm.gamma.assign(gamma)
    batch_norm.moving_variance.assign(variance)
    x = images[:16]
    predicted = np.asarray(model.predict_on_batch(x))
    assert folded and eager_runs == []
    assert same_bits(predicted, keras.ops.convert_to_numpy(model(x, training=False)))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="only TensorFlow graphs keep parameters in a Python op")
def test_only_keras_own_inference_functions_keep_parameters_in_a_python_op(monkeypatch):
    """``predict`` and ``evaluate`` run where Keras traced them; a function of the user's may be
    handed to the TFLite converter (which crashes on a Python op), saved, or called under XLA,
    so it computes the parameters in the graph."""
    import tensorflow as tf

    memoized_calls = []
    real = qops._memoized_call
    monkeypatch.setattr(qops, "_memoized_call", lambda fn, args, *rest: memoized_calls.append(fn) or real(fn, args, *rest))
    images, labels = digits_data()
    model = kq.quantize_model(digits_cnn())
    users = tf.function(lambda x: model(x, training=False))
    graph_ops = {op.type for op in users.get_concrete_function(tf.TensorSpec((4, 8, 8, 1))).graph.get_operations()}
    assert not memoized_calls and "PyFunc" not in graph_ops
    model.predict_on_batch(images[:4])
    predicted = len(memoized_calls)
    model.compile(loss="sparse_categorical_crossentropy")
    model.evaluate(images[:4], labels[:4], verbose=0)
    assert predicted > 0 and len(memoized_calls) == 2 * predicted, "each layer's parameters, in predict and in evaluate"

