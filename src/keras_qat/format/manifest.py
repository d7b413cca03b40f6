"""What a ``.kqat`` manifest holds: the op list and the layout that the writer
(:mod:`keras_qat.export.artifact`) and the runtime (:mod:`keras_qat.runtime`) share.

The manifest (JSON, inside the container of :mod:`keras_qat.format.container`) holds:

``format_version``
    the container version.
``tensors``
    ``{id: {"shape", "scale", "zero_point", "bits", "qmin", "qmax"}}``: every activation
    tensor's grid (:meth:`keras_qat.grid.IntegerGrid.to_manifest`), ``real = (q - zero_point)
    * scale`` with signed integers ``q`` in ``[qmin, qmax]`` (``scale`` a float32 value written
    exactly); a model input not yet quantized is ``{"shape", "float": true, "name"}``, ``name``
    the Keras input's (absent in files written before it was added).
``inputs`` / ``outputs``
    tensor ids, in the model's order.
``ops``
    in topological order: ``{"layer", "op", "inputs", "outputs", "attributes", "weights"}``.
    ``op`` is one of :data:`OPS`. Each weight is ``{"offset", "nbytes", "shape", "bits",
    "encoding", ...}`` into the payload: ``"packed"`` (signed integers at ``bits`` bits,
    :mod:`keras_qat.format.packing`), ``"int32"`` or ``"int64"`` (little-endian); kernels add
    ``scale``/``zero_point`` (one per output channel, or one). A ``dense`` op's attribute
    ``single_rounding`` says whether it requantizes with one rounding (TFLite's per-tensor
    FULLY_CONNECTED) or two (a per-channel Dense, deployed as a 1x1 CONV_2D). A ``softmax``
    computes the int8 SOFTMAX codes (scale 1/256, zero point -128) and requantizes them to its
    output tensor's grid when that is another. Ops that requantize carry their lowered
    parameters (:mod:`keras_qat.integer`) under ``"integer"``: ``{"requantize": {"m0", "shift",
    "low", "high", "single_rounding"}}`` for kernels and means (a mean's multiplier before its
    division by the count), and an ADD's ``{"left_shift", "a", "b", "requantize"}``; the runtime
    executes them as they are (an op without them, from an earlier writer, is lowered from its
    tensors' grids by the same code).

This module imports nothing but the standard library.
"""

from __future__ import annotations

#: The ops of format version 1 (what :mod:`keras_qat.runtime` executes).
OPS = (
    "quantize",
    "conv",
    "depthwise_conv",
    "dense",
    "add",
    "concatenate",
    "max_pool",
    "average_pool",
    "mean",
    "pad",
    "reshape",
    "identity",
    "lookup",
    "softmax",
)

#: Fixed-point bits of the softmax exponential table: ``round(2**SOFTMAX_BITS * exp(-s d))``.
SOFTMAX_BITS = 30

__all__ = ["OPS", "SOFTMAX_BITS"]
