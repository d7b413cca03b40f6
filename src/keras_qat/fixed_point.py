"""TFLite's fixed-point requantization, written once for NumPy and for ``keras.ops``.

An integer kernel accumulates in int32 and scales the accumulator by a real multiplier
``M = input_scale * weight_scale / output_scale``. TFLite's reference kernels (and gemmlowp)
represent ``M`` as a 31-bit fixed-point mantissa ``m0`` and a power-of-two ``shift``
(``QuantizeMultiplier``), and compute ``acc * M`` as ``RoundingDivideByPOT(
SaturatingRoundingDoublingHighMul(acc << max(shift, 0), m0), max(-shift, 0))``
(``MultiplyByQuantizedMultiplier``). That rounds twice: first to 31 fractional bits, then
to an integer, so a product a few thousandths of a step below one half can round up, which a
single rounding (or fake quantization) never does. The runtime and the QAT model's inference
both use these functions, so that they compute exactly what the deployed model computes.

Every function takes ``xp``: the ``numpy`` module or ``keras.ops``. Integer arguments are
int64 arrays (values in the int32 range unless said otherwise).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

_ONE_30 = 1 << 30
_ONE_31 = 1 << 31


def _cast(xp, x, dtype: str):
    if xp is np:
        return np.asarray(x).astype(dtype)
    return xp.cast(x, dtype)


def quantize_multiplier(multiplier, xp=np):
    """TFLite's ``QuantizeMultiplier`` of real multipliers >= 0, in float64.

    Returns ``(m0, shift)`` as int64 arrays (tensors with ``xp=keras.ops``) with
    ``multiplier ~= m0 * 2**(shift - 31)`` and ``m0`` in ``[2**30, 2**31)``; TFLite flushes
    zero and multipliers below ``2**-31`` to ``(0, 0)``. The exponent comes from ``log2`` (``frexp``
    is no keras op), corrected by one where rounding put the mantissa outside ``[0.5, 1)``;
    scaling by powers of two is exact, so the mantissa is ``frexp``'s.

    Raises:
        ValueError: in NumPy, for a negative or non-finite multiplier.
    """
    if xp is np:
        multiplier = np.asarray(multiplier, dtype=np.float64)
        if np.any(~np.isfinite(multiplier)) or np.any(multiplier < 0):
            raise ValueError(f"quantize_multiplier: multipliers must be finite and >= 0, got {multiplier}.")
    else:
        multiplier = xp.cast(multiplier, "float64")
    safe = xp.where(multiplier > 0, multiplier, 1.0)
    shift = floor(xp, xp.log2(safe)) + 1.0
    mantissa = safe * xp.power(2.0, -shift)
    shift = xp.where(mantissa >= 1.0, shift + 1.0, xp.where(mantissa < 0.5, shift - 1.0, shift))
    mantissa = safe * xp.power(2.0, -shift)
    m0 = floor(xp, mantissa * float(_ONE_31) + 0.5)
    carry = m0 == float(_ONE_31)
    m0 = xp.where(carry, m0 / 2.0, m0)
    shift = xp.where(carry, shift + 1.0, shift)
    keep = (multiplier > 0) & (shift >= -31.0)
    return _cast(xp, xp.where(keep, m0, 0.0), "int64"), _cast(xp, xp.where(keep, shift, 0.0), "int64")


def floor(xp, x):
    """``xp.floor(x)`` in ``x``'s own dtype. Keras's floor returns float32 for float64 input on
    JAX and PyTorch, which would round away the low bits of the float64 integers that the
    arithmetic below holds; there it is taken from the truncation through int64 instead
    (exact for ``|x| < 2**63``)."""
    rounded = xp.floor(x)
    if xp is np or rounded.dtype == x.dtype:
        return rounded
    truncated = xp.cast(xp.cast(x, "int64"), x.dtype)
    return xp.where(truncated > x, truncated - 1.0, truncated)


def ceil(xp, x):
    """``xp.ceil(x)`` in ``x``'s own dtype (see :func:`floor`)."""
    return -floor(xp, -x)


def round_half_away(xp, x):
    """``std::round``: to the nearest integer, ties away from zero (TFLite's ``TfLiteRound``)."""
    return xp.sign(x) * floor(xp, xp.abs(x) + 0.5)


def saturating_rounding_doubling_high_mul(xp, a, b):
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2**31)``, ties away
    from zero, for int64 ``a`` (int32 range) and ``b`` in ``[0, 2**31)``."""
    product = a * b
    nudge = _cast(xp, xp.where(product >= 0, _ONE_30, 1 - _ONE_30), "int64")
    total = product + nudge
    # C++ integer division truncates toward zero; a right shift floors.
    magnitude = xp.right_shift(xp.abs(total), 31)
    return xp.where(total >= 0, magnitude, -magnitude)


def rounding_divide_by_pot(xp, x, exponent):
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded half away from zero."""
    one = xp.ones_like(exponent)
    mask = xp.left_shift(one, exponent) - one
    remainder = xp.bitwise_and(x, mask)
    threshold = xp.right_shift(mask, one) + _cast(xp, x < 0, "int64")
    return xp.right_shift(x, exponent) + _cast(xp, remainder > threshold, "int64")


def multiply_by_quantized_multiplier(xp, x, m0, shift):
    """TFLite's ``MultiplyByQuantizedMultiplier(x, m0, shift)`` on int64 arrays: ``x * M``
    rounded as the int8 kernels round it (``m0``/``shift`` broadcast against ``x``)."""
    zero = xp.zeros_like(shift)
    left = xp.maximum(shift, zero)
    right = xp.maximum(-shift, zero)
    scaled = xp.left_shift(x, left)
    return rounding_divide_by_pot(xp, saturating_rounding_doubling_high_mul(xp, scaled, m0), right)


def multiply_by_quantized_multiplier_single_rounding(xp, x, m0, shift):
    """``x * M`` rounded once, half up: ``(x * m0 + 2**(30 - shift)) >> (31 - shift)``, as
    TFLite's reference int8 FULLY_CONNECTED (and XNNPACK) requantize. ``x`` times ``m0`` must
    fit in int64 (``|x| < 2**32``)."""
    total_shift = 31 - shift
    one = xp.ones_like(total_shift)
    rounding = xp.left_shift(one, total_shift - one)
    return xp.right_shift(x * m0 + rounding, total_shift)


class Float64Multiplier(NamedTuple):
    """A fixed-point multiplier ``(m0, shift)`` as the float64 constants with which
    :func:`multiply_by_quantized_multiplier_float64` and :func:`multiply_by_quantized_multiplier_clipped`
    compute ``x * M`` as the kernel rounds it. They depend on the multiplier alone (one per
    output channel), so the QAT model's inference computes them with the layer's other
    parameters and its per-element tail (:mod:`keras_qat.emulation`) only multiplies, adds
    and floors.

    With ``e = shift + left_shift - 31``:

    Attributes:
        whole: ``M = m0 * 2**e``, exact in float64 (``m0`` has 31 bits).
        high_half, low_half: ``m0 = high_part * 2**16 + low_part`` as ``high_part * 2**(e + 16)``
            and ``low_part * 2**e``, so that each product with an accumulator below 2**37 is exact.
        offset, negative_offset: ``c`` for ``x >= 0`` and for ``x < 0``: 1/2, and for the
            double rounding with a right shift ``r = -shift``, plus or minus ``2**-(r+1)``.
    """

    whole: Any
    high_half: Any
    low_half: Any
    offset: Any
    negative_offset: Any

    @classmethod
    def of(cls, xp, m0, shift, single_rounding: bool = False, left_shift: int = 0) -> "Float64Multiplier":
        """The constants of ``(m0, shift)`` (int64, or float64 holding them)."""
        m0, shift = _cast(xp, m0, "float64"), _cast(xp, shift, "float64")
        high_part = floor(xp, m0 * 2.0**-16)
        low_part = m0 - high_part * 65536.0
        step = xp.power(2.0, shift + float(left_shift - 31))
        if single_rounding:
            half = 0.5 + xp.zeros_like(shift)
            return cls(m0 * step, high_part * (step * 65536.0), low_part * step, half, half)
        nudge = xp.where(shift < 0.0, xp.power(2.0, shift - 1.0), 0.0)
        return cls(m0 * step, high_part * (step * 65536.0), low_part * step, 0.5 + nudge, 0.5 - nudge)

    def _offset(self, xp, x):
        return xp.where(x < 0.0, self.negative_offset, self.offset)

    def split(self, xp, x):
        """:func:`multiply_by_quantized_multiplier_float64` of float64 integers ``x``."""
        u = x * self.high_half
        w = x * self.low_half
        whole_u = floor(xp, u)
        t = (u - whole_u) + self._offset(xp, x)
        whole_t = floor(xp, t)
        whole_w = floor(xp, w)
        carry = _cast(xp, (w - whole_w) >= 1.0 - (t - whole_t), "float64")
        return (whole_u + whole_t) + (whole_w + carry)

    def clipped(self, xp, x):
        """:func:`multiply_by_quantized_multiplier_clipped` of float64 integers ``x``."""
        return floor(xp, x * self.whole + self._offset(xp, x))


#: float64 holds every integer up to 2**53; within its reach the clipped form stays under half of that.
_FLOAT64_SAFE = float(2**52)


def clipped_float64_fits(xp, m0, shift, limit, left_shift: int = 0):
    """Whether :func:`multiply_by_quantized_multiplier_clipped` is exact for every channel's
    multiplier wherever its result lies within ``[-limit, limit]`` (a scalar bool): while
    ``reach * m0`` and ``(limit + 3) / 2**(shift + left_shift - 31)`` stay below 2**52, where
    the reach is the magnitude of the inputs whose results lie beyond ``limit``. That fails for
    multipliers below about ``limit * 2**-21``."""
    m0, shift = _cast(xp, m0, "float64"), _cast(xp, shift, "float64")
    exponent = shift + float(left_shift - 31)
    multiplier = m0 * xp.power(2.0, exponent)
    positive = multiplier > 0.0
    reach = xp.where(positive, ceil(xp, (limit + 1.0) / xp.where(positive, multiplier, 1.0)), 0.0)
    fits = (reach * m0 <= _FLOAT64_SAFE) & ((limit + 3.0) * xp.power(2.0, -exponent) <= _FLOAT64_SAFE)
    return xp.all(fits)


def multiply_by_quantized_multiplier_clipped(xp, x, m0, shift, single_rounding: bool = False, left_shift: int = 0):
    """:func:`multiply_by_quantized_multiplier_float64` in fewer operations, exact wherever its
    result lies within ``[-limit, limit]`` and :func:`clipped_float64_fits` holds for ``limit``:
    ``floor(x * M + c)`` (see :func:`multiply_by_quantized_multiplier_float64` for ``c``), the
    product taken whole.

    Within the limit, ``|x|`` is below the reach, so ``x * m0`` stays below 2**52 and the
    product is exact. Beyond it, ``|x * M| >= limit + 1`` exactly, the float64 product is
    within a relative 2**-53 of that, and the result keeps its sign and stays beyond
    ``limit``: clamping to any range inside ``[-limit, limit]`` gives the kernel's values.
    """
    return Float64Multiplier.of(xp, m0, shift, single_rounding, left_shift).clipped(xp, x)


#: The float64 form below is exact for accumulators below this magnitude: each half of the
#: split multiplier (:func:`multiply_by_quantized_multiplier_float64`) times them stays under 2**53.
FLOAT64_EXACT_BOUND = 2**37


def multiply_by_quantized_multiplier_float64(xp, x, m0, shift, single_rounding: bool = False, left_shift: int = 0):
    """:func:`multiply_by_quantized_multiplier` of ``x * 2**left_shift`` (or its single rounding)
    in float64 arithmetic, exactly, for every multiplier and every ``|x| < 2**37``
    (:data:`FLOAT64_EXACT_BOUND`), with a dozen elementwise float operations where the int64
    form takes two dozen integer ones. The QAT model's inference takes it where the cheaper
    :func:`multiply_by_quantized_multiplier_clipped` is not exact (small multipliers).

    Both roundings collapse into one. With ``r = -shift > 0``, the kernel computes
    ``n = floor(q / 2**31 + 1/2)`` of the exact product ``q = x * 2**left_shift * m0`` and then
    rounds ``n / 2**r`` half away from zero; nested floors of divisions by integers are one
    floor, so the result is ``floor(z + c)`` for ``z = q / 2**(31 + r)`` and
    ``c = 1/2 + 2**-(r+1)`` for ``x >= 0`` and ``1/2 - 2**-(r+1)`` for ``x < 0`` (where
    ``q >= -2**30``, ``x >= 0`` up to a case that rounds alike). A left shift (``shift >= 0``) and the single rounding have ``c = 1/2``.

    ``z`` needs up to 62 bits, so it is never formed. ``m0 = high * 2**16 + low`` splits it into
    ``u = x * high * 2**(e+16)`` and ``w = x * low * 2**e`` (``e = shift + left_shift - 31``),
    each product of integers below 2**53 and so exact, as are their integer and fractional
    parts. Then ``floor(z + c) = floor(u) + floor(frac(u) + c) + floor(w) + carry``, where the
    carry (0 or 1) of the two remaining fractions is a comparison of exact values.

    Args:
        x: float64 integers (an accumulator, or codes); m0, shift: int64, broadcast against
            ``x``'s last axis.

    Returns:
        float64 integers, the kernel's results.
    """
    return Float64Multiplier.of(xp, m0, shift, single_rounding, left_shift).split(xp, x)


def divide_multiplier(xp, m0, shift, count: int):
    """The multiplier ``(m0, shift)`` divided by ``count`` as TFLite's integer MEAN does it:
    ``k = min(floor(log2(count)), 32, 31 + shift)``, ``m0 * 2**k // count``, ``shift - k``."""
    k = xp.minimum(_cast(xp, min(int(count).bit_length() - 1, 32), "int64") + xp.zeros_like(shift), 31 + shift)
    return xp.floor_divide(xp.left_shift(m0, k), count), shift - k


def add_left_shift(bits: int) -> int:
    """The bits TFLite's ADD shifts both inputs up by before rescaling them to a common scale:
    20 for 8-bit inputs, 15 for wider ones (its int16 kernel), so that the shifted codes
    stay within 31 bits."""
    return 20 if bits <= 8 else 15


__all__ = [
    "floor",
    "ceil",
    "round_half_away",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_single_rounding",
    "multiply_by_quantized_multiplier_float64",
    "FLOAT64_EXACT_BOUND",
    "Float64Multiplier",
    "multiply_by_quantized_multiplier_clipped",
    "clipped_float64_fits",
    "divide_multiplier",
    "add_left_shift",
]
