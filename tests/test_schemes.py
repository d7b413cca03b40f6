"""The schemes' constructors: every argument is checked for its type and range, and the
message names the argument and what is allowed."""

from __future__ import annotations

import keras
import pytest

import keras_qat as kq
from keras_qat.compat import tfmot

pytestmark = pytest.mark.api


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(per_axis="no"), r"NBitScheme: per_axis must be True or False, got 'no'"),
        (dict(per_axis=0), r"NBitScheme: per_axis must be True or False, got 0"),
        (dict(per_axis=None), r"NBitScheme: per_axis must be True or False, got None"),
        (dict(weight_bits=4.0), r"weight_bits.*integer from 2 to 16.*4\.0"),
        (dict(activation_bits="8"), r"activation_bits.*integer from 2 to 16"),
        (dict(weight_bits=True), r"weight_bits.*integer from 2 to 16"),
        (dict(fold_batch_norm="yes"), r"fold_batch_norm must be True or False"),
        (dict(overrides={"conv": {"per_axis": "no"}}), r"override 'conv' per_axis must be True or False, got 'no'"),
        (dict(overrides={"conv": {"weight_bits": 8.5}}), r"override 'conv' weight_bits.*integer from 2 to 16"),
        (dict(overrides=["conv", None]), r"overrides must be a dict .*layer name or layer class.*got list"),
    ],
)
def test_n_bit_scheme_arguments_are_checked_by_type(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kq.NBitScheme(**kwargs)


def test_default_8bit_scheme_arguments_are_checked_by_type():
    with pytest.raises(ValueError, match=r"Default8BitScheme: fuse_activations must be True or False, got 'no'"):
        kq.Default8BitScheme(fuse_activations="no")
    with pytest.raises(ValueError, match=r"Default8BitScheme: override 'fc' per_axis must be True or False, got 1"):
        kq.Default8BitScheme(overrides={"fc": {"per_axis": 1}})


def test_tfmot_n_bit_scheme_checks_disable_per_axis():
    scheme_class = tfmot.quantization.keras.experimental.default_n_bit.DefaultNBitQuantizeScheme
    with pytest.raises(ValueError, match=r"DefaultNBitQuantizeScheme: disable_per_axis must be True or False, got 'no'"):
        scheme_class(disable_per_axis="no")
    assert scheme_class(disable_per_axis=True).per_axis_conv is False


def test_valid_arguments_are_kept_as_given():
    scheme = kq.NBitScheme(4, 6, per_axis=False, overrides={keras.layers.Dense: {"per_axis": True}})
    assert (scheme.weight_bits, scheme.activation_bits, scheme.per_axis_conv, scheme.per_axis_dense) == (4, 6, False, False)
    quantizer = scheme.config_for(keras.layers.Dense(3)).weight_quantizer
    assert quantizer.per_axis is True and quantizer.num_bits == 4


@pytest.mark.parametrize(
    "weight_bits, activation_bits, method",
    [(16, 16, "lsq"), (8, 8, "lsq"), (5, 8, "lsq"), (4, 4, "lsq"), (2, 8, "lsq"), (2, 2, "lsq")],
)
def test_the_default_method_is_chosen_by_bit_width(weight_bits, activation_bits, method):
    """NBitScheme's "auto": learned step sizes, the measured best at every width; the chosen
    quantizers are the ones that method names, for weights and activations, and tfmot's
    stand-ins keep min/max."""
    scheme = kq.NBitScheme(weight_bits, activation_bits)
    assert scheme.method == method
    config = scheme.config_for(keras.layers.Dense(3, activation="relu"))
    learned = method == "lsq"
    assert type(config.weight_quantizer) is (kq.LSQQuantizer if learned else kq.LastValueQuantizer)
    assert type(config.activation_quantizer) is (kq.LSQQuantizer if learned else kq.MovingAverageQuantizer)
    assert kq.Default8BitScheme().method == "minmax"


def test_an_explicit_method_is_kept_at_any_width():
    assert kq.NBitScheme(2, 2, method="minmax").method == "minmax"
    assert kq.NBitScheme(8, 8, method="lsq").method == "lsq"
