"""The description of one quantized tensor, resolved once when its quantizer is built.

A :class:`TensorSpec` says how a tensor is quantized: bits, narrow range, symmetric or not, its
channel axes (resolved for the tensor's shape and layer: a depthwise kernel's span its last two
axes), and how its range is observed. A quantized layer resolves it once, when it builds the
weight's quantizer (``Quantizer.spec``), and hands it out with the quantizer and its range
variables (``QuantizeWrapper.weight_sources``, ``QuantizeFoldedBatchNorm.kernel_source``); the
QAT model's integer inference, the weight read-out and the artifact writer compute the tensor's
one :class:`~keras_qat.grid.IntegerGrid` from it and the range (:meth:`TensorSpec.grid`),
instead of deriving channel axes or bit widths again. Imports NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_qat.grid import IntegerGrid, from_range, validate_num_bits


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized (see the module docstring).

    Attributes:
        bits: 2..16.
        narrow_range: the lowest code is not used (symmetric weights: ``[-(2**(b-1) - 1), ...]``).
        symmetric: the range is symmetric around zero.
        axes: the channel axes, non-negative and sorted; ``()`` for one range for the tensor.
        observer: how the range is set: ``"last_value"``, ``"moving_average"``,
            ``"all_values"``, ``"fixed"``, or a custom quantizer's class name.
    """

    bits: int
    narrow_range: bool = False
    symmetric: bool = False
    axes: tuple[int, ...] = ()
    observer: str = "last_value"

    def __post_init__(self):
        validate_num_bits(self.bits, "TensorSpec")

    @property
    def per_channel(self) -> bool:
        return bool(self.axes)

    def grid(self, range_min, range_max, xp=np) -> IntegerGrid:
        """The tensor's grid for its range ``[range_min, range_max]`` (unsigned convention)."""
        return from_range(range_min, range_max, self.bits, self.narrow_range, self.axes, xp)


__all__ = ["TensorSpec"]
