"""``calibrate``: every range of a QAT model set from data, before any training.

A freshly quantized model holds its initial ranges (``[-6, 6]``) until training observes data,
so below 8 bits it starts at chance. :func:`calibrate` runs the model in inference on a few
batches with quantization off (layers compute in float, as the model they came from), hands
each range quantizer the tensor it quantizes, and sets the range from what it saw:

* ``"minmax"``: the smallest and largest value (per channel where the quantizer is per axis);
* ``"percentile"``: the ``percentile``-th and ``100 - percentile``-th percentiles, which
  ignore a few outliers;
* ``"mse"``: the clipping range, among scaled min/max ranges, whose fake quantization of the
  observed values has the least squared error: what a 2- to 4-bit grid needs, where min/max
  wastes most levels on rare values.

The quantizer's own rules then apply (zero in the range, symmetric where it is symmetric).
Weights are quantized as deployed (BatchNorm folded). Then, by default, the mean shift that
weight quantization adds to each Conv/Dense output is measured on the first batches and taken
out of its bias (:mod:`keras_qat.bias_correction`): at 4 bits it is worth points of accuracy.
Moving-average quantizers count the calibration as the batches it saw, so training continues
from it; fixed-range quantizers keep their range. :func:`weight_ranges_from_weights` sets weight ranges alone, without data;
``quantize_apply`` calls it, so that a model's weight grids are its weights' from the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import keras
import numpy as np

from keras_qat import ops as qops
from keras_qat.bias_correction import correct_biases
from keras_qat.grid import from_range
from keras_qat.schemes.base import check_bool
from keras_qat.quantizers import FixedQuantizer

#: The ways :func:`calibrate` turns observed values into a range.
METHODS = ("minmax", "percentile", "mse")

#: Values kept per tensor (a uniform random subsample) for the percentile and MSE methods.
SAMPLES_PER_CHANNEL = 4096
SAMPLES_PER_TENSOR = 65536

#: The clipping fractions of the min/max range that the MSE method tries.
MSE_FRACTIONS = np.linspace(0.05, 1.0, 96)

#: The batches bias correction measures each layer's shift on (the first ones observed).
BIAS_CORRECTION_BATCHES = 16


@dataclass
class _Observed:
    """What one range quantizer saw: its quantizer, variables and channel axes, the running
    min/max per channel, and a subsample of its values per channel."""

    quantizer: Any
    weights: dict
    axes: tuple[int, ...]
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    samples: list = field(default_factory=list)
    batches: int = 0


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate` set.

    Attributes:
        ranges: ``{variable path of the range's min: (min, max)}`` as set (NumPy arrays).
        batches: the batches observed.
        method: the method used.
        bias_shifts: ``{layer name: the per-channel shift added to its bias}`` by bias
            correction (empty when it was off).
    """

    ranges: dict[str, tuple[np.ndarray, np.ndarray]]
    batches: int
    method: str
    bias_shifts: dict[str, np.ndarray] = field(default_factory=dict)

    def __str__(self) -> str:
        corrected = f", {len(self.bias_shifts)} bias(es) corrected" if self.bias_shifts else ""
        return f"calibrated {len(self.ranges)} range(s) by {self.method} on {self.batches} batch(es){corrected}"


def _by_channel(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``values`` as ``(channels, elements)``: channel axes first, flattened; one row if none."""
    if not axes:
        return values.reshape(1, -1)
    axes = tuple(a % values.ndim for a in axes)
    moved = np.moveaxis(values, axes, tuple(range(len(axes))))
    count = int(np.prod([values.shape[a] for a in axes]))
    return moved.reshape(count, -1)


class _Recorder:
    """The observer :func:`keras_qat.ops.observing` calls: records each quantizer's input and
    returns it unchanged (float)."""

    def __init__(self, method: str, rng: np.random.Generator):
        self.method = method
        self.rng = rng
        self.seen: dict[int, _Observed] = {}

    def __call__(self, quantizer, inputs, weights, axes):
        if isinstance(quantizer, FixedQuantizer):
            return inputs
        key = id(weights["min_var"])
        observed = self.seen.setdefault(key, _Observed(quantizer, weights, tuple(axes)))
        rows = _by_channel(np.asarray(keras.ops.convert_to_numpy(inputs), np.float32), observed.axes)
        low, high = rows.min(axis=1), rows.max(axis=1)
        observed.low = low if observed.low is None else np.minimum(observed.low, low)
        observed.high = high if observed.high is None else np.maximum(observed.high, high)
        observed.batches += 1
        if self.method != "minmax":
            limit = SAMPLES_PER_TENSOR if rows.shape[0] == 1 else SAMPLES_PER_CHANNEL
            if rows.shape[1] > limit:
                rows = rows[:, self.rng.choice(rows.shape[1], limit, replace=False)]
            observed.samples.append(rows)
        return inputs


def _quantizer_range(quantizer, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` per channel under ``quantizer``'s rules (zero included; symmetric)."""
    pair = np.stack([low, high]).astype(np.float32)  # (2, channels)
    axes = (1,) if pair.shape[1] > 1 or quantizer.per_axis else ()
    if not axes:
        pair = pair.reshape(2)
    range_min, range_max = quantizer.observed_range(keras.ops.convert_to_tensor(pair), axes)
    return np.asarray(keras.ops.convert_to_numpy(range_min)), np.asarray(keras.ops.convert_to_numpy(range_max))


def _squared_errors(quantizer, rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per channel, the squared error of fake-quantizing ``rows`` on ``[low, high]``."""
    grid = from_range(low.astype(np.float32), high.astype(np.float32), quantizer.num_bits, quantizer.narrow_range, axes=(0,))
    scale = np.asarray(grid.scale, np.float32).reshape(-1, 1)
    zero_point = np.asarray(grid.zero_point, np.float32).reshape(-1, 1)
    codes = np.clip(np.floor(rows / np.where(scale == 0, 1, scale) + 0.5) + zero_point, grid.qmin, grid.qmax)
    return np.sum(((codes - zero_point) * scale - rows) ** 2, axis=1)


def _range_of(observed: _Observed, method: str, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    quantizer = observed.quantizer
    if method == "minmax" or not observed.samples:
        return _quantizer_range(quantizer, observed.low, observed.high)
    rows = np.concatenate(observed.samples, axis=1)
    if method == "percentile":
        return _quantizer_range(quantizer, np.percentile(rows, 100.0 - percentile, axis=1), np.percentile(rows, percentile, axis=1))
    best_error, best = None, None
    for fraction in MSE_FRACTIONS:
        low, high = _quantizer_range(quantizer, observed.low * fraction, observed.high * fraction)
        errors = _squared_errors(quantizer, rows, low.reshape(-1), high.reshape(-1))
        if best is None:
            best_error, best = errors, (low.reshape(-1).copy(), high.reshape(-1).copy())
            continue
        better = errors < best_error
        best_error = np.where(better, errors, best_error)
        best[0][better], best[1][better] = low.reshape(-1)[better], high.reshape(-1)[better]
    shape = np.shape(keras.ops.convert_to_numpy(observed.weights["min_var"]))
    return best[0].reshape(shape), best[1].reshape(shape)


def _batches(data, steps: int | None, batch_size: int) -> Iterable:
    """Input batches of ``data``: an array, an ``(x, y)`` or ``(x, y, weights)`` tuple, or an
    iterable of batches (each an array, or a tuple whose first item is the inputs)."""
    if isinstance(data, tuple):
        data = data[0]
    if hasattr(data, "shape"):
        total = int(data.shape[0]) if steps is None else min(int(data.shape[0]), steps * batch_size)
        for start in range(0, total, batch_size):
            yield data[start : start + batch_size]
        return
    for index, batch in enumerate(data):
        if steps is not None and index >= steps:
            return
        yield batch[0] if isinstance(batch, tuple) else batch


def _set_ranges(recorder: "_Recorder", method: str, percentile: float, batches: int) -> dict:
    """Assign each observed quantizer the range ``method`` gives; ``{min path: (min, max)}``."""
    ranges = {}
    for observed in recorder.seen.values():
        low, high = _range_of(observed, method, percentile)
        weights = observed.weights
        weights["min_var"].assign(np.asarray(low, np.float32).reshape(weights["min_var"].shape))
        weights["max_var"].assign(np.asarray(high, np.float32).reshape(weights["max_var"].shape))
        if "steps" in weights:  # a moving average continues from the calibration's batches
            steps = float(keras.ops.convert_to_numpy(weights["steps"]))
            weights["steps"].assign(np.float32(max(steps, batches)))
        ranges[weights["min_var"].path] = (np.asarray(low), np.asarray(high))
    return ranges


def weight_ranges_from_weights(model: keras.Model, method: str = "minmax") -> dict:
    """Set every weight quantizer's range from the weight it quantizes (BatchNorm folded, as
    deployed), without data. Returns ``{min path: (min, max)}``."""
    from keras_qat.folding import QuantizeFoldedBatchNorm
    from keras_qat.layers import QuantizeWrapper

    recorder = _Recorder(method, np.random.default_rng(0))
    with qops.observing(recorder):
        for layer in _iter_layers(model):
            if isinstance(layer, QuantizeWrapper) and layer.built:
                for weight, quantizer, variables in layer.quantized_weights():
                    quantizer(weight, False, variables)
            elif isinstance(layer, QuantizeFoldedBatchNorm) and layer.built:
                layer.folded_kernel()
    return _set_ranges(recorder, method, 99.99, 1)


def _iter_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer)


def calibrate(
    model: keras.Model,
    data,
    steps: int | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
    batch_size: int = 32,
    seed: int = 0,
    bias_correction: bool = True,
) -> CalibrationReport:
    """Set every range of ``model`` (a QAT model) from ``data``, before training.

    Args:
        model: the QAT model from ``quantize_model`` / ``quantize_apply``.
        data: the inputs: an array (batched by ``batch_size``), an ``(x, y)`` tuple, or an
            iterable of batches (arrays or ``(x, y)`` tuples, e.g. a ``tf.data.Dataset``).
        steps: how many batches to observe (all of ``data`` when None).
        method: ``"minmax"``, ``"percentile"`` or ``"mse"`` (see the module docstring), for
            weights and activations alike.
        percentile: for ``"percentile"``, in ``(50, 100]``.
        batch_size: the batch size when ``data`` is an array.
        seed: the subsample of values the percentile and MSE methods keep.
        bias_correction: after setting the ranges, take the mean shift that weight
            quantization adds to each Conv/Dense output out of its bias (or its folded
            BatchNormalization's moving mean), measured on the first
            :data:`BIAS_CORRECTION_BATCHES` batches, layer by layer
            (:mod:`keras_qat.bias_correction`). It changes those weights in ``model``, and
            adds again on each call: to calibrate a corrected model again, pass False.

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        ValueError: an unknown method, a percentile or steps out of range, or data that gave
            no batch.
    """
    if method not in METHODS:
        raise ValueError(f"calibrate: method must be one of {', '.join(METHODS)}, got {method!r}.")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"calibrate: percentile must be a number in (50, 100], got {percentile!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"calibrate: steps must be a positive integer or None, got {steps!r}.")
    check_bool(bias_correction, "calibrate: bias_correction")
    recorder = _Recorder(method, np.random.default_rng(seed))
    batches, kept = 0, []
    with qops.observing(recorder):
        for x in _batches(data, steps, batch_size):
            model(x, training=False)
            batches += 1
            if len(kept) < BIAS_CORRECTION_BATCHES:
                kept.append(x)
    if batches == 0:
        raise ValueError(f"calibrate: data gave no batch to observe for model '{model.name}'.")
    ranges = _set_ranges(recorder, method, float(percentile), batches)
    shifts = correct_biases(model, kept) if bias_correction else {}
    return CalibrationReport(ranges, batches, method, shifts)


__all__ = ["calibrate", "weight_ranges_from_weights", "CalibrationReport", "METHODS"]
