"""How a kernel layer is traced for the TFLite converter, where its own call does not convert.

The converter takes a per-channel fake-quant's channel axis to be the last one, and only
rewrites the filter transposes of Conv2D and DepthwiseConv2D. A per-channel kernel that then
passes through a RESHAPE (Conv1D's ``expand_dims``) or a TRANSPOSE (a MatMul's right operand)
keeps the old axis and fails the converter's verification. So the kernel is reshaped in float
first, fake-quantized in its final 4-D layout, and the layer is traced as a 2-D convolution:

* Conv1D / DepthwiseConv1D: a Conv2D / DepthwiseConv2D of height 1;
* a per-channel Dense: a 1x1 Conv2D (CONV_2D, which rounds twice: the QAT model's inference
  and the runtime compute per-channel Dense layers that way, see
  :func:`keras_qat.emulation.rounds_once`);
* a nearest UpSampling2D: a nearest resize (:func:`upsample_for_converter`).

:func:`keras_qat.export.tflite.to_tflite` installs :func:`linear_for_converter` as the
``linear`` hook of :func:`keras_qat.ops.exporting`; the quantized layers call it while traced.
"""

from __future__ import annotations

from typing import Callable

from keras_qat.registry import kind_of


def linear_for_converter(layer, x, kernel, quantize: Callable, per_channel: bool) -> object | None:
    """``layer``'s linear map (no bias, no activation) on ``x``, traced for the converter, or
    None where the layer's own call converts as it is.

    Args:
        layer: the Keras kernel layer.
        x: its input (a TF tensor in the traced function).
        kernel: its float kernel (folded, for a folded layer).
        quantize: ``quantize(w, axes)`` fake-quantizes a kernel ``w`` on its grid, per channel
            over ``axes`` (ignored by a per-tensor quantizer).
        per_channel: whether the kernel's quantizer is per channel (a per-tensor Dense converts
            to FULLY_CONNECTED as it is).
    """
    import tensorflow as tf

    kind = kind_of(layer)
    if kind is None or getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    if kind.name in ("conv", "depthwise_conv") and len(kernel.shape) == 3:
        dilation, stride = layer.dilation_rate[0], layer.strides[0]
        if layer.padding not in ("valid", "same") or getattr(layer, "groups", 1) != 1:
            return None
        padding = layer.padding.upper()
        rows = tf.expand_dims(x, 1)  # height 1: the row stride changes nothing; TF wants equal strides
        if kind.name == "conv":
            filters = quantize(tf.expand_dims(kernel, 0), (3,))
            y = tf.nn.conv2d(rows, filters, strides=[1, stride, stride, 1], padding=padding, dilations=[1, 1, dilation, 1])
        else:
            filters = quantize(tf.expand_dims(kernel, 0), (2, 3))
            y = tf.nn.depthwise_conv2d(rows, filters, strides=[1, stride, stride, 1], padding=padding, dilations=[1, dilation])
        return tf.squeeze(y, 1)
    if kind.name == "dense" and per_channel and len(kernel.shape) == 2:
        inner = list(x.shape[1:-1])
        if any(d is None for d in inner):
            return None
        inputs, outputs = int(kernel.shape[0]), int(kernel.shape[1])
        filters = quantize(tf.reshape(kernel, [1, 1, inputs, outputs]), (3,))
        y = tf.nn.conv2d(tf.reshape(x, [-1, 1, 1, inputs]), filters, strides=1, padding="VALID")
        return tf.reshape(y, [-1] + inner + [outputs])
    return None


def upsample_for_converter(layer, x) -> object | None:
    """A nearest-neighbour UpSampling2D traced as one RESIZE_NEAREST_NEIGHBOR, or None for any
    other layer. Keras repeats rows and columns, which converts to an int8 TILE of version 3
    that LiteRT's reference kernels cannot load; for integer factors the resize selects the
    same elements (``floor((i + 0.5) / s) == i // s``)."""
    import tensorflow as tf

    if type(layer).__name__ != "UpSampling2D" or layer.interpolation != "nearest":
        return None
    if layer.data_format != "channels_last" or x.shape[1] is None or x.shape[2] is None:
        return None
    rows, columns = layer.size
    return tf.image.resize(x, [int(x.shape[1]) * rows, int(x.shape[2]) * columns], method="nearest")


__all__ = ["linear_for_converter", "upsample_for_converter"]
