"""Bias correction: the mean error that weight quantization adds to a layer's output, taken
back out through its bias.

Rounding a kernel to a 4-bit grid (and clipping it, as MSE calibration does) shifts the mean
of each output channel: ``E[conv(x, w_q)] != E[conv(x, w)]``. The following layers were
trained on the unshifted means, so a post-training-quantized model loses accuracy that no
range can win back. The empirical bias correction of Nagel et al. ("Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019) measures the shift on
calibration data and subtracts it from the bias, layer after layer, each on the inputs the
corrected layers before it give.

The correction lands in an ordinary weight of the QAT model, which training goes on from and
every export reads as it reads any bias: a Conv/Dense layer's bias, or, where a
BatchNormalization is folded in, its moving mean (lowered by ``shift / factor``). The moving
mean, not ``beta``: training normalizes with batch statistics, which remove any shift, and
the moving mean follows ``E[conv(x, w_q)]``, so a shift put in ``beta`` would be counted
twice once BatchNorm has trained a while. Layers correct where
:func:`keras_qat.emulation.linear_map` knows their linear map (Dense, Conv, DepthwiseConv)
and, without a folded BatchNorm, they have a bias.

Each call adds the shift it measures: correct a freshly quantized model once (``calibrate``
does by default); to calibrate its ranges again, pass ``bias_correction=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import keras
import numpy as np
from keras import ops

from keras_qat import emulation
from keras_qat.folding import QuantizeFoldedBatchNorm
from keras_qat.layers import QuantizeWrapper
from keras_qat.registry import kind_of


@dataclass(frozen=True)
class _Correctable:
    """One layer whose bias can take the shift: its linear map's layer, its kernel's
    quantizer, its float and quantized kernels, and how to add a per-channel shift to its
    output."""

    layer: keras.layers.Layer
    linear: keras.layers.Layer
    quantizer: object
    float_kernel: Callable
    quantized_kernel: Callable
    shift_output: Callable[[np.ndarray], None]


def _folded(layer: QuantizeFoldedBatchNorm) -> _Correctable:
    bn = layer.batch_norm

    def shift(delta):  # the folded bias is beta + (bias - moving_mean) * factor
        bn.moving_mean.assign(bn.moving_mean - delta / layer._factor())

    return _Correctable(
        layer, layer.layer, layer.weight_quantizer, layer.unquantized_kernel, lambda: layer.folded_kernel(False), shift
    )


def _wrapped(layer: QuantizeWrapper) -> _Correctable | None:
    inner = layer.layer
    weights = layer.quantized_weights()
    if len(weights) != 1 or weights[0][0] is not getattr(inner, "kernel", None) or not getattr(inner, "use_bias", False):
        return None
    kernel, quantizer, variables = weights[0]
    return _Correctable(
        layer, inner, quantizer, lambda: kernel, lambda: quantizer(kernel, False, variables),
        lambda delta: inner.bias.assign(inner.bias + delta),
    )


def _correctable(layer) -> _Correctable | None:
    """The correction of ``layer``, or None where it has no linear map known or no bias."""
    if isinstance(layer, QuantizeFoldedBatchNorm):
        found = _folded(layer)
    elif isinstance(layer, QuantizeWrapper) and kind_of(layer.layer) is not None and kind_of(layer.layer).role == "kernel":
        found = _wrapped(layer)
    else:
        return None
    return found if found is not None and emulation.supports_kernel(found.linear, found.quantizer) else None


def _layer_inputs(model: keras.Model, layer) -> keras.Model | None:
    """A model from ``model``'s inputs to ``layer``'s input, or None where ``layer`` has no
    single place in ``model``'s graph (a layer called more than once: its calls see different
    inputs; only the top model's layers are walked, not a nested model's)."""
    if len(getattr(layer, "_inbound_nodes", ())) != 1:
        return None
    try:
        return keras.Model(model.input, layer.input)
    except (AttributeError, ValueError):
        return None


def correct_biases(model: keras.Model, batches: Sequence) -> dict[str, np.ndarray]:
    """Correct the bias of every correctable layer of ``model`` (a QAT model) on ``batches``
    of its inputs, in the graph's order. Returns ``{layer name: the shift added}``."""
    shifts = {}
    for layer in model.layers:
        correctable = _correctable(layer)
        if correctable is None or not layer.built:
            continue
        upstream = _layer_inputs(model, layer)
        if upstream is None:
            continue
        error = ops.convert_to_tensor(correctable.float_kernel()) - ops.convert_to_tensor(correctable.quantized_kernel())
        total, count = None, 0
        for batch in batches:
            inputs = ops.cast(upstream(batch, training=False), error.dtype)
            shifted = emulation.linear_map(correctable.linear, inputs, error)
            channels = int(shifted.shape[-1])
            flat = np.asarray(ops.convert_to_numpy(ops.reshape(shifted, (-1, channels))), np.float64)
            total = flat.sum(axis=0) if total is None else total + flat.sum(axis=0)
            count += flat.shape[0]
        if not count:
            continue
        delta = (total / count).astype(np.float32)
        correctable.shift_output(delta)
        shifts[layer.name] = delta
    return shifts


__all__ = ["correct_biases"]
