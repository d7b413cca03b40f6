"""Each layer kind's integer op: lowered from grids once, executed on centered codes.

An op's ``lower`` computes its parameters from the grids of its tensors in TFLite's ``Prepare``
arithmetic; calling the op computes its output codes from the *centered* codes of its inputs
(``q - zero_point``, exact integers) or from its accumulator. Outputs are codes on the output
grid (see :meth:`keras_qat.integer.Requantize.__call__`). ``xp`` is ``numpy`` or ``keras.ops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_qat import fixed_point as fp
from keras_qat.fixed_point import _cast
from keras_qat.grid import IntegerGrid, quantize_bias
from keras_qat.integer.requantize import Requantize, as_float64, centered_output, safe_scale


def _int64(xp, x):
    return _cast(xp, x, "int64")


def sum_of(terms):
    """The sum of two or more tensors (``sum`` would start from the integer 0)."""
    first, *rest = terms
    for term in rest:
        first = first + term
    return first


@dataclass(frozen=True)
class KernelOp:
    """CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED after the accumulation: the bias codes (at
    ``input_scale * weight_scale`` in the converter's float64 scales, one per output channel)
    added to the exact accumulator, requantized by ``input_scale * weight_scale / output_scale``
    in the float32 scales."""

    bias: Any
    requantize: Requantize

    @classmethod
    def lower(
        cls,
        input_grid: IntegerGrid,
        weight_grid: IntegerGrid,
        output_grid: IntegerGrid,
        bias=None,
        activation: str = "linear",
        single_rounding: bool = False,
        xp=np,
    ) -> "KernelOp":
        """Args: the three grids; ``bias`` the float bias per output channel (or None);
        ``activation`` the fused clamp; ``single_rounding`` as :class:`Requantize`."""
        weight_scale = xp.reshape(weight_grid.scale, (-1,))
        # The bias at the converter's float64 scales (IntegerGrid.exact_scale), the
        # multiplier from the float32 ones that the flatbuffer stores.
        bias_codes = None
        if bias is not None:
            weight_bias_scale = xp.reshape(weight_grid.bias_scale(xp), (-1,))
            bias_codes = quantize_bias(bias, input_grid.bias_scale(xp), weight_bias_scale, xp)
        # (input * weight) / output, in this order, as TFLite's Prepare rounds it.
        product = as_float64(xp, input_grid.scale) * as_float64(xp, weight_scale)
        multiplier = product / as_float64(xp, safe_scale(xp, output_grid.scale))
        return cls(bias_codes, Requantize.lower(multiplier, output_grid, activation, single_rounding, xp))

    def __call__(self, accumulator, xp=np):
        if self.bias is not None:
            accumulator = accumulator + self.bias
        return self.requantize(accumulator, xp)


@dataclass(frozen=True)
class AddOp:
    """TFLite's integer ADD: both inputs shifted up ``left_shift`` bits (20 at 8 bits, 15
    above), rescaled to twice the larger input scale (``a``, ``b``: fixed-point multipliers),
    summed, and requantized to the output."""

    left_shift: int
    a: tuple
    b: tuple
    requantize: Requantize

    @classmethod
    def lower(cls, grid_a: IntegerGrid, grid_b: IntegerGrid, out: IntegerGrid, activation: str = "linear", xp=np) -> "AddOp":
        left_shift = fp.add_left_shift(max(grid_a.bits, grid_b.bits))
        scale_a, scale_b = as_float64(xp, grid_a.scale), as_float64(xp, grid_b.scale)
        twice_max = 2.0 * xp.maximum(xp.maximum(scale_a, scale_b), 1e-300)
        multiplier = twice_max / (float(1 << left_shift) * as_float64(xp, safe_scale(xp, out.scale)))
        return cls(
            left_shift,
            fp.quantize_multiplier(scale_a / twice_max, xp),
            fp.quantize_multiplier(scale_b / twice_max, xp),
            Requantize.lower(multiplier, out, activation, xp=xp),
        )

    def __call__(self, a, b, xp=np):
        return self.requantize(self._int64_sum(a, b, xp), xp)

    def _rescale_limits(self, xp) -> list:
        """Per input, a bound on its rescaled magnitude: the widest codes of its width times its
        multiplier (see :func:`keras_qat.fixed_point.multiply_by_quantized_multiplier_clipped`)."""
        code_bound = float(2 ** (8 if self.left_shift == fp.add_left_shift(8) else 16))
        return [
            fp.ceil(xp, code_bound * xp.cast(m0, "float64") * xp.power(2.0, xp.cast(shift, "float64") + float(self.left_shift - 31))) + 1.0
            for m0, shift in (self.a, self.b)
        ]

    def clipped_fits(self, xp):
        """Whether :meth:`centered`'s ``"clipped"`` form rescales both inputs exactly (a scalar bool
        tensor; :func:`keras_qat.fixed_point.clipped_float64_fits`)."""
        return xp.logical_and(
            *(
                fp.clipped_float64_fits(xp, m0, shift, limit, self.left_shift)
                for (m0, shift), limit in zip((self.a, self.b), self._rescale_limits(xp))
            )
        )

    def float64_multipliers(self, xp) -> tuple:
        """The rescaling of each input and the output's requantization as float64 constants
        (:class:`keras_qat.fixed_point.Float64Multiplier`), which a caller that runs
        :meth:`centered` many times computes once."""
        rescale = tuple(fp.Float64Multiplier.of(xp, m0, shift, left_shift=self.left_shift) for m0, shift in (self.a, self.b))
        return (*rescale, self.requantize.float64_multiplier(xp))

    def centered(self, a, b, xp, scale=None, form: str = "split"):
        """In a ``keras.ops`` graph: the output codes minus the zero point, times ``scale`` where
        given. Each input is rescaled in float64, by the exact
        :func:`keras_qat.fixed_point.multiply_by_quantized_multiplier_float64` (``form="split"``)
        or by the cheaper :func:`keras_qat.fixed_point.multiply_by_quantized_multiplier_clipped`
        (``"clipped"``, exact only where :meth:`clipped_fits`: the codes never pass its limit);
        the sum is requantized in the split form: the output multiplier, about 2**-20 (a 20-bit
        left shift undone), is past the clipped form's reach. A compiled tail calls
        :func:`add_centered_output` with :meth:`float64_multipliers` computed once."""
        multipliers = self.float64_multipliers(xp)
        requantize = self.requantize
        return add_centered_output(a, b, multipliers, requantize.zero_point, requantize.low, requantize.high, xp, scale, form)

    def _int64_sum(self, a, b, xp):
        shift = 1 << self.left_shift
        scaled_a = fp.multiply_by_quantized_multiplier(xp, _int64(xp, a) * shift, *self.a)
        scaled_b = fp.multiply_by_quantized_multiplier(xp, _int64(xp, b) * shift, *self.b)
        return scaled_a + scaled_b

    def to_manifest(self) -> dict:
        return {
            "left_shift": self.left_shift,
            "a": [int(self.a[0]), int(self.a[1])],
            "b": [int(self.b[0]), int(self.b[1])],
            "requantize": self.requantize.to_manifest(),
        }

    @classmethod
    def from_manifest(cls, entry: dict, out: IntegerGrid) -> "AddOp":
        pair = lambda values: (np.int64(values[0]), np.int64(values[1]))  # noqa: E731
        return cls(int(entry["left_shift"]), pair(entry["a"]), pair(entry["b"]), Requantize.from_manifest(entry["requantize"], out))


@dataclass(frozen=True)
class MultiplyOp:
    """TFLite's int8 MUL: the product of the centered codes requantized by
    ``scale_a * scale_b / scale_out`` (rounding twice)."""

    requantize: Requantize

    @classmethod
    def lower(cls, grid_a: IntegerGrid, grid_b: IntegerGrid, out: IntegerGrid, activation: str = "linear", xp=np):
        product = as_float64(xp, grid_a.scale) * as_float64(xp, grid_b.scale)
        multiplier = product / as_float64(xp, safe_scale(xp, out.scale))
        return cls(Requantize.lower(multiplier, out, activation, xp=xp))

    def __call__(self, a, b, xp=np):
        return self.requantize(_int64(xp, a) * _int64(xp, b), xp)


@dataclass(frozen=True)
class LeakyReluOp:
    """TFLite's int8 LEAKY_RELU: a centered code requantized by ``s_in / s_out`` where it is
    non-negative and by ``alpha * s_in / s_out`` where it is negative (each rounding twice)."""

    identity: Requantize
    negative: Requantize

    @classmethod
    def lower(cls, grid: IntegerGrid, out: IntegerGrid, alpha: float, activation: str = "linear", xp=np):
        # LeakyReluPrepare computes both multipliers in float32 (``float * float / float``) before
        # widening them; in float64 a multiplier a hair off a tie rounds the other way.
        in_scale = _cast(xp, grid.scale, "float32")
        out_scale = _cast(xp, safe_scale(xp, out.scale), "float32")
        identity = _cast(xp, in_scale / out_scale, "float64")
        negative = _cast(xp, in_scale * np.float32(alpha) / out_scale, "float64")
        return cls(Requantize.lower(identity, out, activation, xp=xp), Requantize.lower(negative, out, activation, xp=xp))

    def __call__(self, codes, xp=np):
        return xp.where(codes >= 0, self.identity(codes, xp), self.negative(codes, xp))


@dataclass(frozen=True)
class MeanOp:
    """TFLite's int8 MEAN over the spatial axes: the sum of the centered codes requantized by
    ``s_in / s_out`` divided by the count in integer arithmetic (:meth:`Requantize.divided`,
    once the count is known)."""

    requantize: Requantize

    @classmethod
    def lower(cls, grid: IntegerGrid, out: IntegerGrid, activation: str = "linear", xp=np) -> "MeanOp":
        return cls(Requantize.between(grid, out, activation, xp=xp))

    def __call__(self, total, count: int, xp=np):
        return self.requantize.divided(count, xp)(total, xp)


def average_codes(total, count, xp=np):
    """TFLite's int8 AVERAGE_POOL_2D: the sum of a window's codes divided by its count of valid
    elements, rounding half away from zero, in integers."""
    half = count // 2
    return xp.sign(total) * ((xp.abs(total) + half) // count)


def add_centered_output(a, b, multipliers: tuple, zero_point, low, high, xp, scale=None, form: str = "split"):
    """:meth:`AddOp.centered` from the float64 constants of its three multipliers
    (:meth:`AddOp.float64_multipliers`) and the output's zero point and clamp, which is all a
    compiled tail receives."""
    if form not in ("clipped", "split"):
        raise ValueError(f"AddOp.centered: form must be 'clipped' or 'split', got {form!r}.")
    rescale_a, rescale_b, output = multipliers
    rescaled = [
        multiplier.clipped(xp, codes) if form == "clipped" else multiplier.split(xp, codes)
        for codes, multiplier in ((xp.cast(a, "float64"), rescale_a), (xp.cast(b, "float64"), rescale_b))
    ]
    return centered_output(sum_of(rescaled), output, zero_point, low, high, xp, scale=scale, form="split")


#: The int8 SOFTMAX's fixed output grid: 256 levels from zero point -128 (scale 1/256).
INT8_SOFTMAX_LEVELS = 256
INT8_SOFTMAX_ZERO_POINT = -128


def int8_softmax_grid() -> IntegerGrid:
    """The int8 SOFTMAX's fixed output grid, from which a softmax below 8 bits is requantized."""
    return IntegerGrid(np.float32(1.0 / INT8_SOFTMAX_LEVELS), INT8_SOFTMAX_ZERO_POINT, -128, 127, 8, signed=True)


def softmax_levels(scale) -> int | None:
    """The codes per unit of a softmax writing a grid of ``scale`` (8 bits and more) directly:
    ``1 / scale``, where that is an integer (within 1e-6); None where it is not, and the
    integer softmax cannot write that grid."""
    scale = float(scale)
    if scale <= 0.0:
        return None
    levels = round(1.0 / scale)
    return levels if abs(levels * scale - 1.0) <= 1e-6 else None


def softmax_exp_table(scale, bits: int, size: int, xp=np):
    """The softmax's exponentials in fixed point, one per distance ``d`` in ``[0, size)`` of a
    code from its row's largest: ``round(exp(-scale * d) * 2**bits)`` (``scale``, the input
    grid's float32 scale, taken in float64), as float64 integers.

    The ``.kqat`` writer stores it and the QAT model's inference computes it, both with the
    backend's float64 exponential, so that they hold the same integers."""
    distances = xp.arange(size, dtype="float64")
    return xp.round(xp.exp(-_cast(xp, scale, "float64") * distances) * 2.0**bits)


def softmax_codes(codes, exp_table, levels: int, xp=np):
    """A softmax over the last axis in integers: ``e = exp_table[max - codes]`` (the
    exponentials in fixed point, :data:`keras_qat.format.manifest.SOFTMAX_BITS`), then
    ``round(e * levels / sum(e))`` half up, from the integer codes of one grid."""
    distance = xp.max(codes, axis=-1, keepdims=True) - codes
    e = xp.take(exp_table, distance)
    total = xp.sum(e, axis=-1, keepdims=True)
    return (2 * e * levels + total) // (2 * total)


def requantize_between(codes, grid: IntegerGrid, out: IntegerGrid):
    """NumPy codes moved from ``grid`` to ``out`` (the identity when equal), rounded once, half
    up, in fixed point, as the converter's REQUANTIZE between two grids."""
    if grid == out:
        return codes
    return Requantize.between(grid, out, single_rounding=True)(codes - grid.zero_point)


__all__ = [
    "KernelOp", "AddOp", "MultiplyOp", "LeakyReluOp", "MeanOp", "add_centered_output", "average_codes", "softmax_exp_table",
    "INT8_SOFTMAX_LEVELS", "INT8_SOFTMAX_ZERO_POINT", "int8_softmax_grid", "softmax_levels",
    "softmax_codes",
    "requantize_between",
]
