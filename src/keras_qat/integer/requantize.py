"""Requantization: an integer accumulator times a real multiplier, onto an output grid.

Every int8 kernel ends the same way: ``acc * M`` in TFLite's fixed point (``M`` held as a 31-bit
mantissa ``m0`` and a power-of-two ``shift``, :func:`keras_qat.fixed_point.quantize_multiplier`),
rounded twice (the convolutions, ADD, MEAN) or once (the reference FULLY_CONNECTED), plus the
output zero point, clamped to the output range narrowed by a fused ReLU/ReLU6.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from keras_qat import fixed_point as fp
from keras_qat.fixed_point import _cast
from keras_qat.grid import IntegerGrid


def as_float64(xp, scale):
    """Float32 scales widened to float64, where TFLite's ``Prepare`` computes multipliers."""
    return np.asarray(scale, np.float32).astype(np.float64) if xp is np else _cast(xp, scale, "float64")


def safe_scale(xp, scale):
    """``scale`` with 0 (an empty range, whose values are all 0) replaced by 1, so that a
    multiplier dividing by it stays finite; what such a grid holds is then 0 whatever it is."""
    return xp.where(scale == 0, 1.0, scale) if xp is np else xp.where(xp.equal(scale, 0.0), xp.ones_like(scale), scale)


def scale_ratio(xp, numerator, denominator):
    """``numerator / denominator`` of float32 scales, in float64 (TFLite's ``Prepare``)."""
    return as_float64(xp, numerator) / as_float64(xp, safe_scale(xp, denominator))


@dataclass(frozen=True)
class Requantize:
    """``acc * M`` rounded as the kernel rounds it, plus ``zero_point``, clamped to ``[low, high]``.

    Attributes:
        m0, shift: ``M`` in fixed point (int64; one per output channel, or one).
        zero_point: the output grid's zero point.
        low, high: the output codes a fused activation leaves (``activation_bounds``).
        single_rounding: round once (TFLite's reference FULLY_CONNECTED) instead of twice.
    """

    m0: Any
    shift: Any
    zero_point: Any
    low: Any
    high: Any
    single_rounding: bool = False

    @classmethod
    def lower(
        cls, multiplier, out: IntegerGrid, activation: str = "linear", single_rounding: bool = False, xp=np
    ) -> "Requantize":
        """The requantization by real ``multiplier`` (float64) onto ``out`` after ``activation``."""
        m0, shift = fp.quantize_multiplier(multiplier, xp)
        low, high = out.activation_bounds(activation, xp)
        return cls(m0, shift, out.zero_point, low, high, bool(single_rounding))

    @classmethod
    def between(cls, grid: IntegerGrid, out: IntegerGrid, activation: str = "linear", single_rounding: bool = False, xp=np):
        """Centered codes on ``grid`` moved onto ``out``: the multiplier ``scale / out.scale``."""
        return cls.lower(scale_ratio(xp, grid.scale, out.scale), out, activation, single_rounding, xp)

    def divided(self, count: int, xp=np) -> "Requantize":
        """This requantization with its multiplier divided by ``count`` in TFLite's integer MEAN
        arithmetic (:func:`keras_qat.fixed_point.divide_multiplier`)."""
        m0, shift = fp.divide_multiplier(xp, self.m0, self.shift, count)
        return replace(self, m0=m0, shift=shift)

    def __call__(self, accumulator, xp=np):
        """The output codes of exact-integer ``accumulator``: int64 in NumPy, float32 tensors
        holding integers in a graph (where they meet float zero points)."""
        multiply = fp.multiply_by_quantized_multiplier_single_rounding if self.single_rounding else fp.multiply_by_quantized_multiplier
        if xp is np:
            accumulator = np.asarray(accumulator, np.int64)
            m0, shift = np.asarray(self.m0, np.int64), np.asarray(self.shift, np.int64)
            if accumulator.size and int(np.abs(accumulator).max()) >= 2**31:
                # A wide accumulator (16-bit operands): its product with the 31-bit multiplier
                # needs more than 64 bits, so it is taken in Python's exact integers.
                scaled = multiply(np, accumulator.astype(object), m0.astype(object), shift).astype(np.int64)
            else:
                scaled = multiply(np, accumulator, m0, shift)
            return np.clip(scaled + self.zero_point, self.low, self.high)
        scaled = multiply(xp, xp.cast(accumulator, "int64"), self.m0, self.shift)
        codes = xp.cast(scaled, "float32") + self.zero_point
        return xp.minimum(xp.maximum(codes, self.low), self.high)

    def clipped_fits(self, xp):
        """Whether :meth:`centered`'s cheaper ``"clipped"`` form is exact for every channel (a
        scalar bool tensor): :func:`keras_qat.fixed_point.clipped_float64_fits`."""
        return fp.clipped_float64_fits(xp, self.m0, self.shift, self._limit(xp))

    def _limit(self, xp):
        zero_point = xp.cast(self.zero_point, "float32")
        return xp.cast(xp.maximum(xp.abs(self.low - zero_point), xp.abs(self.high - zero_point)), "float64")

    def float64_multiplier(self, xp) -> fp.Float64Multiplier:
        """The multiplier as the float64 constants of :meth:`centered` (one per channel), which
        a caller that runs :meth:`centered` many times computes once."""
        return fp.Float64Multiplier.of(xp, self.m0, self.shift, self.single_rounding)

    def centered(self, accumulator, xp, offset=None, scale=None, form: str = "split"):
        """In a ``keras.ops`` graph (the QAT model's inference): the output codes minus the zero
        point, clamped (float32 holding integers), equal to ``__call__``'s codes minus the zero
        point, of ``accumulator + offset`` (float64 integers, such as bias codes), times
        ``scale`` where given.

        In float64 and without a per-element branch, in one of two forms:
        ``form="split"`` computes the exact
        :func:`keras_qat.fixed_point.multiply_by_quantized_multiplier_float64` (every multiplier,
        every int32 accumulator); ``"clipped"`` the cheaper
        :func:`keras_qat.fixed_point.multiply_by_quantized_multiplier_clipped`, exact only where
        :meth:`clipped_fits`. Each is the whole tail, so that a compiler fuses it into one loop;
        a caller that compiles the tail chooses the form outside it, so that only the form that
        runs is compiled, and calls :func:`centered_output` with :meth:`float64_multiplier`
        computed once, so that the loop holds only the per-element work.
        """
        multiplier = self.float64_multiplier(xp)
        return centered_output(accumulator, multiplier, self.zero_point, self.low, self.high, xp, offset, scale, form)

    # ---- the .kqat manifest ----------------------------------------------------------------

    def to_manifest(self) -> dict:
        """The NumPy parameters as JSON (the zero point is the output tensor's)."""
        return {
            "m0": np.asarray(self.m0, np.int64).reshape(-1).tolist(),
            "shift": np.asarray(self.shift, np.int64).reshape(-1).tolist(),
            "low": int(self.low),
            "high": int(self.high),
            "single_rounding": self.single_rounding,
        }

    @classmethod
    def from_manifest(cls, entry: dict, out: IntegerGrid) -> "Requantize":
        def vector(values):
            array = np.asarray(values, np.int64)
            return array[0] if array.size == 1 else array

        return cls(vector(entry["m0"]), vector(entry["shift"]), out.zero_point, int(entry["low"]), int(entry["high"]), bool(entry["single_rounding"]))


def centered_output(accumulator, multiplier: fp.Float64Multiplier, zero_point, low, high, xp, offset=None, scale=None, form: str = "split"):
    """:meth:`Requantize.centered` from the multiplier's float64 constants and the output's zero
    point and clamp ``[low, high]`` (codes), which is all a compiled tail receives."""
    if form not in ("clipped", "split"):
        raise ValueError(f"Requantize.centered: form must be 'clipped' or 'split', got {form!r}.")
    zero_point = xp.cast(zero_point, "float32")
    low, high = low - zero_point, high - zero_point
    x = xp.cast(accumulator, "float64")
    if offset is not None:
        x = x + offset
    scaled = multiplier.clipped(xp, x) if form == "clipped" else multiplier.split(xp, x)
    codes = xp.minimum(xp.maximum(xp.cast(scaled, "float32"), low), high)
    return codes if scale is None else codes * scale


__all__ = ["Requantize", "centered_output", "as_float64", "safe_scale", "scale_ratio"]
