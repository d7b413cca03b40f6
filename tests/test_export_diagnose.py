"""diagnose: bits and ranges per layer read from the quantizers, and what stays float."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export import diagnose
from tests.conftest import to_numpy

pytestmark = pytest.mark.api
L = keras.layers


def _model():
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(6, 3, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(8, name="kept_float")(x)
    x = x * 2.0  # plain arithmetic on a float tensor stays float
    outputs = L.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def _entry(report, name):
    (entry,) = [e for e in report.layers if e.layer == name]
    return entry


def test_bits_channels_and_ranges_come_from_the_quantizers():
    scheme = kq.NBitScheme(weight_bits=4, activation_bits=8, overrides={"kept_float": None})
    model = kq.quantize_model(_model(), scheme)
    model(np.random.default_rng(0).normal(size=(4, 8, 8, 2)).astype("float32"), training=True)
    report = diagnose(model)
    conv = _entry(report, "quant_conv")
    kernel = conv.quantized[0]
    assert "folded" in conv.kind and kernel.bits == 4 and kernel.channels == 6
    variables = model.get_layer("quant_conv").kernel_vars
    assert kernel.range_min == float(to_numpy(variables["min_var"]).min())
    assert kernel.range_max == float(to_numpy(variables["max_var"]).max())
    assert not conv.float_needs
    assert not _entry(report, "quant_flatten").float_needs  # moves values only
    float_names = {e.layer for e in report.float_layers}
    assert "kept_float" in float_names
    assert any(not isinstance(op, keras.layers.Layer) for op in model.operations if op.name in float_names)
    assert "quant_head" not in float_names
    assert "kept_float" in str(report)


def test_more_than_8_bits_is_flagged_for_the_integer_artifact():
    model = kq.quantize_model(_model(), kq.NBitScheme(weight_bits=8, activation_bits=16))
    report = diagnose(model)
    needs = [need for e in report.layers for need in e.float_needs]
    assert any("16 bits" in need and "integer artifact" in need for need in needs)


def test_quantized_plain_arithmetic_is_not_float():
    inputs = keras.Input((4,))
    outputs = L.Dense(3, name="d")(inputs) * 0.5
    report = diagnose(kq.quantize_model(keras.Model(inputs, outputs)))
    assert report.float_layers == [], str(report)
