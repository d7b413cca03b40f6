"""keras_qat.numpy_ops: a layer's integer parameters computed in NumPy are the graph's bits.

The oracle is each parameter function run eagerly with ``keras.ops`` (TensorFlow's kernels),
what the QAT model's graphs and its eager inference compute.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_qat import emulation, folding, numpy_ops
from tests.conftest import BACKEND

pytestmark = [
    pytest.mark.numerics,
    pytest.mark.skipif(BACKEND != "tensorflow", reason="memoized computes in NumPy on TensorFlow only"),
]

TRIALS = 60


def _identical(got, want) -> bool:
    """The same dtype, shape and bytes (bools by value)."""
    got, want = np.asarray(got), np.asarray(want)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def _outputs_agree(fn, tensors: list, static: tuple) -> bool:
    """``fn``'s flat outputs with keras.ops on ``tensors`` and with numpy_ops on the same arrays."""
    import tensorflow as tf

    with_keras = tf.nest.flatten(fn(*[keras.ops.convert_to_tensor(t) for t in tensors], *static))
    with_numpy = tf.nest.flatten(fn(*tensors, *static, xp=numpy_ops))
    return len(with_keras) == len(with_numpy) and all(
        _identical(n, keras.ops.convert_to_numpy(k)) for k, n in zip(with_keras, with_numpy)
    )


def _a_range(rng, shape=()):
    """A range over six decades, degenerate (``[0, 0]``, narrower than the minimum width,
    inverted) one time in ten."""
    low = -rng.uniform(0.0, 10.0, shape) * 10.0 ** rng.uniform(-4, 2, shape)
    high = rng.uniform(0.0, 10.0, shape) * 10.0 ** rng.uniform(-4, 2, shape)
    kind = rng.random()
    if kind < 0.04:
        low, high = np.zeros(shape), np.zeros(shape)
    elif kind < 0.07:
        high = low + 1e-12
    elif kind < 0.1:
        low, high = high, low
    return np.float32(low) if shape == () else low.astype(np.float32), np.float32(high) if shape == () else high.astype(np.float32)


_BITS = [2, 3, 4, 8, 16]


def _kernel_case(rng):
    """Ranges, bias and static arguments of :func:`keras_qat.emulation.kernel_parameters_fn`:
    bit widths 2..16 for each tensor, per-tensor or per-channel weights (some channels
    degenerate), each clamp, single rounding or not."""
    channels = int(rng.integers(1, 40))
    weight_axes = (0,) if rng.random() < 0.7 else ()
    static = (
        (int(rng.choice(_BITS)), False, False, ()), (int(rng.choice(_BITS)), True, True, weight_axes),
        (int(rng.choice(_BITS)), False, False, ()), str(rng.choice(["linear", "relu", "relu6"])), bool(rng.random() < 0.2),
    )
    weight_min, weight_max = _a_range(rng, (channels,) if weight_axes else ())
    if weight_axes:
        flat = rng.random(channels) < 0.1
        weight_min[flat], weight_max[flat] = 0.0, 0.0
    ranges = [*_a_range(rng), weight_min, weight_max, *_a_range(rng)]
    bias = (rng.normal(size=channels) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    return channels, ranges, bias, static


def test_kernel_parameters_are_the_same_bits_in_numpy():
    """With a bias and without one."""
    rng = np.random.default_rng(0)
    for trial in range(TRIALS):
        _, ranges, bias, static = _kernel_case(rng)
        if trial % 4:
            assert _outputs_agree(emulation.kernel_parameters_fn, [*ranges, bias], static), static
        else:
            without_bias = lambda *args, xp=keras.ops: emulation.kernel_parameters_fn(*args[:6], None, *args[6:], xp=xp)  # noqa: E731
            assert _outputs_agree(without_bias, ranges, static), static


def test_folded_kernel_parameters_are_the_same_bits_in_numpy():
    """The BN fold too (TensorFlow's rsqrt, which ``1 / sqrt`` would miss by an ulp), with
    zero variances, zero gammas and factors too small for a normal float32 among the channels."""
    rng = np.random.default_rng(1)
    for _ in range(TRIALS):
        channels, ranges, bias, static = _kernel_case(rng)
        gamma = rng.normal(size=channels).astype(np.float32)
        variance = (rng.uniform(0.0, 2.0, channels) * 10.0 ** rng.uniform(-6, 4)).astype(np.float32)
        gamma[rng.random(channels) < 0.1] = 0.0
        variance[rng.random(channels) < 0.1] = 0.0
        gamma[rng.random(channels) < 0.1] = 1e-36  # factors below the smallest normal float32
        mean, beta = rng.normal(size=(2, channels)).astype(np.float32)
        epsilon = float(rng.choice([1e-5, 1e-3, 0.1]))

        def deployed(gamma, variance, mean, beta, bias, *rest, xp=keras.ops):
            return folding._deployed_parameters_fn(gamma, variance, mean, beta, bias, epsilon, len(ranges), *rest, xp=xp)

        assert _outputs_agree(deployed, [gamma, variance, mean, beta, bias, *ranges], static), static


def test_add_parameters_are_the_same_bits_in_numpy():
    rng = np.random.default_rng(2)
    for _ in range(TRIALS):
        bits = [int(rng.choice(_BITS)) for _ in range(3)]
        static = (*((b, False, False, ()) for b in bits), str(rng.choice(["linear", "relu", "relu6"])))
        ranges = [*_a_range(rng), *_a_range(rng), *_a_range(rng)]
        assert _outputs_agree(emulation._add_parameters_fn, ranges, static), static


def test_a_function_outside_the_subset_is_refused():
    with pytest.raises(AttributeError):
        numpy_ops.softmax  # noqa: B018
