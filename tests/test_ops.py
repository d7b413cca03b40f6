"""keras_qat.ops against TensorFlow's fake-quant kernels: bits, gradients, ranges, errors."""

from __future__ import annotations

import numpy as np
import pytest

from keras_qat import ops as qops
from tests.conftest import BACKEND, compiled, same_bits, tf_fake_quant, tf_gradients, to_numpy

pytestmark = pytest.mark.numerics

RANGE_KINDS = (
    "straddle",
    "positive",
    "negative",
    "zero_min",
    "zero_max",
    "zero_zero",
    "equal",
    "narrow_width",
)


# A fixed pool of shapes (ranks 1..5, with unit and non-unit dimensions): compiled backends
# build one program per shape, and a pool keeps 10,000 cases to a few hundred programs.
SHAPES = (
    (5,), (1,), (7,),
    (4, 3), (1, 6), (5, 1),
    (2, 3, 4), (3, 1, 5), (1, 4, 2),
    (2, 3, 4, 5), (1, 3, 3, 2), (3, 2, 1, 4),
    (2, 2, 3, 2, 4), (1, 2, 1, 3, 2), (3, 1, 2, 2, 1),
)


def _random_range(rng, kind, size):
    """A (min, max) pair of float32 arrays of ``size`` of the given kind."""
    magnitude = 10.0 ** rng.uniform(-3, 3, size=size)
    a = (np.abs(rng.normal(size=size)) + 1e-3) * magnitude
    b = (np.abs(rng.normal(size=size)) + 1e-3) * magnitude
    if kind == "straddle":
        lo, hi = -a, b
    elif kind == "positive":
        lo, hi = np.minimum(a, b), np.maximum(a, b) * 1.5
    elif kind == "negative":
        lo, hi = -np.maximum(a, b) * 1.5, -np.minimum(a, b)
    elif kind == "zero_min":
        lo, hi = np.zeros(size), b
    elif kind == "zero_max":
        lo, hi = -a, np.zeros(size)
    elif kind == "zero_zero":
        lo, hi = np.zeros(size), np.zeros(size)
    elif kind == "equal":
        lo = hi = -a if rng.random() < 0.5 else b
    else:  # narrow_width: a range only a few ulps wide
        lo = -a
        hi = lo + np.abs(lo) * 1e-6
    return np.asarray(lo, np.float32), np.asarray(hi, np.float32)


def _random_input(rng, shape, lo, hi, axes):
    """Values inside and outside the range, grid points, ties, endpoints and zeros."""
    span = np.maximum(np.abs(lo), np.abs(hi)).max() if np.size(lo) else 1.0
    span = span if span > 0 else 1.0
    x = rng.normal(size=shape) * span * 0.8
    flat = x.reshape(-1)
    picks = rng.integers(0, flat.size, size=max(1, flat.size // 4))
    flat[picks[: len(picks) // 2]] = 0.0
    flat[picks[len(picks) // 2 :]] *= 3.0  # beyond the range
    return x.astype(np.float32)


def _oracle_range(lo, hi):
    """What TF is given: keras-qat maps a degenerate range (max - min < MIN_RANGE_WIDTH) to [0, 0]."""
    degenerate = (hi.astype(np.float32) - lo.astype(np.float32)) < qops.MIN_RANGE_WIDTH
    return np.where(degenerate, 0, lo).astype(np.float32), np.where(degenerate, 0, hi).astype(np.float32)


def _random_case(rng):
    num_bits = int(rng.integers(2, 17))
    narrow = bool(rng.integers(0, 2))
    shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
    rank = len(shape)
    choices = [None, 0, -1] + ([1] if rank > 1 else []) + ([(-2, -1)] if rank > 2 else [])
    axis = choices[int(rng.integers(0, len(choices)))]
    kind = RANGE_KINDS[int(rng.integers(0, len(RANGE_KINDS)))]
    size = () if axis is None else (qops.channel_count(shape, qops.normalize_axes(axis, rank)),)
    lo, hi = _random_range(rng, kind, size)
    x = _random_input(rng, shape, lo, hi, axis)
    return x, lo, hi, num_bits, narrow, axis, kind


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("exportable", [True, False], ids=["exportable", "training_kernel"])
def test_matches_tensorflow_bit_for_bit_on_10000_random_cases(exportable):
    """Both kernels: TF's ops (exportable) and the fused per-axis one that training runs."""
    if not exportable and BACKEND != "tensorflow":
        pytest.skip("exportable only selects a kernel on TensorFlow; other backends have one")
    rng = np.random.default_rng(20261121)
    kinds_seen, ranks_seen, axes_seen, bits_seen, differing = set(), set(), set(), set(), []
    for case in range(10_000):
        x, lo, hi, num_bits, narrow, axis, kind = _random_case(rng)
        got = to_numpy(
            qops.fake_quant(x, lo, hi, num_bits=num_bits, narrow_range=narrow, axis=axis, exportable=exportable)
        )
        want = tf_fake_quant(x, *_oracle_range(lo, hi), num_bits, narrow, axis)
        if not same_bits(got, want):
            differing.append((case, kind, num_bits, narrow, axis, x.shape))
        kinds_seen.add(kind)
        ranks_seen.add(x.ndim)
        axes_seen.add(axis if axis is None or isinstance(axis, tuple) else axis % x.ndim if axis >= 0 else axis)
        bits_seen.add(num_bits)
        assert np.all(np.isfinite(got)), (kind, lo, hi)
    assert not differing, f"{len(differing)} cases differ from TF, first: {differing[:5]}"
    assert kinds_seen == set(RANGE_KINDS)
    assert ranks_seen == {1, 2, 3, 4, 5}
    assert bits_seen == set(range(2, 17))
    assert {None, 0, 1, -1, (-2, -1)} <= axes_seen


@pytest.mark.parametrize("per_axis", [False, True], ids=["per_tensor", "per_axis"])
def test_matches_tensorflow_when_compiled(per_axis):
    """Under tf.function / jax.jit, where compilers rewrite arithmetic, the bits still match."""
    rng = np.random.default_rng(7 + per_axis)
    fn = compiled(qops.fake_quant, static_argnums=(3, 4, 5))
    shape, axis = ((4, 3, 5), 1) if per_axis else ((4, 3, 5), None)
    differing = 0
    for num_bits in range(2, 17):
        for narrow in (False, True):
            for kind in RANGE_KINDS:
                size = (3,) if per_axis else ()
                lo, hi = _random_range(rng, kind, size)
                x = _random_input(rng, shape, lo, hi, axis)
                got = to_numpy(fn(x, lo, hi, num_bits, narrow, axis))
                want = tf_fake_quant(x, *_oracle_range(lo, hi), num_bits, narrow, axis)
                differing += not same_bits(got, want)
    assert differing == 0


@pytest.mark.usefixtures("fused_for_every_size")
def test_training_kernel_matches_tensorflow_bit_for_bit_when_compiled():
    """``exportable=False`` (the fused per-axis kernel of training graphs) inside a compiled
    function, as Keras's train step runs it: Grappler and XLA must not change a bit.
    """
    rng = np.random.default_rng(20261122)
    fn = compiled(
        lambda x, lo, hi, bits, narrow: qops.fake_quant(
            x, lo, hi, num_bits=bits, narrow_range=narrow, axis=(1, 2), exportable=False
        ),
        static_argnums=(3, 4),
    )
    differing = []
    for num_bits in range(2, 17):
        for narrow in (False, True):
            for kind in RANGE_KINDS:
                lo, hi = _random_range(rng, kind, (6,))
                x = _random_input(rng, (5, 2, 3, 4), lo, hi, (1, 2))
                got = to_numpy(fn(x, lo, hi, num_bits, narrow))
                want = tf_fake_quant(x, *_oracle_range(lo, hi), num_bits, narrow, (1, 2))
                if not same_bits(got, want):
                    differing.append((kind, num_bits, narrow))
    assert not differing, f"{len(differing)} cases differ from TF, first: {differing[:5]}"


def test_training_kernel_matches_tensorflow_on_a_large_kernel():
    """A conv kernel's worth of values, where vectorized loops take their fast paths."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 3, 64, 96)).astype(np.float32) * 0.05
    lo, hi = qops.symmetric_range(x.min(axis=(0, 1, 2)), x.max(axis=(0, 1, 2)), 8, True)
    lo, hi = to_numpy(lo), to_numpy(hi)
    fn = compiled(lambda x, lo, hi: qops.fake_quant(x, lo, hi, narrow_range=True, axis=-1, exportable=False))
    assert same_bits(to_numpy(fn(x, lo, hi)), tf_fake_quant(x, lo, hi, 8, True, -1))


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("exportable", [True, False], ids=["exportable", "training_kernel"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_axis"])
@pytest.mark.parametrize("kind", ["straddle", "positive", "negative", "zero_zero"])
def test_gradients_match_tensorflow(per_channel, kind, exportable):
    import keras

    rng = np.random.default_rng(11)
    shape = (6, 5, 4)
    size = (4,) if per_channel else ()
    for num_bits in (2, 4, 8, 16):
        lo, hi = _random_range(rng, kind, size)
        x = _random_input(rng, shape, lo, hi, -1)
        upstream = rng.normal(size=shape).astype(np.float32)
        want = tf_gradients(x, lo, hi, upstream, num_bits, False, per_channel)
        got = _keras_gradients(keras, x, lo, hi, upstream, num_bits, -1 if per_channel else None, exportable)
        # Exact values; the sign of a zero gradient may differ (XLA turns g * mask into a select).
        assert np.array_equal(got[0], want[0]), "d/dx must be TF's straight-through mask exactly"
        for ours, theirs in zip(got[1:], want[1:]):
            # d/dmin and d/dmax are sums over the tensor; only the summation order may differ.
            tolerance = 1e-6 * np.abs(upstream).sum()
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=tolerance)


def _keras_gradients(keras, x, lo, hi, upstream, num_bits, axis, exportable=True, factor=None):
    """Gradients of keras_qat's fake_quant on the active backend."""
    if BACKEND == "jax":
        import jax

        def loss(x, lo, hi):
            out = qops.fake_quant(x, lo, hi, num_bits=num_bits, axis=axis, exportable=exportable, factor=factor)
            return (out * upstream).sum()

        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(x, lo, hi)]
    if BACKEND == "torch":
        import torch

        x, lo, hi = (torch.tensor(v, requires_grad=True) for v in (x, lo, hi))
        y = qops.fake_quant(x, lo, hi, num_bits=num_bits, axis=axis, exportable=exportable, factor=factor)
        y.backward(torch.tensor(upstream))
        return [v.grad.numpy() for v in (x, lo, hi)]
    import tensorflow as tf

    x, lo, hi = (tf.constant(v) for v in (x, lo, hi))
    with tf.GradientTape() as tape:
        tape.watch([x, lo, hi])
        y = qops.fake_quant(x, lo, hi, num_bits=num_bits, axis=axis, exportable=exportable, factor=factor)
    return [g.numpy() for g in tape.gradient(y, [x, lo, hi], output_gradients=tf.constant(upstream))]


# ---- a channel factor (a folded kernel's w * f, never multiplied out) --------------------


def _channel_product(x, factor, axis):
    """NumPy's float32 product of ``x`` and one factor per channel of ``axis`` (flattened row-major)."""
    axes = qops.normalize_axes(axis, x.ndim)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    return (x * factor.reshape(shape)).astype(np.float32)


def _random_factor(rng, size):
    """Per-channel factors of both signs and many magnitudes, as BN factors can be."""
    factor = 10.0 ** rng.uniform(-2, 2, size=size) * np.where(rng.random(size) < 0.2, -1.0, 1.0)
    return factor.astype(np.float32)


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("exportable", [True, False], ids=["exportable", "training_kernel"])
def test_a_channel_factor_quantizes_as_the_product_would_bit_for_bit(exportable):
    """``fake_quant(x, ..., factor=f)`` is TF's fake quant of ``x * f``, on 2,000 random cases,
    through TF's ops (which multiply first) and the fused kernel (which multiplies inside)."""
    rng = np.random.default_rng(20261129)
    differing, cases = [], 0
    while cases < 2_000:
        x, lo, hi, num_bits, narrow, axis, kind = _random_case(rng)
        if axis is None:
            continue
        cases += 1
        factor = _random_factor(rng, lo.shape)
        got = to_numpy(
            qops.fake_quant(x, lo, hi, num_bits=num_bits, narrow_range=narrow, axis=axis, exportable=exportable, factor=factor)
        )
        want = tf_fake_quant(_channel_product(x, factor, axis), *_oracle_range(lo, hi), num_bits, narrow, axis)
        if not same_bits(got, want):
            differing.append((cases, kind, num_bits, narrow, axis, x.shape))
    assert not differing, f"{len(differing)} cases differ from TF, first: {differing[:5]}"


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("exportable", [True, False], ids=["exportable", "training_kernel"])
@pytest.mark.parametrize("kind", ["straddle", "positive", "zero_zero"])
def test_a_channel_factor_passes_the_products_gradient_to_the_input(kind, exportable):
    """d/dx is TF's straight-through gradient at ``x * f`` times ``f`` (TF's Mul gradient),
    exactly; d/dmin and d/dmax are TF's sums at the product."""
    import keras

    rng = np.random.default_rng(12)
    shape = (6, 5, 4)
    for num_bits in (2, 8, 16):
        lo, hi = _random_range(rng, kind, (4,))
        factor = _random_factor(rng, (4,))
        x = _random_input(rng, shape, lo, hi, -1) / factor
        upstream = rng.normal(size=shape).astype(np.float32)
        d_product, d_min, d_max = tf_gradients(_channel_product(x, factor, -1), lo, hi, upstream, num_bits, False, True)
        got = _keras_gradients(keras, x, lo, hi, upstream, num_bits, -1, exportable, factor=factor)
        assert np.array_equal(got[0], d_product * factor)
        tolerance = 1e-6 * np.abs(upstream).sum()
        np.testing.assert_allclose(got[1], d_min, rtol=1e-6, atol=tolerance)
        np.testing.assert_allclose(got[2], d_max, rtol=1e-6, atol=tolerance)


def _tf_activation(x, activation):
    import tensorflow as tf

    return (tf.nn.relu6 if activation == "relu6" else tf.nn.relu)(x).numpy()


def _activation_input(rng, shape, lo, hi):
    """Values around the range and the activation's kinks: exact zeros, exact sixes, the range's
    ends, and values either side of each."""
    x = _random_input(rng, shape, lo, hi, None)
    flat = x.reshape(-1)
    picks = rng.integers(0, flat.size, size=max(4, flat.size // 3))
    special = np.array([0.0, -0.0, 6.0, lo, hi, np.nextafter(np.float32(6.0), 7), np.nextafter(np.float32(0.0), -1)], np.float32)
    flat[picks] = special[rng.integers(0, special.size, size=picks.size)]
    return x


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("exportable", [True, False], ids=["exportable", "training_kernel"])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_an_activation_quantizes_as_tensorflows_activation_then_fake_quant(activation, exportable):
    """``fake_quant(x, ..., activation=a)`` per tensor: the bits of TF's fake quant of TF's
    Relu/Relu6 of ``x``, and exactly the gradient of ``x`` that the two ops give (their masks'
    product), the range's gradients as TF's sums; on 300 random cases of every range kind."""
    import tensorflow as tf

    rng = np.random.default_rng(31)
    differing = []
    for case in range(300):
        kind = RANGE_KINDS[case % len(RANGE_KINDS)]
        num_bits, narrow = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        lo, hi = _random_range(rng, kind, ())
        x = _activation_input(rng, SHAPES[case % len(SHAPES)], lo, hi)
        got = to_numpy(qops.fake_quant(x, lo, hi, num_bits=num_bits, narrow_range=narrow, exportable=exportable, activation=activation))
        want = tf_fake_quant(_tf_activation(x, activation), *_oracle_range(lo, hi), num_bits, narrow)
        if not same_bits(got, want):
            differing.append((case, kind, num_bits, narrow))
        if case % 10 or BACKEND != "tensorflow":
            continue
        upstream = rng.normal(size=x.shape).astype(np.float32)
        values, ends = tf.constant(x), [tf.constant(v) for v in _oracle_range(lo, hi)]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([values, *ends])
            chained = tf.quantization.fake_quant_with_min_max_vars(
                (tf.nn.relu6 if activation == "relu6" else tf.nn.relu)(values), *ends, num_bits=num_bits, narrow_range=narrow
            )
            ours = qops.fake_quant(values, *ends, num_bits=num_bits, narrow_range=narrow, exportable=exportable, activation=activation)
        want_grads = tape.gradient(chained, [values, *ends], output_gradients=upstream)
        got_grads = tape.gradient(ours, [values, *ends], output_gradients=upstream)
        assert np.array_equal(got_grads[0].numpy(), want_grads[0].numpy()), (case, kind)
        tolerance = 1e-6 * np.abs(upstream).sum()
        for g, w in zip(got_grads[1:], want_grads[1:]):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-6, atol=tolerance)
    assert not differing, f"{len(differing)} cases differ from TF, first: {differing[:5]}"


@pytest.mark.parametrize("activation", [None, "relu6"])
def test_per_tensor_training_matches_tensorflow_at_rounding_ties_of_a_large_tensor(activation):
    """Per tensor, TF divides by the scale where per channel it multiplies by the inverse; the
    two differ only within an ulp of a rounding tie, which random inputs almost never hit (a
    kernel that multiplied passed every other test here). Here every value sits on a tie or one
    ulp either side, in a tensor large enough for the training kernel
    (:func:`keras_qat.ops.fuses_activation`), over 24 ranges and widths."""
    rng = np.random.default_rng(41)
    differing = []
    for case in range(24):
        num_bits, narrow = int(rng.integers(2, 17)), bool(case % 2)
        lo, hi = np.float32(-rng.uniform(0, 3) if case % 3 else 0.0), np.float32(rng.uniform(0.1, 7))
        grid = qops.nudge(lo, hi, num_bits, narrow)
        qmin, qmax = qops.quant_range(num_bits, narrow)
        steps = rng.integers(0, qmax - qmin + 1, size=60_000).astype(np.float64)
        ties = (float(grid.nudged_min) + (steps + 0.5) * float(grid.scale)).astype(np.float32)
        x = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
        x = x.reshape(-1, 100)
        got = to_numpy(qops.fake_quant(x, lo, hi, num_bits=num_bits, narrow_range=narrow, exportable=False, activation=activation))
        want = tf_fake_quant(x if activation is None else _tf_activation(x, activation), lo, hi, num_bits, narrow)
        if not same_bits(got, want):
            differing.append((case, num_bits, narrow, float(lo), float(hi)))
    assert not differing, f"{len(differing)} ranges differ from TF, first: {differing[:5]}"


def test_an_activation_is_one_that_fake_quant_knows():
    with pytest.raises(ValueError, match=r"activation must be one of \('relu', 'relu6'\) or None, got 'gelu'"):
        qops.fake_quant(np.ones(3, np.float32), -1.0, 1.0, activation="gelu")


def test_a_channel_factor_is_refused_per_tensor_and_checked_per_channel():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="per-tensor quantization .axis=None. takes none"):
        qops.fake_quant(x, -1.0, 1.0, factor=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"per-axis factor must have shape \(3,\)"):
        qops.fake_quant(x, -np.ones(3, np.float32), np.ones(3, np.float32), axis=-1, factor=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="pass axis=... with it"):
        qops.reduce_range(x, None, np.ones(3, np.float32))


# ---- degenerate ranges ------------------------------------------------------------------


@pytest.mark.parametrize("lo,hi", [(0.0, 0.0), (3.0, 3.0), (-2.5, -2.5), (1e-39, 1e-39), (0.0, 1e-37)])
def test_degenerate_ranges_give_zeros_not_nan(lo, hi):
    x = np.linspace(-5, 5, 11, dtype=np.float32)
    out = to_numpy(qops.fake_quant(x, np.float32(lo), np.float32(hi), num_bits=8))
    assert np.all(np.isfinite(out))
    assert same_bits(out, np.zeros_like(x))


def test_all_zero_channel_is_finite_and_others_are_untouched():
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    x[:, 1] = 0.0
    lo, hi = np.array([-2.0, 0.0, -1.0], np.float32), np.array([2.0, 0.0, 3.0], np.float32)
    out = to_numpy(qops.fake_quant(x, lo, hi, num_bits=4, axis=-1))
    assert np.all(np.isfinite(out))
    assert same_bits(out, tf_fake_quant(x, lo, hi, 4, False, -1))


def test_half_precision_inputs_keep_their_dtype():
    x = np.linspace(-1, 1, 9).astype("float16")
    out = qops.fake_quant(x, -1.0, 1.0, num_bits=4)
    assert "float16" in str(out.dtype)
    want = tf_fake_quant(x.astype(np.float32), -1.0, 1.0, 4, False).astype("float16")
    assert np.array_equal(to_numpy(out), want)


# ---- ranges from statistics ---------------------------------------------------------------


def test_asymmetric_range_always_contains_zero():
    lo, hi = qops.asymmetric_range(np.float32([1.0, -3.0, -2.0]), np.float32([4.0, -1.0, 5.0]))
    assert np.array_equal(to_numpy(lo), [0.0, -3.0, -2.0])
    assert np.array_equal(to_numpy(hi), [4.0, 0.0, 5.0])


@pytest.mark.parametrize("num_bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("narrow", [False, True])
def test_symmetric_range_puts_zero_on_the_middle_code(num_bits, narrow):
    """tfmot's symmetric rule: TF nudges the range to zero point 2**(bits-1), signed zero 0."""
    batch_min, batch_max = np.float32([-0.3, -2.0, 0.5]), np.float32([1.2, 0.7, 0.9])
    lo, hi = (to_numpy(v) for v in qops.symmetric_range(batch_min, batch_max, num_bits, narrow))
    assert np.all(lo <= batch_min) and np.all(hi >= batch_max) and np.all(lo < 0) and np.all(hi > 0)
    qmin = 1 if narrow else 0
    probe = np.array([[-1e30, 1e30]], np.float32).T.repeat(3, axis=1)
    ends = tf_fake_quant(probe, lo, hi, num_bits, narrow, axis=-1)
    scale = (ends[1] - ends[0]) / (2**num_bits - 1 - qmin)
    zero_point = qmin - ends[0] / scale
    np.testing.assert_array_equal(np.round(zero_point), 2 ** (num_bits - 1))
    np.testing.assert_allclose(zero_point, 2 ** (num_bits - 1), atol=1e-3)


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("in_graph", [False, True], ids=["eager", "compiled"])
def test_reduce_range_per_axis_any_axis_and_flattened_axes(in_graph):
    """Eagerly, and in a graph (where TensorFlow reduces per channel in one XLA kernel)."""
    reduce_range = compiled(qops.reduce_range, static_argnums=(1,)) if in_graph else qops.reduce_range
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    lo, hi = reduce_range(x, 1)
    assert np.array_equal(to_numpy(lo), x.min(axis=(0, 2, 3))) and np.array_equal(to_numpy(hi), x.max(axis=(0, 2, 3)))
    lo, hi = reduce_range(x, (2, 3))
    assert np.array_equal(to_numpy(lo), x.min(axis=(0, 1)).reshape(-1))
    assert np.array_equal(to_numpy(hi), x.max(axis=(0, 1)).reshape(-1))
    lo, hi = reduce_range(x, None)
    assert float(to_numpy(lo)) == x.min() and float(to_numpy(hi)) == x.max()


@pytest.mark.usefixtures("fused_for_every_size")
@pytest.mark.parametrize("in_graph", [False, True], ids=["eager", "compiled"])
def test_reduce_range_with_a_channel_factor_is_the_range_of_the_product(in_graph):
    """The products of the channel's own min and max (swapped where the factor is negative)
    are the min and max of the products, bit for bit: rounding is monotonic."""
    rng = np.random.default_rng(2)
    reduce_range = compiled(qops.reduce_range, static_argnums=(1, 3)) if in_graph else qops.reduce_range
    x = (rng.normal(size=(3, 3, 4, 6)) * 10.0 ** rng.uniform(-3, 3, size=(3, 3, 4, 6))).astype(np.float32)
    for axis in (-1, (2, 3)):
        axes = qops.normalize_axes(axis, x.ndim)
        count = qops.channel_count(x.shape, axes)
        factor = _random_factor(rng, (count,))
        factor[0] = -factor[0] if factor[0] > 0 else factor[0]  # a negative factor, at least
        product = _channel_product(x, factor, axis).reshape(-1, count)  # channels last, flattened
        lo, hi = reduce_range(x, axis, factor, None)
        assert same_bits(to_numpy(lo), product.min(axis=0)) and same_bits(to_numpy(hi), product.max(axis=0))
        activated = np.minimum(np.maximum(product, 0), 6)
        lo, hi = reduce_range(x, axis, factor, "relu6")
        assert same_bits(to_numpy(lo), activated.min(axis=0)) and same_bits(to_numpy(hi), activated.max(axis=0))


# ---- memoized: a layer's parameters, recomputed only when its inputs change ---------------------


def _parameters_like(a, b, bias, offset: float):
    """Outputs of three dtypes and several shapes, two of one dtype and shape (which the op
    stacks), nested as a layer's parameters are."""
    import keras

    scaled = a * b + offset
    return scaled, (keras.ops.cast(a, "float64") / 3.0, keras.ops.greater(bias, 0.0)), keras.ops.sum(bias), b - a


@pytest.fixture
def memoizing_every_graph(monkeypatch):
    """:func:`keras_qat.ops.memoized` in any graph, not only in Keras's own step functions."""
    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)


@pytest.fixture
def counted_memo():
    """:func:`_parameters_like` memoized, the list its runs append to, and three variables to
    call it on."""
    import tensorflow as tf

    runs = []

    def counted(*args):
        runs.append(1)
        return _parameters_like(*args)

    variables = (tf.Variable(np.float32(1.5)), tf.Variable(np.float32([0.25, -2.0, 3.0])), tf.Variable(np.float32([1.0, -1.0, 0.0])))
    return qops.memoized(counted), runs, variables


@pytest.mark.skipif(BACKEND != "tensorflow", reason="memoized is the function itself on other backends")
@pytest.mark.usefixtures("memoizing_every_graph")
def test_a_memoized_function_recomputes_exactly_when_its_inputs_change(counted_memo):
    """One Python op in the graph, with one output per shape (floats and bools of one shape
    stacked in the widest float); its outputs are the eager function's bits and dtypes,
    recomputed after any input changes (an assignment between calls of the same traced
    graph), reused while none does."""
    import tensorflow as tf

    memo, runs, (a, b, bias) = counted_memo
    graph = tf.function(lambda: memo(a, b, bias, 0.5))
    operations = graph.get_concrete_function().graph.get_operations()
    ops_in_graph = {op.type for op in operations}
    assert "PyFunc" in ops_in_graph and not ops_in_graph & {"Mul", "Sum", "PartitionedCall"}
    (python_op,) = [op for op in operations if op.type == "PyFunc"]
    assert sorted(t.dtype.name for t in python_op.outputs) == ["float32", "float64"], "() in float64, (3,) in float32"

    def check():
        got = tf.nest.map_structure(np.asarray, graph())
        want = tf.nest.map_structure(np.asarray, _parameters_like(a, b, bias, 0.5))
        assert tf.nest.flatten(got) and all(
            g.shape == w.shape and g.dtype == w.dtype and same_bits(g, w) for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want))
        )

    runs.clear()
    check()
    check()
    assert len(runs) == 1, "the second call reuses the first one's outputs"
    for variable, value in ((a, np.float32(-0.75)), (b, np.float32([0.25, -2.0, 3.5])), (bias, np.float32([1.0, -1.0, -0.0]))):
        variable.assign(value)
        check()
    assert len(runs) == 4, "each change (a sign of zero included) recomputes once"
    bias.assign(np.float32([1.0, -1.0, -0.0]))
    check()
    assert len(runs) == 4, "assigning the same values recomputes nothing"


def _parameters_in(a, b, bias, offset: float, *, xp=None):
    """:func:`_parameters_like` in the subset of keras.ops that keras_qat.numpy_ops has."""
    import keras

    xp = keras.ops if xp is None else xp
    return a * b + offset, (xp.cast(a, "float64") / 3.0, bias > 0.0), xp.maximum(bias, 0.0), b - a


@pytest.mark.skipif(BACKEND != "tensorflow", reason="memoized is the function itself on other backends")
@pytest.mark.usefixtures("memoizing_every_graph")
def test_outputs_stacked_in_a_wider_float_keep_their_bits():
    """float32 outputs stacked with float64 ones come back bit for bit (subnormals, -0.0, NaN,
    infinities), and bools as they were."""
    import tensorflow as tf

    awkward = np.float32([1e-40, -0.0, np.nan, np.inf, -3.5, 1.17e-38])
    source = tf.Variable(awkward)

    def mixed(values):
        return values, tf.cast(values, tf.float64) * 2.0, tf.math.is_nan(values)

    got = tf.function(lambda: qops.memoized(mixed)(source))()
    want = mixed(tf.convert_to_tensor(awkward))  # the eager ops: the float64 product flushes 1e-40
    assert np.asarray(got[0]).tobytes() == awkward.tobytes()
    assert all(g.dtype == w.dtype and np.asarray(g).tobytes() == np.asarray(w).tobytes() for g, w in zip(got, want))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="memoized is the function itself on other backends")
@pytest.mark.usefixtures("memoizing_every_graph")
@pytest.mark.parametrize("numpy_fails", [False, True], ids=["numpy", "numpy-fails"])
def test_a_memoized_function_runs_in_numpy_where_it_can(numpy_fails):
    """With ``in_numpy``, the function runs with keras_qat.numpy_ops, both to learn its outputs'
    shapes while the graph is traced and to compute them when the graph runs; where that raises,
    its eager ops run instead. The outputs are the eager function's bits either way."""
    import tensorflow as tf

    from keras_qat import numpy_ops

    modules = []

    def recorded(*args, xp=None):
        modules.append("numpy" if xp is numpy_ops else "keras")
        if numpy_fails and xp is numpy_ops:
            raise FloatingPointError("not in NumPy")
        return _parameters_in(*args, xp=xp)

    a, b, bias = tf.Variable(np.float32(1.5)), tf.Variable(np.float32([0.25, -2.0, 3.0])), tf.Variable(np.float32([1.0, -1.0, 0.0]))
    graph = tf.function(lambda: qops.memoized(recorded, in_numpy=True)(a, b, bias, 0.5))
    for value in (np.float32(1.5), np.float32(-0.75)):
        a.assign(value)
        got = tf.nest.flatten(tf.nest.map_structure(np.asarray, graph()))
        want = tf.nest.flatten(tf.nest.map_structure(np.asarray, _parameters_in(a, b, bias, 0.5)))
        assert all(g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes() for g, w in zip(got, want))
    assert modules == (["numpy", "keras"] * 3 if numpy_fails else ["numpy"] * 3), "the shapes, then two runs"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="memoized is the function itself on other backends")
@pytest.mark.usefixtures("memoizing_every_graph")
def test_a_memoized_function_of_a_value_computed_in_the_graph_runs_with_the_graph(counted_memo):
    """An input that the graph computes (not a variable): the op's first run computes the
    outputs, and each change of the computed value recomputes them."""
    import tensorflow as tf

    memo, runs, (a, b, bias) = counted_memo
    graph = tf.function(lambda: memo(a * 2.0, b, bias, 0.5))
    graph.get_concrete_function()
    traced = len(runs)
    for value in (np.float32(1.5), np.float32(1.5), np.float32(-3.0)):
        a.assign(value)
        got = tf.nest.flatten(tf.nest.map_structure(np.asarray, graph()))
        want = tf.nest.flatten(tf.nest.map_structure(np.asarray, _parameters_like(a * 2.0, b, bias, 0.5)))
        assert all(same_bits(g, w) for g, w in zip(got, want))
    assert len(runs) - traced == 2, "the first run and the change"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="memoized is the function itself on other backends")
@pytest.mark.usefixtures("memoizing_every_graph")
def test_a_memoized_function_is_traced_where_no_python_op_may_run(tmp_path):
    """Under XLA and in a SavedModel the function's own ops run, with the same outputs."""
    import tensorflow as tf

    memo = qops.memoized(_parameters_like)
    module = tf.Module()
    module.a, module.b = tf.Variable(np.float32(1.5)), tf.Variable(np.float32([0.25, -2.0, 3.0]))
    module.bias = tf.Variable(np.float32([1.0, -1.0, 0.0]))
    module.call = tf.function(lambda: memo(module.a, module.b, module.bias, 0.5), input_signature=[])
    want = tf.nest.flatten(_parameters_like(module.a, module.b, module.bias, 0.5))

    compiled_call = tf.function(lambda: memo(module.a, module.b, module.bias, 0.5), jit_compile=True)
    assert all(same_bits(np.asarray(g), np.asarray(w)) for g, w in zip(tf.nest.flatten(compiled_call()), want))

    tf.saved_model.save(module, str(tmp_path / "saved"))
    restored = tf.saved_model.load(str(tmp_path / "saved"))
    ops_in_graph = {op.type for op in restored.call.get_concrete_function().graph.get_operations()}
    assert "PyFunc" not in ops_in_graph
    assert all(same_bits(np.asarray(g), np.asarray(w)) for g, w in zip(tf.nest.flatten(restored.call()), want))


# ---- compiled: XLA kernels compiled ahead while a Keras step is traced -------------------------


def _xla_compilations(run) -> int:
    """How many XLA compilations TensorFlow's profiler records while ``run()`` runs."""
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            run()
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        with open(path, "rb") as file:
            space.ParseFromString(file.read())
    return sum(
        plane.event_metadata[event.metadata_id].name.startswith("JitCompiler::Compile")
        for plane in space.planes
        for line in plane.lines
        for event in line.events
    )


def _requantize_like(x, multiplier, scale):
    """An elementwise tail of exact steps, per-channel parameters broadcast on the last axis."""
    import keras

    wide = keras.ops.cast(x, "float64") * multiplier
    return keras.ops.cast(keras.ops.clip(keras.ops.floor(wide + 0.5), -128.0, 127.0), "float32") * scale


@pytest.fixture
def precompiler(monkeypatch):
    """A precompiler of the test's own, once the process's own has compiled what earlier tests
    queued (the profiler counts every compilation in the process); on a machine with a second CPU."""
    qops._PRECOMPILER.wait()
    monkeypatch.setattr(qops, "_SPARE_CPU", True)
    precompiler = qops._Precompiler()
    monkeypatch.setattr(qops, "_PRECOMPILER", precompiler)
    return precompiler


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compiled is the function itself on other backends")
def test_a_keras_step_finds_its_kernels_compiled_ahead(monkeypatch, precompiler):
    """The kernels of a graph traced as a Keras step are compiled on the precompiler's thread, so
    that the graph's first run compiles none, and computes what the function computes; a graph
    traced elsewhere compiles its own on its first run."""
    import tensorflow as tf

    kernel = qops.compiled(_requantize_like)
    rng = np.random.default_rng(0)
    arguments = [
        (np.float32(rng.integers(-2**20, 2**20, size=shape)), 2.0 ** -rng.uniform(8, 12, size=shape[-1:]), np.float32(0.05))
        for shape in ((4, 6, 6, 8), (4, 3, 3, 16))
    ]
    step = tf.function(lambda *args: [kernel(*a) for a in args])

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)
    step.get_concrete_function(*arguments)
    precompiler.wait()
    assert len(precompiler.compiled_kernels) == 2, "one kernel per shape"
    outputs = []
    assert _xla_compilations(lambda: outputs.extend(step(*arguments))) == 0
    for got, args in zip(outputs, arguments):
        assert same_bits(np.asarray(got), np.asarray(_requantize_like(*args)))

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: False)
    elsewhere = tf.function(lambda *args: [kernel(*a) for a in args])
    other = [(np.zeros((2, 5, 5, 8), np.float32), np.ones(8), np.float32(1.0))]
    assert _xla_compilations(lambda: elsewhere(*other)) == 1
    assert len(precompiler.compiled_kernels) == 2


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compiled is the function itself on other backends")
def test_a_compiled_function_is_traced_once_per_rank(monkeypatch, precompiler):
    """Calls of one rank and dtypes share one trace whatever their sizes (XLA compiles one
    kernel per shape from it), each computing what the function computes; another rank is
    traced anew."""
    import tensorflow as tf

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)
    traces = []

    def counted(*args):
        traces.append(tuple(args[0].shape))
        return _requantize_like(*args)

    kernel = qops.compiled(counted)
    rng = np.random.default_rng(3)
    arguments = [
        (np.float32(rng.integers(-2**20, 2**20, size=shape)), 2.0 ** -rng.uniform(8, 12, size=shape[-1:]), np.float32(0.05))
        for shape in ((4, 6, 6, 8), (4, 3, 3, 16), (2, 5, 5, 8), (6, 24))
    ]
    step = tf.function(lambda *args: [kernel(*a) for a in args])
    outputs = step(*arguments)
    assert traces == [(None, None, None, None), (None, None)]
    for got, args in zip(outputs, arguments):
        assert same_bits(np.asarray(got), np.asarray(_requantize_like(*args)))
    precompiler.wait()
    assert len(precompiler.compiled_kernels) == 4, "one kernel per shape"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compiled is the function itself on other backends")
def test_a_kernel_placed_on_a_device_is_compiled_ahead_too(monkeypatch, precompiler):
    """A call that the graph places on a device (here the CPU, the only one) is compiled ahead
    as well, on that device: the graph's first run compiles nothing."""
    import tensorflow as tf

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)
    kernel = qops.compiled(_requantize_like)
    args = (np.float32(np.arange(-48, 48).reshape(2, 48)), np.full(48, 2.0 ** -3), np.float32(0.5))

    def placed(*a):
        with tf.device("/CPU:0"):
            return kernel(*a)

    step = tf.function(placed)
    step.get_concrete_function(*args)
    precompiler.wait()
    assert len(precompiler.compiled_kernels) == 1
    assert _xla_compilations(lambda: step(*args)) == 0


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compiled is the function itself on other backends")
@pytest.mark.parametrize("why", ["one CPU", "exiting"])
def test_nothing_is_compiled_ahead_without_a_spare_cpu_or_once_the_interpreter_exits(monkeypatch, precompiler, why):
    """With one CPU the thread would only compete with the trace; once the main thread has
    finished (the interpreter exiting) it drops what is queued. The graph compiles its kernels."""
    import threading

    import tensorflow as tf

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)
    if why == "one CPU":
        monkeypatch.setattr(qops, "_SPARE_CPU", False)
    else:
        finished = threading.Thread(target=lambda: None)
        finished.start()
        finished.join()
        monkeypatch.setattr(threading, "main_thread", lambda: finished)
    kernel = qops.compiled(_requantize_like)
    args = (np.float32(np.arange(-56, 56).reshape(2, 56)), np.full(56, 2.0 ** -3), np.float32(0.5))
    step = tf.function(lambda *a: kernel(*a))
    step.get_concrete_function(*args)
    precompiler.wait()
    assert precompiler.compiled_kernels == []
    outputs = []
    assert _xla_compilations(lambda: outputs.append(step(*args))) == 1
    assert same_bits(np.asarray(outputs[0]), np.asarray(_requantize_like(*args)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compiled is the function itself on other backends")
def test_kernels_on_large_tensors_are_left_to_the_graph(monkeypatch, precompiler):
    """The precompiler runs each kernel on zeros of its arguments' shapes: one whose arguments
    and outputs take more than its byte budget is compiled by the graph instead, with the same
    outputs."""
    import tensorflow as tf

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)
    small = (np.float32(np.arange(-60, 60).reshape(3, 40)), np.full(40, 2.0 ** -3), np.float32(0.5))
    large = (np.float32(np.arange(-600, 600).reshape(30, 40)), np.full(40, 2.0 ** -3), np.float32(0.5))
    monkeypatch.setattr(qops, "_PRECOMPILE_MAX_BYTES", 2 * (120 * 4 + 40 * 8 + 4))  # the small call's arguments, twice
    kernel = qops.compiled(_requantize_like)
    step = tf.function(lambda *args: [kernel(*a) for a in args])
    step.get_concrete_function(small, large)
    precompiler.wait()
    assert len(precompiler.compiled_kernels) == 1
    outputs = []
    assert _xla_compilations(lambda: outputs.extend(step(small, large))) == 1
    for got, args in zip(outputs, (small, large)):
        assert same_bits(np.asarray(got), np.asarray(_requantize_like(*args)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compiled is the function itself on other backends")
def test_a_kernel_that_fails_to_compile_ahead_is_left_to_the_graph(monkeypatch, precompiler):
    """A failure on the precompiler's thread reaches no one: the thread ends, and the graph
    compiles and runs the kernel itself."""
    import tensorflow as tf

    monkeypatch.setattr(qops, "_in_keras_step", lambda graph: True)
    monkeypatch.setattr(qops, "_zeros_like_specs", lambda specs: 1 / 0)
    kernel = qops.compiled(_requantize_like)
    args = (np.float32(np.arange(-40, 40).reshape(2, 40)), np.full(40, 2.0 ** -3), np.float32(0.5))
    step = tf.function(lambda *a: kernel(*a))
    got = step(*args)
    precompiler.wait()
    assert precompiler.compiled_kernels == []
    assert same_bits(np.asarray(got), np.asarray(_requantize_like(*args)))


# ---- split_evenly: channel groups --------------------------------------------------------------


@pytest.mark.parametrize("size, count, axis", [(1001, 2, -1), (300, 7, 1), (12, 3, 0)])
def test_split_evenly_gives_parts_within_one_of_each_other(size, count, axis):
    """Sizes differ by at most one, the larger first, and the parts put back together are
    ``x``; on TensorFlow, one op in a graph."""
    import keras

    shape = [2, 3, 4]
    shape[axis] = size
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    parts = [to_numpy(part) for part in qops.split_evenly(keras.ops.convert_to_tensor(x), count, axis)]
    sizes = [part.shape[axis] for part in parts]
    assert len(parts) == count and sum(sizes) == size and sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    assert np.array_equal(np.concatenate(parts, axis=axis), x)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        graph = tf.function(lambda t: qops.split_evenly(t, count, axis)).get_concrete_function(tf.TensorSpec(shape)).graph
        assert [op.type for op in graph.get_operations() if op.type not in ("Placeholder", "Const", "Identity")] == ["SplitV"]


@pytest.mark.parametrize("count", [0, 5])
def test_split_evenly_refuses_a_count_outside_the_axis(count):
    import keras

    with pytest.raises(ValueError, match="count must be between 1 and the size of axis -1 \\(4\\), got"):
        qops.split_evenly(keras.ops.zeros((2, 4)), count, -1)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", [1, 17, 0, -8, 8.0, True, "8"])
def test_num_bits_outside_2_to_16_is_rejected(num_bits):
    with pytest.raises(ValueError, match="num_bits"):
        qops.fake_quant(np.zeros(3, np.float32), -1.0, 1.0, num_bits=num_bits)


@pytest.mark.parametrize("axis,shape", [(2, (3, 4)), (-3, (3, 4)), ((0, 0), (3, 4)), ("1", (3,))])
def test_bad_axis_is_rejected(axis, shape):
    with pytest.raises(ValueError, match="axis"):
        qops.fake_quant(np.zeros(shape, np.float32), np.zeros(3), np.ones(3), axis=axis)


def test_per_axis_on_a_scalar_is_rejected():
    with pytest.raises(ValueError, match="rank >= 1"):
        qops.fake_quant(np.float32(1.0), np.zeros(1), np.ones(1), axis=0)


def test_integer_inputs_are_rejected():
    with pytest.raises(ValueError, match="floating-point inputs, got dtype int32"):
        qops.fake_quant(np.arange(4, dtype=np.int32), -1.0, 1.0)


@pytest.mark.parametrize("lo,hi", [(np.nan, 1.0), (-1.0, np.inf), (-np.inf, 0.0)])
def test_non_finite_ranges_are_rejected(lo, hi):
    with pytest.raises(ValueError, match="finite"):
        qops.fake_quant(np.zeros(3, np.float32), lo, hi)


def test_inverted_range_is_rejected():
    with pytest.raises(ValueError, match="min must be <= max"):
        qops.fake_quant(np.zeros(3, np.float32), 1.0, -1.0)


def test_range_shape_must_match_the_channels():
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        qops.fake_quant(np.zeros((2, 4), np.float32), np.zeros(3), np.ones(3), axis=-1)
    with pytest.raises(ValueError, match="scalar min"):
        qops.fake_quant(np.zeros((2, 4), np.float32), np.zeros(4), np.ones(4))


def test_compiles_says_where_a_compiled_function_runs_as_one_kernel():
    """Only while TensorFlow traces a graph, and only for inputs of ``min_elements`` or more per
    example; eagerly and on other backends the function runs op by op."""
    x = np.zeros((2, 8, 8), np.float32)
    assert not qops.compiles(x, 16)
    if BACKEND != "tensorflow":
        return
    import tensorflow as tf

    seen = {}

    @tf.function
    def trace(t):
        seen["large"], seen["small"] = qops.compiles(t, 64), qops.compiles(t, 65)
        return t

    trace(x)
    assert seen == {"large": True, "small": False}


# ---- batch normalization in training ----------------------------------------------------------


def _numpy_batch_norm(x, scale, offset, epsilon, upstream):
    """Float64 oracle: the normalized tensor, batch mean and population variance, and the
    gradients with respect to (x, scale, offset) for the upstream gradient ``upstream``."""
    x, g = x.astype(np.float64), upstream.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, variance = x.mean(axes), x.var(axes)
    inv_std = 1.0 / np.sqrt(variance + epsilon)
    normalized = (x - mean) * inv_std
    d_x = scale * inv_std * (g - g.mean(axes) - normalized * (g * normalized).mean(axes))
    return normalized * scale + offset, mean, variance, (d_x, (g * normalized).sum(axes), g.sum(axes))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the fused kernel is TensorFlow's")
@pytest.mark.parametrize("shape", [(3, 7, 5), (6, 4, 3, 5), (7, 3, 5)], ids=["rank3", "rank4", "rank3_odd"])
def test_fused_batch_normalize_statistics_alike_for_static_and_unknown_shapes(shape, monkeypatch):
    """The fused kernel's population variance (its Bessel-corrected one rescaled) is bit for bit
    the same whether the element count is known when traced (the factor computed in NumPy) or
    only when run (in the graph)."""
    import tensorflow as tf

    monkeypatch.setattr(qops, "_FUSED_BATCH_NORM_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(11)
    x = (rng.normal(size=shape) * rng.uniform(0.01, 30.0, shape[-1]) + 0.5).astype(np.float32)
    scale, offset = np.ones(shape[-1], np.float32), np.zeros(shape[-1], np.float32)
    unknown = tf.TensorSpec([None] * len(shape[:-1]) + [shape[-1]], tf.float32)
    dynamic = tf.function(lambda x: qops.batch_normalize(x, scale, offset, 1e-3), input_signature=[unknown])
    static = tf.function(lambda x: qops.batch_normalize(x, scale, offset, 1e-3))
    for got, want in zip(dynamic(tf.constant(x)), static(tf.constant(x))):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    sizes = [[op for op in f.get_concrete_function(tf.constant(x)).graph.get_operations() if op.type == "Size"] for f in (dynamic, static)]
    assert sizes[0] and not sizes[1], "the element count from the graph only where the shape is unknown"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate_ops"])
@pytest.mark.parametrize("shape", [(32, 5), (8, 6, 5), (4, 3, 6, 5), (2, 3, 2, 4, 5)], ids=["rank2", "rank3", "rank4", "rank5"])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-6], ids=["eps_1e-3", "eps_1e-6"])
def test_batch_normalize_is_batch_normalization_with_population_statistics(shape, epsilon, fused, monkeypatch):
    """Values, statistics and gradients against float64 NumPy, for the fused kernel (on
    TensorFlow, for large tensors; forced here) and the separate ops; an epsilon below the
    1.001e-5 that ``tf.nn.fused_batch_norm`` imposes is kept, as Keras's BatchNormalization
    keeps it."""
    if fused and BACKEND != "tensorflow":
        pytest.skip("the fused kernel is TensorFlow's")
    monkeypatch.setattr(qops, "_FUSED_BATCH_NORM_MIN_ELEMENTS", 0 if fused else float("inf"))
    rng = np.random.default_rng(3)
    # Channels of very different spread, one of them constant (variance 0: epsilon decides).
    # Spreads stay within a few digits of the mean: Keras's moments, which the other backends
    # run, compute the variance as E[x**2] - E[x]**2.
    x = (rng.normal(size=shape) * np.array([1e-2, 0.1, 1.0, 30.0, 0.0]) + 0.5).astype(np.float32)
    scale = rng.uniform(-2.0, 2.0, 5).astype(np.float32)
    offset = rng.normal(size=5).astype(np.float32)
    upstream = rng.normal(size=shape).astype(np.float32)
    want, want_mean, want_variance, want_gradients = _numpy_batch_norm(x, scale, offset, epsilon, upstream)

    got, mean, variance = (to_numpy(t) for t in qops.batch_normalize(x, scale, offset, epsilon))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(variance, want_variance, rtol=1e-4, atol=1e-7)
    if BACKEND != "tensorflow":
        return  # the separate ops' gradients are the backend's autodiff of Keras's moments
    import tensorflow as tf

    @tf.function
    def gradients(x, scale, offset):
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset])
            y, _, _ = qops.batch_normalize(x, scale, offset, epsilon)
        return tape.gradient(y, [x, scale, offset], output_gradients=tf.constant(upstream))

    for got_gradient, want_gradient in zip(gradients(*(tf.constant(v) for v in (x, scale, offset))), want_gradients):
        np.testing.assert_allclose(got_gradient.numpy(), want_gradient, rtol=1e-3, atol=1e-3 * np.abs(want_gradient).max())
