"""The integer form of every quantized weight of a QAT model, at any bit width.

A fake-quantized value is ``k * scale`` with ``k`` an integer in
``[qmin - zero_point, qmax - zero_point]`` (TF's kernel computes exactly that product). The
integers are read back from the QAT model's own fake-quantized weights, in inference mode,
so that :meth:`QuantizedTensor.dequantize` gives the same float32 bits as training
simulated, whatever the bit width.

Integers are stored signed, ``q - 2**(bits - 1)`` with ``q`` in ``[qmin, qmax]``, as TFLite
stores int8: a symmetric narrow-range weight has zero point 0 and values in
``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import keras
import numpy as np

from keras_qat import ops as qops
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeWrapper


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized tensor: integers, scale and zero point per tensor or per channel.

    Attributes:
        name: ``"{layer}/{weight}"`` (``kernel`` of a folded layer is the BN-folded kernel).
        values: signed integers, ``q - 2**(bits - 1)``, in the smallest NumPy dtype that
            holds them.
        scale: float32, a scalar or one per channel.
        zero_point: int32 in the signed convention of ``values``, shaped as ``scale``.
        bits: 2..16.
        axis: the channel axes of ``values`` (several axes are flattened row-major into the
            channel index, as a depthwise kernel's ``(in_channels, depth_multiplier)``), or
            None per tensor.
        narrow_range: the integer range excludes its lowest code.
    """

    name: str
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    axis: tuple[int, ...] | None
    narrow_range: bool

    @property
    def qmin(self) -> int:
        """Lowest signed integer value."""
        return qops.quant_range(self.bits, self.narrow_range)[0] - 2 ** (self.bits - 1)

    @property
    def qmax(self) -> int:
        """Highest signed integer value."""
        return qops.quant_range(self.bits, self.narrow_range)[1] - 2 ** (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        """``(values - zero_point) * scale`` in float32: the QAT model's quantized weight."""
        shape = self.values.shape
        steps = (self.values.astype(np.int32) - _per_channel(self.zero_point, shape, self.axis)).astype(np.float32)
        return steps * _per_channel(self.scale, shape, self.axis)


def _per_channel(array: np.ndarray, shape: tuple[int, ...], axis: tuple[int, ...] | None) -> np.ndarray:
    """``array`` (one entry per channel of ``axis``) shaped to broadcast against ``shape``."""
    if axis is None:
        return array
    broadcast = [1] * len(shape)
    for a in axis:
        broadcast[a] = shape[a]
    return array.reshape(broadcast)


def smallest_int_dtype(low: int, high: int) -> np.dtype:
    """The smallest signed NumPy integer dtype holding ``[low, high]``."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def quantize_tensor(name: str, fake_quantized, range_min, range_max, quantizer, axes) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of ``fake_quantized``, which ``quantizer`` produced from
    ``[range_min, range_max]`` on channel ``axes`` (empty for per tensor)."""
    values = np.asarray(keras.ops.convert_to_numpy(fake_quantized), np.float32)
    lo = np.asarray(keras.ops.convert_to_numpy(range_min), np.float32)
    hi = np.asarray(keras.ops.convert_to_numpy(range_max), np.float32)
    bits, narrow = quantizer.num_bits, quantizer.narrow_range
    degenerate = (hi - lo) < qops.MIN_RANGE_WIDTH  # fake_quant outputs zeros there
    grid = qops.nudge(np.where(degenerate, -1.0, lo), np.where(degenerate, 1.0, hi), bits, narrow)
    scale = np.asarray(keras.ops.convert_to_numpy(grid.scale), np.float32)
    zero_point = np.asarray(keras.ops.convert_to_numpy(grid.zero_point), np.float32).astype(np.int32)
    offset = 2 ** (bits - 1)
    axis = tuple(axes) or None
    signed_zero = zero_point - offset
    signed = np.rint(values / _per_channel(scale, values.shape, axis)).astype(np.int64) + _per_channel(
        signed_zero, values.shape, axis
    )
    qmin, qmax = (q - offset for q in qops.quant_range(bits, narrow))
    tensor = QuantizedTensor(name, signed.astype(smallest_int_dtype(qmin, qmax)), scale, signed_zero, bits, axis, narrow)
    if signed.size and (signed.min() < tensor.qmin or signed.max() > tensor.qmax):
        raise RuntimeError(f"{name}: integers outside [{tensor.qmin}, {tensor.qmax}]; the range is inconsistent.")
    if not np.array_equal(tensor.dequantize(), values):
        raise RuntimeError(f"{name}: the integers do not reproduce the fake-quantized weight; please report this.")
    return tensor


def check_finite(layer_name: str, weight_name: str, value) -> None:
    array = keras.ops.convert_to_numpy(value)
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"layer '{layer_name}': weight '{weight_name}' holds NaN or Inf; it cannot be quantized. "
            "Retrain from a checkpoint before the divergence, or lower the learning rate."
        )


def iter_quantized_layers(model) -> Iterator:
    """Every QuantizeWrapper and QuantizeFoldedBatchNorm of ``model``, nested models included."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_quantized_layers(layer)
        elif isinstance(layer, (QuantizeWrapper, QuantizeFoldedBatchNorm)):
            yield layer


def layer_quantized_weights(layer) -> list[QuantizedTensor]:
    """The deployed quantized weights of one quantized layer."""
    tensors = []
    if isinstance(layer, QuantizeFoldedBatchNorm):
        for variable in layer.layer.weights + layer.batch_norm.weights:
            check_finite(layer.name, variable.name, variable)
        quantizer, variables = layer.weight_quantizer, layer.kernel_vars
        folded = layer.folded_kernel(training=False)
        axes = quantizer.channel_axes(tuple(folded.shape), "kernel", layer)
        tensors.append(
            quantize_tensor(f"{layer.name}/kernel", folded, variables["min_var"], variables["max_var"], quantizer, axes)
        )
        return tensors
    for weight, quantizer, variables in layer.quantized_weights():
        check_finite(layer.name, weight.name, weight)
        fake_quantized = quantizer(weight, False, variables)
        axes = quantizer.channel_axes(tuple(weight.shape), weight.name, layer)
        tensors.append(
            quantize_tensor(
                f"{layer.name}/{weight.name}", fake_quantized, variables["min_var"], variables["max_var"], quantizer, axes
            )
        )
    return tensors


def quantized_weights(model) -> dict[str, QuantizedTensor]:
    """Every quantized weight of a QAT model, as deployed (BatchNorm folded where folded).

    Returns:
        ``"{layer}/{weight}"`` -> :class:`QuantizedTensor`, in layer order.
    Raises:
        ValueError: a weight holds NaN or Inf (names the layer).
    """
    result: dict[str, QuantizedTensor] = {}
    for layer in iter_quantized_layers(model):
        for tensor in layer_quantized_weights(layer):
            result[tensor.name] = tensor
    return result


__all__ = ["QuantizedTensor", "quantized_weights", "quantize_tensor", "smallest_int_dtype"]
