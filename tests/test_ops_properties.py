"""Properties of fake quantization that hold for every input (hypothesis).

The oracle for the grid is TensorFlow's op itself: ``nudged_min``/``nudged_max`` are read off
it by quantizing values far outside the range.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_qat import ops as qops
from tests.conftest import same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.numerics

bits = st.integers(2, 16)
narrow = st.booleans()
magnitudes = st.floats(1e-3, 1e3)
fractions = st.floats(0.0, 1.0)


@st.composite
def ranges(draw, channels=None):
    """Ranges that contain zero (as keras-qat produces them), one or per channel."""
    count = channels or 1
    lows, highs = [], []
    for _ in range(count):
        width = draw(magnitudes)
        share = draw(fractions)  # how much of the range lies below zero
        lows.append(-width * share)
        highs.append(width * (1 - share) if share < 1 else 0.0)
        if highs[-1] - lows[-1] < 1e-3:
            highs[-1] = lows[-1] + 1e-3
    lo, hi = np.float32(lows), np.float32(highs)
    return (lo, hi) if channels else (lo[0], hi[0])


def inputs(shape):
    return hnp.arrays(np.float32, shape, elements=st.floats(-2e3, 2e3, width=32))


def _grid(lo, hi, num_bits, narrow_range, axis=None):
    """nudged_min, nudged_max and scale as TF computes them (per channel if ``axis``)."""
    qmin, qmax = qops.quant_range(num_bits, narrow_range)
    probe = np.float32([-3e38, 3e38])
    if axis is None:
        ends = tf_fake_quant(probe, lo, hi, num_bits, narrow_range)
        return ends[0], ends[1], (ends[1] - ends[0]) / (qmax - qmin)
    ends = tf_fake_quant(np.repeat(probe[:, None], len(lo), 1), lo, hi, num_bits, narrow_range, -1)
    return ends[0], ends[1], (ends[1] - ends[0]) / (qmax - qmin)


@given(x=inputs((7, 5)), rng=ranges(), num_bits=bits, narrow_range=narrow)
def test_fake_quant_is_idempotent(x, rng, num_bits, narrow_range):
    once = to_numpy(qops.fake_quant(x, *rng, num_bits=num_bits, narrow_range=narrow_range))
    twice = to_numpy(qops.fake_quant(once, *rng, num_bits=num_bits, narrow_range=narrow_range))
    assert same_bits(once, twice)


@given(x=inputs((40, 3)), rng=ranges(channels=3), num_bits=st.integers(2, 5), narrow_range=narrow)
def test_at_most_2_to_the_bits_values_per_channel(x, rng, num_bits, narrow_range):
    out = to_numpy(qops.fake_quant(x, *rng, num_bits=num_bits, narrow_range=narrow_range, axis=-1))
    qmin, qmax = qops.quant_range(num_bits, narrow_range)
    for channel in range(3):
        assert len(np.unique(out[:, channel])) <= qmax - qmin + 1 <= 2**num_bits


@given(rng=ranges(channels=4), num_bits=bits, narrow_range=narrow, per_axis=st.booleans())
def test_zero_is_exactly_representable(rng, num_bits, narrow_range, per_axis):
    x = np.zeros((3, 4), np.float32)
    lo, hi = rng if per_axis else (rng[0][0], rng[1][0])
    out = to_numpy(
        qops.fake_quant(x, lo, hi, num_bits=num_bits, narrow_range=narrow_range, axis=-1 if per_axis else None)
    )
    assert np.all(out == 0.0)


@given(x=inputs((6, 4)), rng=ranges(channels=4), num_bits=bits, narrow_range=narrow, per_axis=st.booleans())
def test_error_to_the_clipped_input_is_at_most_half_a_step(x, rng, num_bits, narrow_range, per_axis):
    lo, hi = rng if per_axis else (rng[0][0], rng[1][0])
    axis = -1 if per_axis else None
    out = to_numpy(qops.fake_quant(x, lo, hi, num_bits=num_bits, narrow_range=narrow_range, axis=axis))
    nudged_min, nudged_max, _ = _grid(lo, hi, num_bits, narrow_range, axis)
    qmin, qmax = qops.quant_range(num_bits, narrow_range)
    # Checked in float64, so that the check adds no rounding of its own. In exact arithmetic
    # the error is at most scale / 2; TF's float32 evaluation adds the rounding of the output
    # k * scale (half an ulp at the range's magnitude) and of the level choice (another half).
    scale = (nudged_max.astype(np.float64) - nudged_min) / (qmax - qmin)
    ulp = np.spacing(np.maximum(np.abs(nudged_min), np.abs(nudged_max)).astype(np.float32))
    clipped = np.clip(x.astype(np.float64), nudged_min, nudged_max)
    assert np.all(np.abs(out.astype(np.float64) - clipped) <= scale / 2 + ulp)
