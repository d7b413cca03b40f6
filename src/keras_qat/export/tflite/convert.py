"""``to_tflite``: a QAT model as an int8 TFLite (LiteRT) flatbuffer, refused up front where inexact.

The model is traced in inference mode inside :func:`keras_qat.ops.exporting`, where every
quantizer runs TF's ``FakeQuantWithMinMaxVars(PerChannel)`` op (below 8 bits: an 8-bit op on
the trained grid, see :func:`keras_qat.ops.fake_quant`) and kernel layers are traced the way the
converter folds them (:mod:`.trace`); the TFLite converter turns those ops into int8 tensors
with the trained scales and zero points. Before converting, every layer the target cannot
compute exactly is refused at once (:func:`keras_qat.export.targets.refusals`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import keras

from keras_qat import ops as qops
from keras_qat.errors import NotDeployableError
from keras_qat.export.targets import require_deployable
from keras_qat.export.compare import structured_inputs
from keras_qat.export.tflite.int4 import pack_int4_filters
from keras_qat.export.tflite.inspect import TFLiteCheck, analyse_flatbuffer, layer_names
from keras_qat.export.tflite.trace import linear_for_converter, upsample_for_converter
from keras_qat.format.atomic import write_atomically


def to_tflite(model: keras.Model, path: str | os.PathLike, int8_io: bool = False) -> TFLiteCheck:
    """Convert the QAT ``model`` to an int8 TFLite flatbuffer at ``path``, and check it.

    The model is traced in inference mode (``model(inputs, training=False)``) with a dynamic
    batch dimension; the converter folds its fake-quant ops into int8 quantization. The file
    is written atomically: a failed conversion leaves nothing at ``path``.

    Args:
        model: a model from ``keras_qat.quantize_model`` / ``quantize_apply`` (TensorFlow
            backend), with every quantizer at 8 bits or fewer.
        path: the ``.tflite`` file to write; its directory must exist.
        int8_io: make the model's inputs and outputs int8 tensors (quantized with the first
            and last quantizers' scales) instead of float ones.

    Returns:
        A :class:`TFLiteCheck` listing ops left in float and redundant requantizations.
        Kernels trained at 4 bits or fewer are stored as INT4 where LiteRT's kernels take
        it (CONV_2D, FULLY_CONNECTED; :mod:`keras_qat.export.tflite.int4`), as int8 elsewhere.

    Raises:
        ValueError: on another backend than TensorFlow.
        keras_qat.errors.NotDeployableError: before converting anything, listing every layer
            that LiteRT int8 cannot compute exactly (:func:`keras_qat.export.targets.refusals`):
            quantizers wider than 8 bits, layers without an exact int8 kernel, NaN or Inf
            weights or ranges.
    """
    _require_tensorflow("to_tflite")
    if not isinstance(model, keras.Model):
        raise ValueError(f"to_tflite: expected a keras.Model, got {type(model).__name__}.")
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"to_tflite: model '{model.name}' has no symbolic inputs to trace; export the "
            "functional model that keras_qat.quantize_model returns (or build yours with keras.Input)."
        )
    require_deployable(model, "tflite")
    content = _convert(model, int8_io)
    content, _ = pack_int4_filters(content, _low_bit_kernel_scales(model))
    float_ops, redundant = analyse_flatbuffer(content, layer_names(model))
    path = Path(path)
    write_atomically(path, content)
    return TFLiteCheck(path=path, float_ops=float_ops, redundant_quantize_pairs=redundant)


def _low_bit_kernel_scales(model) -> list:
    """The scales of every kernel trained at 4 bits or fewer: those LiteRT may hold as INT4."""
    from keras_qat.export.weights import quantized_weights

    return [tensor.scale for name, tensor in quantized_weights(model).items() if name.endswith("/kernel") and tensor.bits <= 4]


def _require_tensorflow(caller: str) -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"{caller}: TFLite conversion traces the model with TensorFlow, but the Keras backend "
            f"is '{backend}' (keras.backend.backend()). Set KERAS_BACKEND=tensorflow before "
            "importing keras, load the saved QAT model (model.save / keras.models.load_model) "
            "and export it there; or use keras_qat.export.save_artifact, which works on any backend."
        )


# ---- conversion --------------------------------------------------------------------------


def _inference_function(model, batch: int | None):
    """A concrete ``tf.function`` of ``model(inputs, training=False)``, outputs flattened in
    the model's output order."""
    import tensorflow as tf

    specs = [
        tf.TensorSpec((batch,) + tuple(tensor.shape[1:]), tensor.dtype, name=_input_name(tensor, i))
        for i, tensor in enumerate(model.inputs)
    ]

    def inference(*inputs):
        outputs = model(structured_inputs(model, list(inputs)), training=False)
        return tuple(keras.tree.flatten(outputs))

    return tf.function(inference, input_signature=specs, autograph=False).get_concrete_function()


def _input_name(tensor, index: int) -> str:
    name = getattr(tensor, "name", None) or f"input_{index}"
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


def _convert(model, int8_io: bool) -> bytes:
    """The flatbuffer: dynamic batch if the converter takes it, else batch 1. Traced in
    :func:`keras_qat.ops.exporting` mode, so layers emit the fake-quant patterns the
    converter folds."""
    with qops.exporting(linear=linear_for_converter, upsample=upsample_for_converter):
        try:
            return _convert_with_batch(model, int8_io, batch=None)
        except Exception as dynamic_error:  # the converter raises several types
            if isinstance(dynamic_error, NotDeployableError):
                raise
            try:
                return _convert_with_batch(model, int8_io, batch=1)
            except Exception:
                lines = str(dynamic_error).strip().splitlines() or [type(dynamic_error).__name__]
                raise RuntimeError(
                    f"to_tflite: the TFLite converter failed on model '{model.name}', although every "
                    f"layer passed keras-qat's checks for the target ({lines[0][:300]}). Please report "
                    "it with the model; save_artifact (.kqat) exports it meanwhile."
                ) from None


def _convert_with_batch(model, int8_io: bool, batch: int | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([_inference_function(model, batch)], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # Freeze every variable into a constant. Lowered to a SavedModel, the converter keeps
    # the range variables of a model without trainable weights as resource variables, and
    # then cannot fold the fake-quant ops that read them.
    converter.experimental_lower_to_saved_model = False
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The input ranges come from the model's fake-quant ops, not from statistics.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


__all__ = ["to_tflite"]
