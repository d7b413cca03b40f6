"""The integer grid of a quantized tensor: written once, read by training, export and the runtime.

A grid says how real values map to integers: ``real = (q - zero_point) * scale`` with integer
``q`` in ``[qmin, qmax]``, one ``(scale, zero_point)`` for the tensor or one per channel. The
scale and zero point of a range are computed here and nowhere else, in the TFLite converter's
arithmetic (gemmlowp's ``ChooseQuantizationParams``, in float64, rounded once to float32), so
that the QAT model's integer inference, ``quantized_weights``, the ``.kqat`` artifact, the
runtime and every exporter agree on them bit for bit. TF's fake-quant op computes its scale in
float32 and can be one ulp away from this one; :mod:`keras_qat.ops` keeps that arithmetic for
training, where it is the oracle.

Two conventions exist for the integers, and a grid says which it holds (``signed``):

* unsigned, TF's: ``q`` in ``[0 or 1, 2**bits - 1]``;
* signed, TFLite's int8 and the ``.kqat`` format's: the unsigned codes minus ``2**(bits - 1)``.

Every function takes ``xp``: the ``numpy`` module (exact, for exporters and the runtime) or
``keras.ops`` (for the QAT model's inference graph, where scales stay tensors). This module
imports NumPy only, so that the integer runtime can use it without Keras or TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from keras_qat.fixed_point import _cast, round_half_away

MIN_BITS = 2
MAX_BITS = 16

#: Narrowest ``max - min`` that is quantized. Below it (and for ``min > max``) a range is
#: degenerate and treated as ``[0, 0]``: 65535 steps of the smallest normal float32, so that
#: ``scale`` and ``1 / scale`` stay finite and normal at every bit width up to 16.
MIN_RANGE_WIDTH = float(np.float32((2**MAX_BITS - 1) * np.finfo(np.float32).tiny))


def validate_num_bits(num_bits, owner: str = "fake_quant") -> int:
    """Return ``num_bits`` as an int, or raise ValueError naming ``owner`` and the range."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)):
        raise ValueError(
            f"{owner}: num_bits must be an integer from {MIN_BITS} to {MAX_BITS}, "
            f"got {num_bits!r} ({type(num_bits).__name__})."
        )
    if not MIN_BITS <= int(num_bits) <= MAX_BITS:
        raise ValueError(
            f"{owner}: num_bits={int(num_bits)} is out of range; keras-qat quantizes "
            f"to {MIN_BITS}..{MAX_BITS} bits."
        )
    return int(num_bits)


def quant_range(num_bits: int, narrow_range: bool) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of an unsigned ``num_bits`` code."""
    num_bits = validate_num_bits(num_bits)
    return (1 if narrow_range else 0), 2**num_bits - 1


@dataclass(frozen=True)
class IntegerGrid:
    """``real = (q - zero_point) * scale``, integer ``q`` in ``[qmin, qmax]``.

    Attributes:
        scale: float32; a scalar, or one per channel. NumPy arrays, or tensors in a graph.
        zero_point: the integer zero point in this grid's convention, shaped as ``scale``
            (int64 in NumPy; float32 holding integers in a graph, where it meets float codes).
        qmin, qmax: the integer range in this grid's convention.
        bits: 2..16.
        signed: whether ``q`` is the signed code (``unsigned - 2**(bits - 1)``).
        narrow_range: the lowest unsigned code (0) is not used.
        axes: the channel axes of the tensor (several are flattened row-major into one
            channel index, as a depthwise kernel's ``(in_channels, depth_multiplier)``); ``()``
            for one grid for the whole tensor.
        exact_scale: ``scale`` before its rounding to float32 (float64, shaped as ``scale``),
            as the TFLite converter holds it while it quantizes constants: a kernel's int32
            bias is quantized at the product of its input's and weights' exact scales
            (:func:`quantize_bias`), although the flatbuffer stores, and the kernels
            requantize with, the float32 scales. None where unknown (a grid read from a
            manifest, or built by hand): the float32 scale. Not compared: two grids with the
            same float32 scale quantize values alike.
    """

    scale: Any
    zero_point: Any
    qmin: int
    qmax: int
    bits: int
    signed: bool = False
    narrow_range: bool = False
    axes: tuple[int, ...] = ()
    exact_scale: Any = field(default=None, compare=False)

    @property
    def per_channel(self) -> bool:
        return bool(self.axes)

    @property
    def offset(self) -> int:
        """What the signed convention subtracts from the unsigned codes."""
        return 2 ** (self.bits - 1)

    def as_signed(self) -> "IntegerGrid":
        """The same grid with signed codes (TFLite int8, ``.kqat``)."""
        if self.signed:
            return self
        return replace(
            self,
            zero_point=self.zero_point - self.offset,
            qmin=self.qmin - self.offset,
            qmax=self.qmax - self.offset,
            signed=True,
        )

    def as_unsigned(self) -> "IntegerGrid":
        """The same grid with TF's unsigned codes."""
        if not self.signed:
            return self
        return replace(
            self,
            zero_point=self.zero_point + self.offset,
            qmin=self.qmin + self.offset,
            qmax=self.qmax + self.offset,
            signed=False,
        )

    def bias_scale(self, xp=np):
        """The scale at which the converter quantizes the bias that this grid contributes to,
        in float64: :attr:`exact_scale`, else the float32 scale widened."""
        if self.exact_scale is not None:
            return _cast(xp, self.exact_scale, "float64")
        if xp is np:
            return np.asarray(self.scale, np.float32).astype(np.float64)
        return _cast(xp, self.scale, "float64")

    # ---- broadcasting per channel --------------------------------------------------------

    def along(self, values, shape: Sequence[int], xp=np):
        """Per-channel ``values`` (one per channel, like ``scale``) shaped to broadcast against
        a tensor of ``shape``; a per-tensor value is returned as it is."""
        return along_axes(values, self.axes, shape, xp)

    # ---- integers ------------------------------------------------------------------------

    def quantize(self, x, xp=np):
        """TFLite's QUANTIZE: ``round(x / scale)`` half away from zero (float32 division),
        plus the zero point, clamped to ``[qmin, qmax]``. NumPy returns int64 codes; a graph
        float32 tensors holding integers."""
        shape = tuple(x.shape)
        scale = self.along(self.scale, shape, xp)
        zero_point = self.along(self.zero_point, shape, xp)
        if xp is np:
            scaled = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
            # Clamped while still float: inf or huge values must not wrap in the int cast.
            codes = np.clip(round_half_away(np, scaled) + zero_point, self.qmin, self.qmax)
            return codes.astype(np.int64)
        safe = xp.where(xp.equal(scale, 0.0), xp.ones_like(scale), scale)
        codes = round_half_away(xp, x / safe) + zero_point
        return xp.minimum(xp.maximum(codes, float(self.qmin)), float(self.qmax))

    def dequantize(self, q, xp=np):
        """``(q - zero_point) * scale`` in float32."""
        shape = tuple(q.shape)
        scale = self.along(self.scale, shape, xp)
        zero_point = self.along(self.zero_point, shape, xp)
        if xp is np:
            steps = (np.asarray(q).astype(np.int64) - zero_point).astype(np.float32)
            return steps * np.asarray(scale, np.float32)
        return (_cast(xp, q, "float32") - zero_point) * scale

    def centered_codes(self, on_grid, xp=np, dtype: str = "float64"):
        """``q - zero_point`` of values that already lie on this grid (fake-quantized values),
        as exact integers: ``dtype`` (float64 or float32) in a graph, int64 in NumPy. Exact
        because each such value is one float32 product ``k * scale`` with ``|k| < 2**16``,
        which division undoes."""
        scale = self.along(self.scale, tuple(on_grid.shape), xp)
        if xp is np:
            scale = np.asarray(scale, np.float32)
            safe = np.where(scale == 0, np.float32(1.0), scale)
            return np.rint(np.asarray(on_grid, np.float32) / safe).astype(np.int64)
        return xp.cast(codes_at_scale(on_grid, scale, xp), dtype)

    def activation_bounds(self, activation: str, xp=np):
        """TFLite's ``CalculateActivationRangeQuantized``: ``(low, high)``, the code range left
        after a fused ``"linear"``, ``"relu"`` or ``"relu6"`` clamp (per-tensor grids). Python
        ints in NumPy; float32 tensors in a graph."""
        if xp is np:
            low, high = self.qmin, self.qmax
            if activation in ("relu", "relu6"):
                low = max(low, int(self.zero_point))
            if activation == "relu6":
                six = round_half_away(np, np.float32(6.0) / np.float32(self.scale))
                high = min(high, int(self.zero_point) + int(six))
            return low, high
        low = xp.cast(self.qmin, "float32")
        high = xp.cast(self.qmax, "float32")
        if activation in ("relu", "relu6"):
            low = xp.maximum(low, self.zero_point)
        if activation == "relu6":
            safe = xp.where(xp.equal(self.scale, 0.0), xp.ones_like(self.scale), self.scale)
            high = xp.minimum(high, self.zero_point + round_half_away(xp, 6.0 / safe))
        return low, high

    # ---- the .kqat manifest --------------------------------------------------------------

    def to_manifest(self) -> dict:
        """A per-tensor grid as the ``.kqat`` manifest stores it (signed convention)."""
        signed = self.as_signed()
        if self.axes or np.ndim(signed.scale):
            raise ValueError("IntegerGrid.to_manifest: activation grids are per tensor in the .kqat format.")
        return {
            "scale": float(np.float32(signed.scale)),
            "zero_point": int(signed.zero_point),
            "bits": int(signed.bits),
            "qmin": int(signed.qmin),
            "qmax": int(signed.qmax),
        }

    @classmethod
    def from_manifest(cls, entry: dict) -> "IntegerGrid":
        """The grid of a manifest tensor entry (see :meth:`to_manifest`)."""
        return cls(
            np.float32(entry["scale"]),
            int(entry["zero_point"]),
            int(entry["qmin"]),
            int(entry["qmax"]),
            int(entry["bits"]),
            signed=True,
        )


def along_axes(values, axes: Sequence[int], shape: Sequence[int], xp=np):
    """Per-channel ``values`` of a tensor whose channel axes are ``axes`` (flattened row-major,
    see :attr:`IntegerGrid.axes`) shaped to broadcast against it; ``values`` as they are when
    ``axes`` is empty."""
    if not axes:
        return values
    if tuple(axes) == (len(shape) - 1,) and tuple(np.shape(values)) in ((shape[-1],), (None,)):
        return values  # one value per channel of the last axis broadcasts as it is
    broadcast = [1] * len(shape)
    for axis in axes:
        broadcast[axis] = int(shape[axis])
    return xp.reshape(values, tuple(broadcast))


def codes_at_scale(on_grid, scale, xp):
    """In a graph: the integers ``k`` of values ``k * scale`` (float32; 0 where the scale is 0),
    as float32 (see :meth:`IntegerGrid.centered_codes`).

    The values are multiplied by the scale's reciprocal rather than divided by the scale: one
    multiply per element instead of a division, which costs several times more (the input codes
    of every kernel in the QAT model's inference). Rounding still recovers ``k`` exactly: a value
    on the grid is within ``2**-7`` steps of ``k * scale`` for ``|k| < 2**16`` (at most two
    float32 roundings of magnitudes up to ``2**16`` steps, as TF's fake quantization computes
    it), and the reciprocal's and the product's roundings add at most ``2**-7`` steps more: far
    from the half step where rounding would change.
    """
    return codes_at_reciprocal(on_grid, reciprocal_scale(scale, xp), xp)


def reciprocal_scale(scale, xp):
    """``1 / scale`` (1 where the scale is 0) in a graph: what :func:`codes_at_scale` multiplies
    by, which a caller that quantizes many tensors on one grid computes once."""
    return 1.0 / xp.where(xp.equal(scale, 0.0), xp.ones_like(scale), scale)


def codes_at_reciprocal(on_grid, reciprocal, xp):
    """:func:`codes_at_scale` given the scale's :func:`reciprocal_scale`."""
    return xp.round(on_grid * reciprocal)


def sanitized_range(range_min, range_max, xp=np):
    """``(min, max)`` as float32 with degenerate ranges (narrower than :data:`MIN_RANGE_WIDTH`,
    or inverted) replaced by ``[0, 0]``, as fake quantization treats them."""
    lo, hi = _cast(xp, range_min, "float32"), _cast(xp, range_max, "float32")
    degenerate = (hi - lo) < MIN_RANGE_WIDTH
    return xp.where(degenerate, 0.0, lo), xp.where(degenerate, 0.0, hi)


def from_range(
    range_min,
    range_max,
    bits: int,
    narrow_range: bool = False,
    axes: Sequence[int] = (),
    xp=np,
) -> IntegerGrid:
    """The grid that the deployed model has for a tensor fake-quantized on ``[min, max]``.

    The TFLite converter's arithmetic, in float64: ``scale = (max - min) / (qmax - qmin)``
    rounded once to float32 (the float64 value is kept as :attr:`IntegerGrid.exact_scale`,
    which the converter quantizes biases with), and the zero point from whichever end of the
    range gives the smaller rounding error, rounded half away from zero and clamped. A
    degenerate range gives scale 0 (its values are all zero) and the middle code as zero
    point. Returns the unsigned (TF) convention; see :meth:`IntegerGrid.as_signed`.
    """
    bits = validate_num_bits(bits, "grid")
    qmin, qmax = quant_range(bits, narrow_range)
    lo, hi = sanitized_range(range_min, range_max, xp)
    lo, hi = _cast(xp, lo, "float64"), _cast(xp, hi, "float64")
    if xp is np:
        scale = (hi - lo) / float(qmax - qmin)
    else:
        from keras_qat.ops import exact_divide  # ops imports this module

        # A graph optimizer would divide by the constant as a multiplication by its reciprocal,
        # a last-bit difference that moves a zero point sitting on a half. (keras_qat.numpy_ops,
        # standing in for keras.ops, has its own.)
        divide = getattr(xp, "exact_divide", exact_divide)
        scale = divide(hi - lo, xp.convert_to_tensor(float(qmax - qmin), "float64"))
    safe = xp.where(scale == 0, 1.0, scale)
    from_min, from_max = float(qmin) - lo / safe, float(qmax) - hi / safe
    use_min = (abs(qmin) + xp.abs(lo / safe)) < (abs(qmax) + xp.abs(hi / safe))
    chosen = xp.where(use_min, from_min, from_max)
    # A degenerate range holds only zero: its zero point is the middle code (signed 0).
    chosen = xp.where(scale == 0, float((qmin + qmax + 1) // 2), chosen)
    zero_point = xp.clip(round_half_away(xp, chosen), float(qmin), float(qmax))
    if xp is np:
        scale_out = np.asarray(scale).astype(np.float32)
        zero_out = np.asarray(zero_point).astype(np.int64)
        exact = np.asarray(scale, np.float64)
    else:
        scale_out = xp.cast(scale, "float32")
        zero_out = xp.cast(zero_point, "float32")
        exact = scale
    return IntegerGrid(scale_out, zero_out, qmin, qmax, bits, False, bool(narrow_range), tuple(axes), exact)


def quantize_bias(bias, input_scale, weight_scale, xp=np):
    """The int32 bias codes of a kernel: ``bias / (input_scale * weight_scale)`` rounded half away
    from zero, the product taken in float64 of the scales as given (one weight scale per output
    channel); 0 where the product is 0. int64 in NumPy (a 16-bit layer's bias can pass 2**31),
    float64 in a graph.

    The TFLite converter quantizes a bias at the product of the float64 scales it derived from
    the ranges (:attr:`IntegerGrid.exact_scale`, see :meth:`IntegerGrid.bias_scale`), not of
    the float32 scales the flatbuffer stores: the two products differ in the last bits, which
    moves a bias within a few millionths of a half code to the other integer. Pass those
    (float32 scales are widened exactly)."""
    if xp is np:
        product = np.asarray(input_scale).astype(np.float64) * np.asarray(weight_scale).astype(np.float64)
        raw = np.asarray(bias, np.float64) / np.where(product == 0, 1.0, product)
        return np.where(product == 0, 0, round_half_away(np, raw)).astype(np.int64)
    product = xp.cast(input_scale, "float64") * xp.cast(weight_scale, "float64")
    raw = xp.cast(bias, "float64") / xp.where(product == 0, 1.0, product)
    return xp.where(product == 0, 0.0, round_half_away(xp, raw))


def widened_range(grid: IntegerGrid, bits: int = 8):
    """A ``[min, max]`` at ``bits`` bits (float32, one per channel like ``grid.scale``) whose grid
    (:func:`from_range`) has exactly ``grid``'s scale and signed zero point: a tensor trained at
    fewer bits, held in a wider integer type on its trained grid (int8 at 2..7 bits for LiteRT).

    The plain ends ``(q_min - z) * scale`` and ``(q_max - z) * scale`` are rounded to float32,
    which moves the converter's float64 scale by an ulp in about 1% of ranges; those are found
    by moving each end by up to three ulps.
    """
    signed = grid.as_signed()
    if bits < signed.bits:
        raise ValueError(f"widened_range: {bits} bits cannot hold a {signed.bits}-bit grid.")
    wide_min = -(2 ** (bits - 1)) + int(signed.narrow_range)
    wide_max = 2 ** (bits - 1) - 1
    scale = np.asarray(signed.scale, np.float32)
    zero_point = np.broadcast_to(np.asarray(signed.zero_point, np.int64), scale.shape)
    plain_lo = ((wide_min - zero_point) * scale.astype(np.float64)).astype(np.float32)
    plain_hi = ((wide_max - zero_point) * scale.astype(np.float64)).astype(np.float32)
    lo, hi = np.zeros_like(plain_lo), np.zeros_like(plain_hi)
    found = scale == 0  # a degenerate range stays [0, 0]
    offsets = sorted(((a, b) for a in range(-3, 4) for b in range(-3, 4)), key=lambda ab: abs(ab[0]) + abs(ab[1]))
    for low_step, high_step in offsets:
        if found.all():
            break
        try_lo = _ulps(plain_lo, low_step)
        try_hi = _ulps(plain_hi, high_step)
        wide = from_range(try_lo, try_hi, bits, signed.narrow_range).as_signed()
        match = ~found & (wide.scale == scale) & (wide.zero_point == zero_point)
        lo, hi = np.where(match, try_lo, lo), np.where(match, try_hi, hi)
        found |= match
    if not found.all():
        raise ValueError(f"widened_range: no {bits}-bit range has scale {scale[~found]!r} exactly.")
    return lo, hi


def _ulps(x, steps: int):
    """``x`` (float32) moved by ``steps`` ulps."""
    direction = np.float32(np.inf if steps > 0 else -np.inf)
    for _ in range(abs(steps)):
        x = np.nextafter(x, direction, dtype=np.float32)
    return x


def smallest_int_dtype(low: int, high: int) -> np.dtype:
    """The smallest signed NumPy integer dtype holding ``[low, high]``."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


__all__ = [
    "IntegerGrid",
    "from_range",
    "sanitized_range",
    "quant_range",
    "validate_num_bits",
    "smallest_int_dtype",
    "quantize_bias",
    "widened_range",
    "MIN_BITS",
    "MAX_BITS",
    "MIN_RANGE_WIDTH",
]
