"""Quantizers whose range is learned by gradient descent: LSQ and PACT.

Below 4 bits a range set by min/max wastes most of the grid on rare values; the published
methods learn it instead:

* :class:`LSQQuantizer` (Esser et al., "Learned Step Size Quantization", ICLR 2020) learns the
  step size, with the gradient of the quantized value with respect to the step (``round(v) -
  v`` inside the range, the clipping bound outside) scaled by ``1 / sqrt(N * qmax)``; asymmetric
  (activations, as LSQ+ does with its offset) it learns both ends of the range.
* :class:`PACTQuantizer` (Choi et al., "PACT", 2018) learns the clipping bounds of an
  activation: the gradient reaches a bound only from the values it clips, as TF's fake-quant
  op gives it.

Both keep tfmot's quantizer contract and store what they learn as the range variables
``{name}_min`` / ``{name}_max`` (trainable), which every other part of keras-qat reads: the grid
of :mod:`keras_qat.grid`, the QAT model's integer inference, ``quantized_weights``, ``.kqat``,
LiteRT and ONNX. So the learned scale is the deployed scale, and the exactness of every export
holds as for min/max quantizers. Their ranges start from the weights (at quantize time), from
:func:`keras_qat.calibrate`, or else from the first training batch.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_qat import ops as qops
from keras_qat.quantizers import INITIAL_RANGE, _RangeQuantizer, _steps_variable

#: The narrowest range a learned quantizer keeps (see :meth:`_LearnedRangeQuantizer.valid_range`).
MIN_LEARNED_WIDTH = 1e-6


def _scaled_gradient(x, factor: float):
    """``x`` in the forward pass; its gradient times ``factor`` in the backward pass."""
    return x * factor + ops.stop_gradient(x * (1.0 - factor))


def _broadcast(values, inputs, axes: tuple[int, ...]):
    """Per-channel ``values`` shaped to broadcast against ``inputs`` along ``axes``."""
    if not axes:
        return values
    shape = [1] * len(inputs.shape)
    for axis in axes:
        shape[axis] = int(inputs.shape[axis])
    return ops.reshape(values, shape)


class _LearnedRangeQuantizer(_RangeQuantizer):
    """Range variables that are trainable, initialised from the first training batch unless
    something set them before (the weights at quantize time, or ``calibrate``)."""

    def learns(self, key: str) -> bool:
        """Both ends of an asymmetric range; the largest value of a symmetric one."""
        return key == "max_var" or not self.symmetric

    def range_of(self, weights: dict[str, Any]):
        """The learned range as a grid can hold it (:meth:`valid_range`); a symmetric one from
        its maximum alone (``{name}_min`` keeps the minimum of the last training step, which the
        optimizer's update of the maximum leaves behind)."""

        def deployed():
            if self.symmetric:
                magnitude = ops.abs(ops.convert_to_tensor(weights["max_var"]))
                return qops.symmetric_range(-magnitude, magnitude, self.num_bits, self.narrow_range)
            return self.valid_range(ops.convert_to_tensor(weights["min_var"]), ops.convert_to_tensor(weights["max_var"]))

        # Exporters read a range as a constant (a converter folds nothing computed in its graph).
        return tuple(qops.evaluated_now(deployed)) if qops.plain_fake_quant() else deployed()

    @staticmethod
    def valid_range(range_min, range_max):
        """``[min, max]`` with zero inside, as observed ranges have it, and at least
        :data:`MIN_LEARNED_WIDTH` wide: a gradient step larger than the range (a tiny
        activation range under Adam at 1e-2) can carry one bound past zero or past the
        other, and a range that inverts or collapses has no grid left to deploy."""
        range_min = ops.minimum(range_min, 0.0)
        range_max = ops.maximum(ops.maximum(range_max, 0.0), range_min + MIN_LEARNED_WIDTH)
        return range_min, range_max

    def _build_state(self, name, layer):
        return {"steps": _steps_variable(layer, name)}

    def _training_range(self, inputs, axes, weights, factor=None, activation=None):
        """The range this batch quantizes on: the learned one, or the batch's own on the
        first step of a range that nothing set yet (then stored)."""
        # Tensors, not the variables: JAX no longer converts a Keras variable inside its ops.
        stored_min, stored_max = ops.convert_to_tensor(weights["min_var"]), ops.convert_to_tensor(weights["max_var"])
        first = ops.logical_and(
            ops.equal(ops.convert_to_tensor(weights["steps"]), 0.0),
            ops.logical_and(ops.all(ops.equal(stored_min, INITIAL_RANGE[0])), ops.all(ops.equal(stored_max, INITIAL_RANGE[1]))),
        )
        observed_min, observed_max = self.observed_range(inputs, axes, factor, activation)
        range_min = ops.where(first, ops.stop_gradient(observed_min), stored_min)
        range_max = ops.where(first, ops.stop_gradient(observed_max), stored_max)
        weights["steps"].assign(weights["steps"] + 1.0)
        return self.valid_range(range_min, range_max)

    def __call__(self, inputs, training, weights: dict[str, Any], factor=None, activation=None, **kwargs):
        if not training or qops.current_observer() is not None:
            return super().__call__(inputs, training, weights, factor=factor, activation=activation, **kwargs)
        inputs = ops.convert_to_tensor(inputs)
        axes = self._call_axes(inputs, weights)
        self._check_input_ops(axes, factor, activation)
        # The learned range's gradients need the values themselves.
        inputs = qops.before_quantization(inputs, axes, factor, activation)
        range_min, range_max = self._learned_range(inputs, axes, weights)
        # What inference and every export read: the range this step quantized on.
        weights["min_var"].assign(ops.stop_gradient(range_min))
        weights["max_var"].assign(ops.stop_gradient(range_max))
        return self._quantize(inputs, axes, range_min, range_max)

    def _learned_range(self, inputs, axes, weights):
        """The range this training step quantizes on, differentiable in the range variables."""
        return self._training_range(inputs, axes, weights)

    def _quantize(self, inputs, axes, range_min, range_max):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="keras_qat")
class LSQQuantizer(_LearnedRangeQuantizer):
    """Learned step size (LSQ). Symmetric (weights): learns the largest value, the range
    ``[-max, max]`` (narrow) giving the step ``max / qmax``; asymmetric (activations): learns
    both ends, the step ``(max - min) / (qmax - qmin)`` and the zero point rounded from ``min``
    as the deployed grid rounds it. The forward pass is that grid's fake quantization; its
    gradient with respect to the step is LSQ's, scaled by ``1 / sqrt(N * Q_P)``."""

    observer = "lsq"

    def _learned_range(self, inputs, axes, weights):
        range_min, range_max = self._training_range(inputs, axes, weights)
        if self.symmetric:
            range_min, range_max = qops.symmetric_range(-ops.abs(range_max), ops.abs(range_max), self.num_bits, self.narrow_range)
        qmin, qmax = qops.quant_range(self.num_bits, self.narrow_range)
        # The paper's Q_P: the positive levels (2**(b-1) - 1 signed and narrow; 2**b - 1 unsigned).
        positive_levels = (qmax - qmin) // 2 if self.symmetric else qmax - qmin
        gradient_scale = 1.0 / float(np.sqrt(self._elements_per_step(inputs, axes) * positive_levels))
        return _scaled_gradient(range_min, gradient_scale), _scaled_gradient(range_max, gradient_scale)

    def _quantize(self, inputs, axes, range_min, range_max):
        qmin, qmax = qops.quant_range(self.num_bits, self.narrow_range)
        range_min, range_max = _broadcast(range_min, inputs, axes), _broadcast(range_max, inputs, axes)
        scale = ops.maximum((range_max - range_min) / float(qmax - qmin), 1e-12)
        zero_point = ops.stop_gradient(ops.clip(ops.floor(qmin - range_min / scale + 0.5), qmin, qmax))
        steps = ops.clip(inputs / scale + zero_point, float(qmin), float(qmax))
        rounded = steps + ops.stop_gradient(ops.floor(steps + 0.5) - steps)
        return (rounded - zero_point) * scale

    def _elements_per_step(self, inputs, axes: tuple[int, ...]) -> int:
        """LSQ's ``N``: the values one step size quantizes: a weight's elements per channel; an
        activation's features (its elements per example: asymmetric quantizers are the
        activations' and see a batch axis first)."""
        skipped = set(axes) | (set() if self.symmetric else {0})
        sizes = [d for axis, d in enumerate(inputs.shape) if axis not in skipped and d is not None]
        return max(int(np.prod(sizes)) if sizes else 1, 1)


@keras.saving.register_keras_serializable(package="keras_qat")
class PACTQuantizer(_LearnedRangeQuantizer):
    """Learned clipping (PACT) for activations: the range's bounds are trainable and get their
    gradient from the values they clip (TF's fake-quant gradient); in between, the input's
    gradient passes straight through."""

    observer = "pact"

    def _quantize(self, inputs, axes, range_min, range_max):
        return qops.fake_quant(inputs, range_min, range_max, num_bits=self.num_bits, narrow_range=self.narrow_range, axis=axes or None)


__all__ = ["LSQQuantizer", "PACTQuantizer"]
