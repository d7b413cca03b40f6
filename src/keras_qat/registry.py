"""One table of the layer kinds keras-qat knows: what each computes and how it deploys.

Every module that asks "what kind of layer is this?" (the schemes, the graph transforms, the
integer inference, the exporters, ``diagnose``) reads :func:`kind_of` instead of keeping its own
list of Keras types. A :class:`LayerKind` says:

* ``role``: ``"kernel"`` (weights, a linear map), ``"compute"`` (new values, an output grid of
  its own), ``"same_scale"`` (new values on its input's grid: average pooling), ``"moves"``
  (only moves values: max pooling, padding, reshapes; no quantizer);
* ``weight_attrs``: the weights a kernel layer quantizes, and ``kernel_axis`` its output-channel
  axis (``-2`` for transposed convolutions, whose kernel is ``(..., filters, in_channels)``);
* ``foldable``: a following BatchNormalization folds into its weights;
* ``fusable``: a following ReLU/ReLU6 fuses into its integer kernel (one output grid);
* ``integer_op``: the ``.kqat`` op it lowers to (None where there is none);
* ``fixed_range``: for activations whose integer kernel fixes the output range
  (``"unit"``: sigmoid/softmax ``[0, 1)``; ``"signed_unit"``: tanh ``[-1, 1)``).

Layers are matched by exact type: a subclass may compute something else, so it is not taken
for its parent.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

L = keras.layers


@dataclass(frozen=True)
class LayerKind:
    """What keras-qat knows about one family of Keras layers (see the module docstring)."""

    name: str
    types: tuple[type, ...]
    role: str
    weight_attrs: tuple[str, ...] = ()
    kernel_axis: int = -1
    foldable: bool = False
    fusable: bool = False
    integer_op: str | None = None
    depthwise: bool = False

    def matches(self, layer) -> bool:
        return type(layer) in self.types


def _kernel(name, types, op, foldable=False, fusable=True, weight_attrs=("kernel",), kernel_axis=-1, depthwise=False):
    return LayerKind(name, types, "kernel", weight_attrs, kernel_axis, foldable, fusable, op, depthwise)


def _compute(name, types, op=None, fusable=False):
    return LayerKind(name, types, "compute", fusable=fusable, integer_op=op)


def _moves(name, types, op=None):
    return LayerKind(name, types, "moves", integer_op=op)


KINDS: tuple[LayerKind, ...] = (
    _kernel("dense", (L.Dense,), "dense", foldable=True),
    _kernel("conv", (L.Conv1D, L.Conv2D), "conv", foldable=True),
    _kernel("conv3d", (L.Conv3D,), None),
    _kernel("depthwise_conv", (L.DepthwiseConv1D, L.DepthwiseConv2D), "depthwise_conv", foldable=True, depthwise=True),
    _kernel(
        "separable_conv",
        (L.SeparableConv1D, L.SeparableConv2D),
        None,
        foldable=True,  # into its pointwise half, see keras_qat.transforms.rewrites
        weight_attrs=("depthwise_kernel", "pointwise_kernel"),
    ),
    _kernel(
        "conv_transpose", (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose), None, fusable=False, kernel_axis=-2
    ),
    _compute("batch_norm", (L.BatchNormalization,), fusable=True),
    _compute("add", (L.Add,), "add", fusable=True),
    _compute("subtract", (L.Subtract,), fusable=True),
    _compute("multiply", (L.Multiply,), fusable=True),
    _compute("elementwise_merge", (L.Average, L.Maximum, L.Minimum)),
    _compute("concatenate", (L.Concatenate,), "concatenate"),
    LayerKind("average_pool", (L.AveragePooling1D, L.AveragePooling2D), "same_scale", integer_op="average_pool"),
    _compute("average_pool3d", (L.AveragePooling3D,)),
    _compute("global_average_pool", (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D), "mean"),
    _compute("global_average_pool3d", (L.GlobalAveragePooling3D,)),
    _compute("relu", (L.ReLU,), "lookup"),
    _compute("leaky_relu", (L.LeakyReLU, L.ELU), "lookup"),
    _compute("prelu", (L.PReLU,)),
    _compute("softmax", (L.Softmax,), "softmax"),
    _compute("activation", (L.Activation,), "lookup"),
    _compute("rescaling", (L.Rescaling, L.Normalization)),
    _compute("upsampling_2d", (L.UpSampling2D,)),
    _moves("max_pool", (L.MaxPooling1D, L.MaxPooling2D), "max_pool"),
    _moves("max_pool3d", (L.MaxPooling3D,)),
    _moves("global_max_pool", (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D)),
    _moves("zero_padding", (L.ZeroPadding1D, L.ZeroPadding2D), "pad"),
    _moves("zero_padding3d", (L.ZeroPadding3D,)),
    _moves("cropping", (L.Cropping1D, L.Cropping2D, L.Cropping3D)),
    _moves("reshape", (L.Flatten, L.Reshape), "reshape"),
    _moves("permute", (L.Permute, L.RepeatVector)),
    _moves("upsampling", (L.UpSampling1D, L.UpSampling3D)),
    _moves(
        "identity",
        (
            L.Dropout,
            L.SpatialDropout1D,
            L.SpatialDropout2D,
            L.SpatialDropout3D,
            L.GaussianNoise,
            L.GaussianDropout,
            L.AlphaDropout,
            L.Identity,
        ),
        "identity",
    ),
)

_BY_TYPE: dict[type, LayerKind] = {t: kind for kind in KINDS for t in kind.types}

#: Activations whose integer kernel fixes the output range: ``[0, 1)`` and ``[-1, 1)``.
UNIT_RANGE_ACTIVATIONS = ("sigmoid", "softmax", "hard_sigmoid")
SIGNED_UNIT_RANGE_ACTIVATIONS = ("tanh",)

#: Activations that integer kernels apply as a clamp of their output codes (fused).
CLAMP_ACTIVATIONS = ("linear", "relu", "relu6")

#: keras.ops operations that compute new values elementwise and that deployed integer models
#: run as quantized kernels (ADD, SUB, MUL, DIV with a constant or a tensor).
ARITHMETIC_OPERATIONS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")


def kind_of(layer) -> LayerKind | None:
    """The kind of ``layer`` (by exact type), or None for a layer keras-qat does not know.

    A nearest-neighbour UpSampling2D only moves values; a bilinear one computes new ones."""
    if type(layer) is L.UpSampling2D and layer.interpolation == "nearest":
        return _NEAREST_UPSAMPLING
    return _BY_TYPE.get(type(layer))


_NEAREST_UPSAMPLING = LayerKind("upsampling", (L.UpSampling2D,), "moves")


def activation_name(activation) -> str:
    """The registered name of an activation function ('relu', 'softmax', ...)."""
    if isinstance(activation, str):
        return activation
    name = getattr(activation, "__name__", None)
    return name or type(activation).__name__.lower()


def is_kind(layer, *names: str) -> bool:
    """Whether ``layer`` is of one of the kinds ``names``."""
    kind = kind_of(layer)
    return kind is not None and kind.name in names


def is_fusable_relu(layer) -> bool:
    """A ReLU or ReLU6 that integer kernels fuse into the kernel before them (a clamp)."""
    return clamp_activation(layer) in ("relu", "relu6")


def clamp_activation(layer) -> str | None:
    """``"relu"`` / ``"relu6"`` for a layer that is only that clamp (ReLU(), ReLU(6),
    Activation("relu")), else None."""
    if type(layer) is L.ReLU:
        plain = float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0
        if plain and layer.max_value is None:
            return "relu"
        if plain and layer.max_value is not None and float(layer.max_value) == 6.0:
            return "relu6"
        return None
    if type(layer) is L.Activation:
        name = activation_name(layer.activation)
        return name if name in ("relu", "relu6") else None
    return None


def is_last_axis_softmax(layer) -> bool:
    """A Softmax over the last axis, or ``Activation("softmax")``: what the integer softmax
    (:func:`keras_qat.integer.softmax_codes`) computes."""
    kind = kind_of(layer)
    if kind is None:
        return False
    if kind.name == "softmax":
        # axis=None normalizes over every element, the batch included.
        return layer.axis == -1
    return kind.name == "activation" and activation_name(layer.activation) == "softmax"


def fixed_output_range(layer) -> tuple[float, float] | None:
    """The 8-bit range that TFLite's int8 kernel fixes for ``layer``'s output (SOFTMAX and
    LOGISTIC: ``[0, 255/256]``, TANH: ``[-1, 127/128]``), or None if its range is learned."""
    kind = kind_of(layer)
    if kind is None:
        return None
    name = "softmax" if kind.name == "softmax" else (
        activation_name(layer.activation) if kind.name == "activation" else None
    )
    if name in ("sigmoid", "softmax"):  # LOGISTIC, SOFTMAX; hard_sigmoid lowers to other ops
        return 0.0, 255.0 / 256.0
    if name in SIGNED_UNIT_RANGE_ACTIVATIONS:
        return -1.0, 127.0 / 128.0
    return None


def supported_type_names() -> list[str]:
    """The names of every Keras layer type in the table."""
    return sorted({t.__name__ for kind in KINDS for t in kind.types})


__all__ = [
    "LayerKind",
    "KINDS",
    "kind_of",
    "is_kind",
    "is_fusable_relu",
    "clamp_activation",
    "activation_name",
    "supported_type_names",
    "fixed_output_range",
    "is_last_axis_softmax",
    "UNIT_RANGE_ACTIVATIONS",
    "SIGNED_UNIT_RANGE_ACTIVATIONS",
    "CLAMP_ACTIVATIONS",
    "ARITHMETIC_OPERATIONS",
]
