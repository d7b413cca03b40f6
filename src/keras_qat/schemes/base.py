"""The scheme base class: a config per layer, by the layer's kind (:mod:`keras_qat.registry`)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

import numpy as np

from keras_qat import ops as qops
from keras_qat.config import LayerQuantizeConfig, NoOpQuantizeConfig, QuantizeConfig
from keras_qat.learned import LSQQuantizer, PACTQuantizer
from keras_qat.quantizers import FixedQuantizer, LastValueQuantizer, MovingAverageQuantizer, Quantizer

from keras_qat.registry import (
    SIGNED_UNIT_RANGE_ACTIVATIONS,
    UNIT_RANGE_ACTIVATIONS,
    activation_name,
    kind_of,
    supported_type_names,
)

#: The ways a scheme sets ranges (``method``); "auto" is the measured best (:func:`resolve_method`).
METHODS = ("auto", "minmax", "lsq", "pact")


def resolve_method(method: str, weight_bits: int, activation_bits: int) -> str:
    """The method a scheme of these widths uses: ``method`` itself, or for ``"auto"`` the one
    that measured best on bench/accuracy.py, today LSQ at every width: from W8A8 to W2A2 it
    was the best or within the seeds' spread of the best (min/max ranges waste most of a 2-
    to 4-bit grid, and at W8A8 LSQ measured 0.4 points above min/max). The widths are
    arguments so that a later measurement can choose per width without changing callers."""
    del weight_bits, activation_bits  # one method fits every width measured so far
    if method != "auto":
        return method
    return "lsq"


OverrideValue = Any  # a dict of scheme settings, a QuantizeConfig, or None (keep the layer float)
_OVERRIDE_KEYS = {"weight_bits", "activation_bits", "per_axis"}


def check_bool(value, what: str) -> bool:
    """``value`` if it is True or False; else a ValueError naming ``what`` (an argument).

    ``bool("no")`` is True, so a string or a number is refused rather than taken for its truth.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be True or False, got {value!r} ({type(value).__name__}).")
    return bool(value)


def _checked_overrides(overrides, owner: str) -> dict:
    """``overrides`` as a dict, each key and value checked (see :class:`RegistryScheme`)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(
            f"{owner}: overrides must be a dict from a layer name or layer class to a dict of settings "
            f"({', '.join(sorted(_OVERRIDE_KEYS))}), a QuantizeConfig or None; got {type(overrides).__name__}."
        )
    checked = dict(overrides)
    for key, value in checked.items():
        if not isinstance(key, (str, type)):
            raise ValueError(f"{owner}: override keys are layer names or layer classes, got {key!r}.")
        if isinstance(value, dict):
            _check_override_settings(value, f"{owner}: override {key!r}")
        elif value is not None and not isinstance(value, QuantizeConfig):
            raise ValueError(
                f"{owner}: override for {key!r} must be a dict of settings, a QuantizeConfig "
                f"or None, got {value!r}."
            )
    return checked


def _check_override_settings(settings: dict, owner: str) -> None:
    """The settings of one override: known names, bits in range, per_axis a bool."""
    unknown = set(settings) - _OVERRIDE_KEYS
    if unknown:
        raise ValueError(f"{owner} has unknown settings {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}.")
    for bits_key in ("weight_bits", "activation_bits"):
        if bits_key in settings:
            qops.validate_num_bits(settings[bits_key], f"{owner} {bits_key}")
    if "per_axis" in settings:
        check_bool(settings["per_axis"], f"{owner} per_axis")


class Scheme:
    """What a scheme provides to ``quantize_apply``: a config per layer, and which graph
    transforms (:mod:`keras_qat.transforms`) to apply."""

    fold_batch_norm: bool = False
    fuse_activations: bool = False
    freeze_bn_after_steps: int | None = None

    def config_for(self, layer) -> QuantizeConfig | None:
        """The config for ``layer``, or None if the scheme does not support it."""
        raise NotImplementedError

    def governed_config(self, layer, governed_by) -> QuantizeConfig | None:
        """The config for ``layer``, which takes ``governed_by``'s per-layer settings when it
        has none of its own: ``layer`` is a ReLU fused after ``governed_by`` (it quantizes
        ``governed_by``'s output), or a part that ``quantize_apply`` split ``governed_by`` into
        (a SeparableConv's halves, a kernel's unfused activation). Default: ``config_for``."""
        return self.config_for(layer)

    def keeps_float(self, layer) -> bool:
        """Whether the scheme was told to leave ``layer`` in float (an override of None)."""
        return False

    def check_overrides(
        self, layer_names: Iterable[str], model_name: str, also_accepted: Iterable[str] = (), nested_models: Iterable[str] = ()
    ) -> None:
        """Refuse per-layer settings that name no layer of the model (``layer_names``, plus the
        layers ``quantize_apply`` makes, ``also_accepted``; ``nested_models`` are the names of
        the models inside it, which are not layers to override); a scheme without them has none."""


class RegistryScheme(Scheme):
    """A scheme driven by the registries above and per-layer overrides.

    Args:
        weight_bits, activation_bits: ints from 2 to 16.
        per_axis_conv, per_axis_dense: True or False: per-channel weight ranges for
            convolutions / Dense.
        overrides: layer name or layer class -> a dict with any of ``weight_bits``,
            ``activation_bits``, ``per_axis``; or a QuantizeConfig; or None to keep that layer
            float. Names are matched before classes; a class matches its subclasses.
            ``quantize_apply`` refuses a name that no layer of the model has. A layer's
            settings also govern the ReLU fused after it (which quantizes its output) and the
            parts a split makes of it, unless those have overrides of their own.
        fold_batch_norm: fold a BatchNormalization into the Conv/Dense before it, weights
            quantized after folding (:mod:`keras_qat.folding`).
        fuse_activations: quantize a Conv/Dense/Add output once, after the ReLU or ReLU6
            that follows it, and let a Concatenate quantize its inputs with one range.
        freeze_bn_after_steps: stop using batch statistics in folded layers after this
            many training steps; None never freezes.
        method: how ranges are set (:data:`METHODS`): ``"auto"`` picks the measured best
            (:func:`resolve_method`: LSQ), ``"minmax"`` observes them (weights:
            their current min/max; activations: a moving average of batch ranges), ``"lsq"``
            learns weights' and activations' step sizes (:class:`keras_qat.learned.LSQQuantizer`),
            ``"pact"`` learns activations' clipping bounds (:class:`keras_qat.learned.PACTQuantizer`)
            with min/max weights. Learned ranges start from the weights, from
            :func:`keras_qat.calibrate`, or from the first batch.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_axis_conv: bool = True,
        per_axis_dense: bool = False,
        overrides: Mapping[Any, OverrideValue] | None = None,
        fold_batch_norm: bool = True,
        fuse_activations: bool = True,
        freeze_bn_after_steps: int | None = None,
        method: str = "minmax",
    ):
        owner = type(self).__name__
        if method not in METHODS:
            raise ValueError(f"{owner}: method must be one of {', '.join(METHODS)}, got {method!r}.")
        for arg, value in (
            ("per_axis_conv", per_axis_conv),
            ("per_axis_dense", per_axis_dense),
            ("fold_batch_norm", fold_batch_norm),
            ("fuse_activations", fuse_activations),
        ):
            check_bool(value, f"{owner}: {arg}")
        if freeze_bn_after_steps is not None and (
            isinstance(freeze_bn_after_steps, bool) or not isinstance(freeze_bn_after_steps, int) or freeze_bn_after_steps < 0
        ):
            raise ValueError(
                f"{owner}: freeze_bn_after_steps must be None or a non-negative int, got {freeze_bn_after_steps!r}."
            )
        self.fold_batch_norm = bool(fold_batch_norm)
        self.fuse_activations = bool(fuse_activations)
        self.freeze_bn_after_steps = freeze_bn_after_steps
        self.weight_bits = qops.validate_num_bits(weight_bits, f"{owner}: weight_bits")
        self.activation_bits = qops.validate_num_bits(activation_bits, f"{owner}: activation_bits")
        #: The method in use ("auto" resolved).
        self.method = resolve_method(method, self.weight_bits, self.activation_bits)
        self.per_axis_conv = bool(per_axis_conv)
        self.per_axis_dense = bool(per_axis_dense)
        self.overrides = _checked_overrides(overrides, owner)

    # ---- overrides --------------------------------------------------------------------

    def _override(self, layer):
        if layer.name in self.overrides:
            return True, self.overrides[layer.name]
        for key, value in self.overrides.items():
            if isinstance(key, type) and isinstance(layer, key):
                return True, value
        return False, None

    def _settings_of(self, layer, governed_by=None):
        """``(found, override)`` for ``layer``: its own, else ``governed_by``'s settings dict."""
        found, override = self._override(layer)
        if not found and governed_by is not None:
            found, override = self._override(governed_by)
            if not isinstance(override, dict):
                return False, None
        return found, override

    def keeps_float(self, layer) -> bool:
        found, value = self._override(layer)
        return found and value is None

    def check_overrides(
        self, layer_names: Iterable[str], model_name: str, also_accepted: Iterable[str] = (), nested_models: Iterable[str] = ()
    ) -> None:
        """Raise ValueError if an override names no layer of the model: a misspelled name would
        otherwise leave the layer it meant at the scheme's settings, silently."""
        names = sorted(set(layer_names))
        accepted = set(names) | set(also_accepted)
        unknown = [key for key in self.overrides if isinstance(key, str) and key not in accepted]
        if not unknown:
            return
        models = [key for key in unknown if key in set(nested_models)]
        if models:
            raise ValueError(
                f"{type(self).__name__}: overrides name the nested model(s) {models} of model "
                f"'{model_name}'; overrides apply to layers: name that model's layers instead "
                f"(the layers are: {names})."
            )
        guesses = [
            f"{key!r} -> {close[0]!r}" for key in unknown for close in [difflib.get_close_matches(key, names, n=1)] if close
        ]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise ValueError(
            f"{type(self).__name__}: overrides name {len(unknown)} layer(s) that model '{model_name}' does not "
            f"have, unknown: {unknown}{hint}; the model's layers are: {names}. Override keys are layer "
            "names, exactly as the layers are named, or layer classes."
        )

    # ---- quantizers -------------------------------------------------------------------

    def weight_quantizer(self, layer, bits: int, per_axis: bool) -> Quantizer:
        kind = kind_of(layer)
        axis = kind.kernel_axis if kind is not None else -1
        quantizer = LSQQuantizer if self.method == "lsq" else LastValueQuantizer
        return quantizer(num_bits=bits, per_axis=per_axis, symmetric=True, narrow_range=True, axis=axis)

    def activation_quantizer(self, activation, bits: int) -> Quantizer:
        name = activation_name(activation)
        if name in UNIT_RANGE_ACTIVATIONS:
            return FixedQuantizer(num_bits=bits, init_min=0.0, init_max=(2**bits - 1) / 2**bits)
        if name in SIGNED_UNIT_RANGE_ACTIVATIONS:
            half = 2 ** (bits - 1)
            return FixedQuantizer(num_bits=bits, init_min=-1.0, init_max=(half - 1) / half)
        return self._observed_range_quantizer(bits)

    def _observed_range_quantizer(self, bits: int) -> Quantizer:
        """An activation quantizer whose range comes from data, by :attr:`method`."""
        quantizer = {"lsq": LSQQuantizer, "pact": PACTQuantizer}.get(self.method, MovingAverageQuantizer)
        return quantizer(num_bits=bits, per_axis=False, symmetric=False, narrow_range=False)

    # ---- the registry -----------------------------------------------------------------

    def governed_config(self, layer, governed_by) -> QuantizeConfig | None:
        return self.config_for(layer, governed_by)

    def config_for(self, layer, governed_by=None) -> QuantizeConfig | None:
        """The config for ``layer`` (see :meth:`Scheme.governed_config` for ``governed_by``)."""
        found, override = self._settings_of(layer, governed_by)
        if found and isinstance(override, QuantizeConfig):
            return override
        settings = override if found and isinstance(override, dict) else {}
        weight_bits = settings.get("weight_bits", self.weight_bits)
        activation_bits = settings.get("activation_bits", self.activation_bits)
        kind = kind_of(layer)
        if kind is None:
            return None
        if kind.role == "kernel":
            default_per_axis = self.per_axis_dense if kind.name == "dense" else self.per_axis_conv
            per_axis = settings.get("per_axis", default_per_axis)
            return LayerQuantizeConfig(
                weight_attrs=kind.weight_attrs,
                weight_quantizer=self.weight_quantizer(layer, weight_bits, per_axis),
                activation_attrs=("activation",),
                activation_quantizer=self.activation_quantizer(layer.activation, activation_bits),
            )
        if kind.role == "moves":
            return NoOpQuantizeConfig()
        activation = getattr(layer, "activation", None)
        if kind.name == "softmax":
            activation = "softmax"
        quantizer = (
            self.activation_quantizer(activation, activation_bits)
            if activation is not None
            else self._observed_range_quantizer(activation_bits)
        )
        return LayerQuantizeConfig(output_quantizer=quantizer)

    def supported_layer_types(self) -> list[str]:
        return supported_type_names()
