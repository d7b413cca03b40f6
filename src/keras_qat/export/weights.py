"""The integer form of every quantized weight of a QAT model, at any bit width.

A fake-quantized value is ``k * scale`` with ``k`` an integer in
``[qmin - zero_point, qmax - zero_point]`` (TF's kernel computes exactly that product). The
integers are read back from the QAT model's own fake-quantized weights, in inference mode, on
the tensor's one grid (:mod:`keras_qat.grid`, the converter's scale), so that
:meth:`QuantizedTensor.dequantize` gives the same float32 bits as training simulated, at any
bit width, wherever that scale equals TF's fake-quant scale: always for the symmetric narrow
ranges of weights (an asymmetric range can be one ulp apart).

Integers are stored signed, ``q - 2**(bits - 1)`` with ``q`` in ``[qmin, qmax]``, as TFLite
stores int8: a symmetric narrow-range weight has zero point 0 and values in
``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import keras
import numpy as np

from keras_qat import emulation
from keras_qat.grid import IntegerGrid, smallest_int_dtype
from keras_qat.export.validate import require_finite
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeWrapper


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized tensor: its integers and its grid (:class:`keras_qat.grid.IntegerGrid`).

    Attributes:
        name: ``"{layer}/{weight}"`` (``kernel`` of a folded layer is the BN-folded kernel).
        values: signed integers, ``q - 2**(bits - 1)``, in the smallest NumPy dtype that
            holds them.
        grid: the tensor's grid, in the signed convention of ``values``.
    """

    name: str
    values: np.ndarray
    grid: IntegerGrid

    @property
    def scale(self) -> np.ndarray:
        """float32, a scalar or one per channel."""
        return self.grid.scale

    @property
    def zero_point(self) -> np.ndarray:
        """In the signed convention of ``values``, shaped as ``scale``."""
        return self.grid.zero_point

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def axis(self) -> tuple[int, ...] | None:
        """The channel axes of ``values`` (several are flattened row-major into the channel
        index, as a depthwise kernel's ``(in_channels, depth_multiplier)``), or None per tensor."""
        return self.grid.axes or None

    @property
    def narrow_range(self) -> bool:
        return self.grid.narrow_range

    @property
    def qmin(self) -> int:
        """Lowest signed integer value."""
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        """Highest signed integer value."""
        return self.grid.qmax

    def dequantize(self) -> np.ndarray:
        """``(values - zero_point) * scale`` in float32: the QAT model's quantized weight (bit
        for bit wherever the deployed scale equals TF's fake-quant scale, which it does for
        every symmetric narrow range)."""
        return self.grid.dequantize(self.values)


def quantize_tensor(name: str, fake_quantized, source: emulation.Source) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of ``fake_quantized``, which ``source``'s quantizer produced
    on its grid (:func:`keras_qat.emulation.exported_grid`, from the tensor's spec and range)."""
    values = np.asarray(keras.ops.convert_to_numpy(fake_quantized), np.float32)
    grid = emulation.exported_grid(source).as_signed()
    codes = grid.centered_codes(values) + grid.along(grid.zero_point, values.shape)
    if codes.size and (codes.min() < grid.qmin or codes.max() > grid.qmax):
        raise RuntimeError(f"{name}: integers outside [{grid.qmin}, {grid.qmax}]; the range is inconsistent.")
    return QuantizedTensor(name, codes.astype(smallest_int_dtype(grid.qmin, grid.qmax)), grid)


def iter_quantized_layers(model) -> Iterator:
    """Every QuantizeWrapper and QuantizeFoldedBatchNorm of ``model``, nested models included."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_quantized_layers(layer)
        elif isinstance(layer, (QuantizeWrapper, QuantizeFoldedBatchNorm)):
            yield layer


def layer_quantized_weights(layer) -> list[QuantizedTensor]:
    """The deployed quantized weights of one quantized layer."""
    if isinstance(layer, QuantizeFoldedBatchNorm):
        return [quantize_tensor(f"{layer.name}/kernel", layer.folded_kernel(training=False), layer.kernel_source())]
    return [
        quantize_tensor(f"{layer.name}/{weight.name}", quantizer(weight, False, variables), source)
        for (weight, quantizer, variables), source in zip(layer.quantized_weights(), layer.weight_sources())
    ]


def real_weights(model) -> dict[str, np.ndarray]:
    """The real (float32) values that each of :func:`quantized_weights` rounds, by the same
    names: the trained weights, BatchNorm-folded where folded. Their difference from
    ``QuantizedTensor.dequantize()`` is the weights' quantization error."""
    result: dict[str, np.ndarray] = {}
    for layer in iter_quantized_layers(model):
        if isinstance(layer, QuantizeFoldedBatchNorm):
            result[f"{layer.name}/kernel"] = _numpy32(layer.unquantized_kernel())
            continue
        for weight, _, _ in layer.quantized_weights():
            result[f"{layer.name}/{weight.name}"] = _numpy32(weight)
    return result


def _numpy32(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), np.float32)


def quantized_weights(model) -> dict[str, QuantizedTensor]:
    """Every quantized weight of a QAT model, as deployed (BatchNorm folded where folded).

    Returns:
        ``"{layer}/{weight}"`` -> :class:`QuantizedTensor`, in layer order.
    Raises:
        keras_qat.errors.NotDeployableError: a weight or range holds NaN or Inf (names each layer).
    """
    require_finite(model, "quantized_weights")
    result: dict[str, QuantizedTensor] = {}
    for layer in iter_quantized_layers(model):
        for tensor in layer_quantized_weights(layer):
            result[tensor.name] = tensor
    return result


__all__ = ["QuantizedTensor", "quantized_weights", "real_weights", "quantize_tensor"]
