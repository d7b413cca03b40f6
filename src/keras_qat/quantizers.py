"""Quantizers: where a tensor's range comes from, and its fake quantization.

The contract is tfmot's, so that tfmot ``QuantizeConfig`` code moves unchanged:

* ``build(tensor_shape, name, layer)`` creates the quantizer's variables on ``layer`` (named
  ``{name}_min``, ``{name}_max``, ...) and returns them in a dict;
* ``__call__(inputs, training, weights, **kwargs)`` fake-quantizes ``inputs`` with those
  variables, updating them from the data while ``training`` and only reading them otherwise;
* ``get_config`` / ``from_config`` serialize the settings.

Unlike tfmot, every quantizer honours ``num_bits`` (2..16), ``per_axis`` on any axis of any
rank, ``symmetric`` and ``narrow_range``:

* :class:`LastValueQuantizer`: the range of the current batch;
* :class:`MovingAverageQuantizer`: a bias-corrected exponential moving average of batch ranges;
* :class:`AllValuesQuantizer`: the running min / max over everything seen in training;
* :class:`FixedQuantizer`: a range given up front.

Per-axis ranges hold one ``(min, max)`` per output channel. For a depthwise kernel, laid out
``(..., in_channels, depth_multiplier)``, the output channels span the last two axes: the
default ``axis=-1`` then means both, flattened, ``in_channels * depth_multiplier`` ranges, as
the deployed per-channel model has them (tfmot sizes these by the depth multiplier alone).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_qat import ops as qops
from keras_qat.registry import kind_of
from keras_qat.spec import TensorSpec

#: The range every observing quantizer starts from, before it has seen data (as tfmot).
INITIAL_RANGE = (-6.0, 6.0)


def _is_depthwise_kernel(layer, name: str) -> bool:
    """Whether weight ``name`` of ``layer`` (or of the layer it wraps) is a depthwise kernel."""
    kind = kind_of(getattr(layer, "layer", layer))
    if kind is None:
        return False
    if kind.depthwise:
        return name in ("kernel", "depthwise_kernel")
    return kind.name == "separable_conv" and name == "depthwise_kernel"


def _layer_label(layer) -> str:
    return f"layer '{layer.name}'" if layer is not None and hasattr(layer, "name") else "no layer"


class Quantizer:
    """Base class of quantizers (tfmot's contract; see the module docstring).

    Subclasses implement :meth:`build`, :meth:`__call__` and :meth:`get_config`.
    """

    def build(self, tensor_shape, name: str, layer) -> dict[str, Any]:
        """Create the variables the quantizer needs on ``layer``; return them by key."""
        raise NotImplementedError(f"{type(self).__name__} must implement build().")

    def __call__(self, inputs, training, weights: dict[str, Any], **kwargs):
        """Return ``inputs`` fake-quantized; update ``weights`` from the data if training."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__().")

    #: Whether ``__call__`` takes ``factor=``: quantize ``inputs`` times one constant per
    #: channel (:func:`keras_qat.ops.channel_product`) as it would quantize that product. A
    #: folded Conv+BatchNorm layer then hands over its kernel and BN factor instead of their
    #: product, which fused kernels never store (:meth:`keras_qat.folding.QuantizeFoldedBatchNorm._train`).
    takes_channel_factor: bool = False

    #: Whether ``__call__`` takes ``activation=`` (``"relu"``, ``"relu6"``): quantize that
    #: activation of ``inputs`` as it would quantize the activation's output. A ReLU layer then
    #: hands over its input, and large tensors keep a byte per element for the backward pass
    #: instead of the activation's output (:func:`keras_qat.ops.fuses_activation`).
    takes_activation: bool = False

    def range_of(self, weights: dict[str, Any]):
        """``(min, max)``: the range the tensor is quantized on outside training, which
        inference and every export read: the range variables (a learned symmetric range
        derives its minimum from its maximum, see :mod:`keras_qat.learned`)."""
        return weights["min_var"], weights["max_var"]

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config().")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Quantizer":
        return cls(**config)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class _RangeQuantizer(Quantizer):
    """Shared machinery: settings, variables, channel layout and the fake-quant call.

    Subclasses say how the range moves in training (:meth:`_training_range`) and which
    extra variables that needs (:meth:`_build_state`).
    """

    #: How the range is set, for :attr:`keras_qat.spec.TensorSpec.observer`.
    observer = "custom"

    def __init__(
        self,
        num_bits: int = 8,
        per_axis: bool = False,
        symmetric: bool = False,
        narrow_range: bool = False,
        axis: int | tuple[int, ...] = -1,
    ):
        owner = type(self).__name__
        self.num_bits = qops.validate_num_bits(num_bits, owner)
        for arg, value in (("per_axis", per_axis), ("symmetric", symmetric), ("narrow_range", narrow_range)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{owner}: {arg} must be True or False, got {value!r}.")
        self.per_axis = bool(per_axis)
        self.symmetric = bool(symmetric)
        self.narrow_range = bool(narrow_range)
        self.axis = self._validate_axis(axis, owner)

    @staticmethod
    def _validate_axis(axis, owner):
        if isinstance(axis, (list, tuple)):
            if not axis or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis):
                raise ValueError(f"{owner}: axis must be an int or a tuple of ints, got {axis!r}.")
            return tuple(int(a) for a in axis)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise ValueError(f"{owner}: axis must be an int or a tuple of ints, got {axis!r}.")
        return int(axis)

    def get_config(self) -> dict[str, Any]:
        return {
            "num_bits": self.num_bits,
            "per_axis": self.per_axis,
            "symmetric": self.symmetric,
            "narrow_range": self.narrow_range,
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
        }

    # ---- channel layout -------------------------------------------------------------

    def channel_axes(self, tensor_shape, name: str = "tensor", layer=None) -> tuple[int, ...]:
        """The axes that one per-axis range spans for a tensor of ``tensor_shape``.

        Empty for per-tensor quantizers. A depthwise kernel's default axis spans its last
        two axes (``in_channels * depth_multiplier`` output channels).
        """
        if not self.per_axis:
            return ()
        rank = len(tensor_shape)
        owner = f"{type(self).__name__} for '{name}' ({_layer_label(layer)})"
        if rank == 0:
            raise ValueError(
                f"{owner}: per_axis=True needs a tensor of rank >= 1, but '{name}' is a scalar; "
                "use per_axis=False for it."
            )
        axis = self.axis
        if axis == -1 and rank >= 2 and _is_depthwise_kernel(layer, name):
            axis = (-2, -1)
        return qops.normalize_axes(axis, rank, owner)

    def spec(self, tensor_shape, name: str = "tensor", layer=None) -> TensorSpec:
        """The description of the tensor this quantizer quantizes (resolved channel axes)."""
        axes = self.channel_axes(tuple(tensor_shape), name, layer)
        return TensorSpec(self.num_bits, self.narrow_range, self.symmetric, axes, self.observer)

    def _call_axes(self, inputs, weights) -> tuple[int, ...]:
        """Recover at call time the layout chosen in :meth:`build` from the variable's size."""
        if not self.per_axis:
            return ()
        shape = tuple(inputs.shape)
        channels = int(weights["min_var"].shape[0])
        if self.axis == -1 and len(shape) >= 2 and shape[-1] != channels and shape[-2] is not None:
            if int(shape[-2]) * int(shape[-1]) == channels:  # a depthwise kernel
                return qops.normalize_axes((-2, -1), len(shape), type(self).__name__)
        return qops.normalize_axes(self.axis, len(shape), type(self).__name__)

    # ---- variables --------------------------------------------------------------------

    def build(self, tensor_shape, name: str, layer) -> dict[str, Any]:
        if layer is None or not hasattr(layer, "add_weight"):
            raise ValueError(
                f"{type(self).__name__}.build: layer must be the Keras layer that owns the "
                f"variables of '{name}', got {layer!r}."
            )
        tensor_shape = tuple(tensor_shape)
        axes = self.channel_axes(tensor_shape, name, layer)
        shape: tuple[int, ...] = ()
        if axes:
            count = qops.channel_count(tensor_shape, axes)
            if count is None:
                raise ValueError(
                    f"{type(self).__name__} for '{name}' ({_layer_label(layer)}): per-axis "
                    f"quantization needs the size of axis {axes} to be known, got shape {tensor_shape}."
                )
            shape = (count,)
        initial_min, initial_max = self._initial_range(shape, name, layer)
        weights = {
            "min_var": layer.add_weight(
                name=f"{name}_min",
                shape=shape,
                initializer=keras.initializers.Constant(initial_min),
                trainable=self.learns("min_var"),
            ),
            "max_var": layer.add_weight(
                name=f"{name}_max",
                shape=shape,
                initializer=keras.initializers.Constant(initial_max),
                trainable=self.learns("max_var"),
            ),
        }
        weights.update(self._build_state(name, layer))
        return weights

    def _initial_range(self, shape, name, layer):
        return INITIAL_RANGE

    def learns(self, key: str) -> bool:
        """Whether the range variable ``key`` (``"min_var"``, ``"max_var"``) is trained by
        gradient descent (:mod:`keras_qat.learned`) rather than set from observed data."""
        return False

    def _build_state(self, name: str, layer) -> dict[str, Any]:
        return {}

    # ---- the call ---------------------------------------------------------------------

    takes_channel_factor = True
    takes_activation = True

    def __call__(self, inputs, training, weights: dict[str, Any], factor=None, activation=None, **kwargs):
        """``inputs`` fake-quantized (see the module docstring); with ``factor`` (per-axis
        quantizers: one constant per channel), ``inputs`` times ``factor`` per channel, and with
        ``activation``, that activation of them, as :attr:`Quantizer.takes_channel_factor` and
        :attr:`Quantizer.takes_activation` describe."""
        inputs = self._float_tensor(inputs)
        axes = self._call_axes(inputs, weights)
        self._check_input_ops(axes, factor, activation)
        observer = qops.current_observer()
        if observer is not None:  # calibrating: the observer records the tensor
            return observer(self, qops.before_quantization(inputs, axes, factor, activation), weights, axes)
        if training:
            range_min, range_max = self._training_range(inputs, axes, weights, factor, activation)
        else:
            range_min, range_max = self.range_of(weights)
        return qops.fake_quant(
            inputs,
            range_min,
            range_max,
            num_bits=self.num_bits,
            narrow_range=self.narrow_range,
            axis=axes or None,
            # Only a converter's trace needs TF's own ops; training and the QAT model's
            # inference take the fused kernel (bit-identical, 10-20 times faster per channel).
            exportable=qops.is_exporting(),
            factor=factor,
            activation=activation,
        )

    def _check_input_ops(self, axes: tuple[int, ...], factor, activation) -> None:
        """Refuse a ``factor`` for a per-tensor quantizer and an activation it cannot apply."""
        if factor is not None and not axes:
            raise ValueError(
                f"{type(self).__name__}: factor= scales the channels of a per-axis quantizer; "
                "this one is per tensor (per_axis=False). Multiply the tensor first."
            )
        if activation is not None and activation not in qops.ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: activation= must be one of {qops.ACTIVATIONS} or None, "
                f"got {activation!r}; apply other activations before quantizing."
            )

    def _float_tensor(self, inputs):
        """``inputs`` as a tensor, refused unless floating point."""
        inputs = ops.convert_to_tensor(inputs)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            raise ValueError(
                f"{type(self).__name__}: inputs must be floating point, got dtype {dtype}; "
                "integer tensors (ids, masks) should be left unquantized."
            )
        return inputs

    def _range_update(self) -> tuple:
        """How a training step moves the range variables to the batch's range: the rule of
        :data:`_RANGE_UPDATES` named by :attr:`observer`, and its static arguments (a decay)."""
        return (self.observer,)

    def _training_range(self, inputs, axes, weights, factor=None, activation=None):
        """The range this training step quantizes on (of ``activation(inputs * factor)``, each
        where given), and the range variables moved to it: the batch's range, observed and
        applied by :meth:`_range_update`'s rule, as one shared op of a TensorFlow graph (as the
        quantizer's own methods where a subclass observes ranges its own way)."""
        rule, *arguments = update = self._range_update()
        if rule not in _RANGE_UPDATES:
            raise NotImplementedError(
                f"{type(self).__name__}: observer {rule!r} has no range update; a quantizer with "
                f"its own observer implements _training_range (one of {sorted(_RANGE_UPDATES)} otherwise)."
            )
        if type(self).observed_range is not _RangeQuantizer.observed_range:
            batch_min, batch_max = self.observed_range(inputs, axes, factor, activation)
            return _RANGE_UPDATES[rule](batch_min, batch_max, weights["min_var"], weights["max_var"], weights.get("steps"), *arguments)
        # No gradient reaches the range (nor, through it, the inputs): the function's inputs say so.
        return _observe_and_update(
            ops.stop_gradient(inputs), None if factor is None else qops.without_gradient(factor),
            weights["min_var"], weights["max_var"], weights.get("steps"),
            update, tuple(axes), activation, bool(self.symmetric), int(self.num_bits), bool(self.narrow_range),
            bool(axes) and qops.reduces_compiled(inputs),
        )

    def observed_range(self, inputs, axes: tuple[int, ...], factor=None, activation=None):
        """The range of ``inputs`` (times ``factor`` per channel, then ``activation``, where
        given) under this quantizer's rules (zero included, symmetric or not), over the global
        batch when a distributed step splits it (:func:`keras_qat.ops.global_range`)."""
        factor = None if factor is None else qops.without_gradient(factor)
        return _observed_range(inputs, factor, tuple(axes), activation, self.symmetric, self.num_bits, self.narrow_range)


def _observed_range(inputs, factor, axes: tuple[int, ...], activation, symmetric: bool, num_bits: int, narrow_range: bool, compiled: bool | None = None):
    """:meth:`_RangeQuantizer.observed_range` from the quantizer's settings (``compiled``: see
    :func:`keras_qat.ops.reduce_range`)."""
    batch_min, batch_max = qops.global_range(
        *qops.reduce_range(ops.cast(ops.stop_gradient(inputs), "float32"), axes or None, factor, activation, compiled=compiled)
    )
    if symmetric:
        return qops.symmetric_range(batch_min, batch_max, num_bits, narrow_range)
    return qops.asymmetric_range(batch_min, batch_max)


def _last_value_update(batch_min, batch_max, min_var, max_var, steps):
    """The batch's range, stored as it is."""
    min_var.assign(batch_min)
    max_var.assign(batch_max)
    return batch_min, batch_max


def _moving_average_update(batch_min, batch_max, min_var, max_var, steps, ema_decay: float):
    """The bias-corrected moving average (:class:`MovingAverageQuantizer`), stored."""
    steps_now = steps + 1.0
    # Weight of the new batch in the bias-corrected average: (1 - d) / (1 - d**t),
    # exactly 1 at the first step; 1 - d in float32, as a graph would subtract it.
    decay = np.float32(ema_decay)
    rate = ops.divide(np.float32(1.0) - decay, 1.0 - ops.power(decay, steps_now))
    keep = 1.0 - rate
    new_min = batch_min * rate + min_var * keep
    new_max = batch_max * rate + max_var * keep
    steps.assign(steps_now)
    min_var.assign(new_min)
    max_var.assign(new_max)
    return new_min, new_max


def _all_values_update(batch_min, batch_max, min_var, max_var, steps):
    """The running min and max (:class:`AllValuesQuantizer`), stored; the first batch's own."""
    first = ops.equal(steps, 0.0)
    new_min = ops.where(first, batch_min, ops.minimum(min_var, batch_min))
    new_max = ops.where(first, batch_max, ops.maximum(max_var, batch_max))
    steps.assign(steps + 1.0)
    min_var.assign(new_min)
    max_var.assign(new_max)
    return new_min, new_max


#: The range updates, by the :attr:`Quantizer.observer` they implement.
_RANGE_UPDATES = {
    "last_value": _last_value_update,
    "moving_average": _moving_average_update,
    "all_values": _all_values_update,
}


def _observe_and_update_fn(
    inputs, factor, min_var, max_var, steps, update: tuple, axes: tuple, activation, symmetric: bool, num_bits: int,
    narrow_range: bool, compiled: bool,
):
    """The batch's range (:func:`_observed_range`) applied to the range variables by ``update``
    (a name in :data:`_RANGE_UPDATES` and its arguments): the range the step quantizes on.
    ``compiled`` is decided where the inputs' shape is known (a trace shared by several
    shapes has lost it)."""
    batch_min, batch_max = _observed_range(inputs, factor, axes, activation, symmetric, num_bits, narrow_range, compiled)
    rule, *arguments = update
    return _RANGE_UPDATES[rule](batch_min, batch_max, min_var, max_var, steps, *arguments)


#: :func:`_observe_and_update_fn` as one op per quantizer of a TensorFlow training graph, traced
#: once for all quantizers of the same settings (:func:`keras_qat.ops.shared_update`): the
#: three dozen ops of a range's reduction, update and assignments cost memory for as long
#: as the model lives, in every quantizer.
_observe_and_update = qops.shared_update(_observe_and_update_fn)


def _steps_variable(layer, name: str):
    return layer.add_weight(
        name=f"{name}_steps",
        shape=(),
        initializer="zeros",
        trainable=False,
    )


@keras.saving.register_keras_serializable(package="keras_qat")
class LastValueQuantizer(_RangeQuantizer):
    """The range of the current batch in training; the last one seen in inference.

    The default weight quantizer: weights change little between steps, so their current
    range is the right one.
    """

    observer = "last_value"


@keras.saving.register_keras_serializable(package="keras_qat")
class MovingAverageQuantizer(_RangeQuantizer):
    """An exponential moving average of batch ranges, bias-corrected.

    After ``t`` steps the range is ``sum_i w_i r_i / sum_i w_i`` with ``w_i = decay**(t - i)``:
    the first batch sets it exactly and later ones move it by their weight, instead of tfmot's
    average that starts at +-6 and needs thousands of steps to forget it. Stored as the
    corrected value itself, so that inference and export read ``{name}_min`` / ``_max``.

    Args:
        ema_decay: the decay, in [0, 1); 0.999 averages over about the last thousand steps.
    """

    observer = "moving_average"

    def __init__(
        self,
        num_bits: int = 8,
        per_axis: bool = False,
        symmetric: bool = False,
        narrow_range: bool = False,
        axis: int | tuple[int, ...] = -1,
        ema_decay: float = 0.999,
    ):
        super().__init__(num_bits, per_axis, symmetric, narrow_range, axis)
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float, np.floating)) or not (
            0.0 <= float(ema_decay) < 1.0
        ):
            raise ValueError(
                f"MovingAverageQuantizer: ema_decay must be a number in [0, 1), got {ema_decay!r}."
            )
        self.ema_decay = float(ema_decay)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ema_decay": self.ema_decay}

    def _build_state(self, name, layer):
        return {"steps": _steps_variable(layer, name)}

    def _range_update(self) -> tuple:
        return (self.observer, self.ema_decay)


@keras.saving.register_keras_serializable(package="keras_qat")
class AllValuesQuantizer(_RangeQuantizer):
    """The running min and max over everything seen in training (per channel if per_axis).

    The first training batch replaces the initial range; later ones can only widen it.
    """

    observer = "all_values"

    def _build_state(self, name, layer):
        return {"steps": _steps_variable(layer, name)}


@keras.saving.register_keras_serializable(package="keras_qat")
class FixedQuantizer(_RangeQuantizer):
    """A range given up front, at ``num_bits`` (tfmot's version ignores ``num_bits``).

    Args:
        init_min, init_max: the range, containing zero; scalars, or with ``per_axis`` one
            value per channel (a scalar is repeated for every channel). With ``symmetric``
            the range is widened to tfmot's symmetric range around zero.
    """

    observer = "fixed"

    def __init__(
        self,
        num_bits: int = 8,
        init_min: float | Any = -6.0,
        init_max: float | Any = 6.0,
        narrow_range: bool = False,
        per_axis: bool = False,
        symmetric: bool = False,
        axis: int | tuple[int, ...] = -1,
    ):
        super().__init__(num_bits, per_axis, symmetric, narrow_range, axis)
        lo = np.asarray(init_min, dtype=np.float64)
        hi = np.asarray(init_max, dtype=np.float64)
        if lo.ndim > 1 or hi.ndim > 1 or (not per_axis and (lo.ndim or hi.ndim)):
            raise ValueError(
                "FixedQuantizer: init_min and init_max must be scalars, or vectors with "
                f"per_axis=True; got shapes {lo.shape} and {hi.shape}."
            )
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ValueError(
                f"FixedQuantizer: the range must be finite, got init_min={init_min!r}, init_max={init_max!r}."
            )
        if np.any(lo > 0) or np.any(hi < 0) or np.any(lo >= hi):
            raise ValueError(
                "FixedQuantizer: the range must contain zero and be non-empty "
                f"(init_min <= 0 <= init_max, init_min < init_max); got init_min={init_min!r}, "
                f"init_max={init_max!r}."
            )
        self.init_min = lo.tolist()
        self.init_max = hi.tolist()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        return {
            "num_bits": config["num_bits"],
            "init_min": self.init_min,
            "init_max": self.init_max,
            "narrow_range": config["narrow_range"],
            "per_axis": config["per_axis"],
            "symmetric": config["symmetric"],
            "axis": config["axis"],
        }

    def _initial_range(self, shape, name, layer):
        lo = np.broadcast_to(np.asarray(self.init_min, np.float32), shape) if shape else np.float32(self.init_min)
        hi = np.broadcast_to(np.asarray(self.init_max, np.float32), shape) if shape else np.float32(self.init_max)
        if np.shape(self.init_min) not in ((), shape) or np.shape(self.init_max) not in ((), shape):
            raise ValueError(
                f"FixedQuantizer for '{name}' ({_layer_label(layer)}): per-axis init_min/init_max "
                f"must be scalars or have shape {shape}, got {np.shape(self.init_min)} and "
                f"{np.shape(self.init_max)}."
            )
        if self.symmetric:
            lo, hi = (
                ops.convert_to_numpy(v)
                for v in qops.symmetric_range(lo, hi, self.num_bits, self.narrow_range)
            )
        return np.array(lo, np.float32), np.array(hi, np.float32)

    def _training_range(self, inputs, axes, weights, factor=None, activation=None):
        return weights["min_var"], weights["max_var"]


__all__ = [
    "Quantizer",
    "LastValueQuantizer",
    "MovingAverageQuantizer",
    "AllValuesQuantizer",
    "FixedQuantizer",
    "INITIAL_RANGE",
]
