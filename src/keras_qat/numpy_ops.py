"""The ``keras.ops`` functions that a layer's integer parameters are computed with, in NumPy.

A layer's integer parameters (:func:`keras_qat.emulation.kernel_parameters_fn` and its kin) are
written once against ``keras.ops`` and run in the QAT model's graphs. :func:`keras_qat.ops.memoized`
recomputes them outside the graph whenever a range, bias or BN statistic changes, and learns
their shapes and dtypes before the graph exists: about 150 scalar and per-channel operations
per layer, which TensorFlow runs eagerly at about 30 us each (MobileNetV2: 5 ms a layer, about
0.6 s of its first inference call). Passed as ``xp``, this module runs the same code path, the
graph's own, operation for operation in NumPy, in about a tenth of that.

The results are the graph's bits: every operation here is one that IEEE 754 rounds exactly
(addition, multiplication, division, comparisons, floor, casts) or that the parameters only
use where its rounding cannot matter (``log2``, whose exponent
:func:`keras_qat.fixed_point.quantize_multiplier` corrects). The exceptions:

* ``rsqrt``, whose TensorFlow kernel differs from ``1 / sqrt`` in the last bit: it is the
  backend's own op;
* subnormal floats, which TensorFlow's CPU kernels flush to zero and NumPy keeps: the
  parameters make none from normal values (ranges narrower than
  :data:`keras_qat.grid.MIN_RANGE_WIDTH` are degenerate; a BN factor below the smallest normal
  float32 counts as zero), and :func:`keras_qat.ops.memoized` leaves a run whose inputs or
  outputs hold one to TensorFlow;
* the sign of a zero where ``maximum`` or ``minimum`` meets ``+0`` and ``-0``, which
  TensorFlow's kernels do not decide alike either: only a range that excludes zero reaches
  it, and the quantizers' ranges include it.

``tests/test_numpy_ops.py`` compares every memoized function's outputs in both, bit for bit.

Only the functions those parameters use are here; any other raises ``AttributeError``.
"""

from __future__ import annotations

import numpy as np


def convert_to_tensor(x, dtype=None):
    return np.asarray(x) if dtype is None else np.asarray(x, np.dtype(dtype))


def cast(x, dtype):
    return np.asarray(x).astype(np.dtype(dtype))


def where(condition, x, y):
    return np.where(condition, x, y)


def rsqrt(x):
    """The backend's own ``rsqrt``, run eagerly (TensorFlow's differs from ``1 / sqrt`` in the
    last bit)."""
    import keras

    return keras.ops.convert_to_numpy(keras.ops.rsqrt(np.asarray(x)))


def exact_divide(x, y):
    """:func:`keras_qat.ops.exact_divide` in NumPy: ``x / y``, 0 where ``y`` is 0, as
    TensorFlow's ``DivNoNan`` divides."""
    x, y = np.asarray(x), np.asarray(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y == 0, np.zeros((), np.result_type(x, y)), x / y)


def zeros(shape, dtype="float32"):
    return np.zeros(shape, np.dtype(dtype))


def reshape(x, shape):
    return np.reshape(x, shape)


def logical_and(x, y):
    return np.logical_and(x, y)


def all(x, axis=None):  # noqa: A001 - keras.ops's name
    return np.all(x, axis=axis)


# Elementwise functions whose NumPy and keras.ops forms agree in name and semantics (but see
# the module's docstring on the sign of zero).
abs = np.abs  # noqa: A001
clip = np.clip
equal = np.equal
floor = np.floor
log2 = np.log2
maximum = np.maximum
minimum = np.minimum
ones_like = np.ones_like
zeros_like = np.zeros_like
power = np.power
sign = np.sign


__all__ = [
    "convert_to_tensor", "cast", "where", "rsqrt", "exact_divide", "zeros", "reshape", "logical_and",
    "all", "abs", "clip", "equal", "floor", "log2", "maximum", "minimum", "ones_like", "zeros_like",
    "power", "sign",
]
