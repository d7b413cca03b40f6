"""Schemes by name and from files (keras_qat.cli.schemes)."""

from __future__ import annotations

import json

import pytest

import keras_qat as kq
from keras_qat.cli.errors import UsageError
from keras_qat.cli.schemes import bits_of, scheme_from_name


@pytest.mark.parametrize("name,bits", [("w8a8", (8, 8)), ("W4A8", (4, 8)), ("w2a16", (2, 16)), ("int8", None), ("w4", None)])
def test_names_give_weight_and_activation_bits(name, bits):
    assert bits_of(name) == bits


def test_w8a8_is_tflites_scheme_and_other_widths_are_n_bit():
    assert isinstance(scheme_from_name("w8a8"), kq.Default8BitScheme)
    scheme = scheme_from_name("w4a4")
    assert isinstance(scheme, kq.NBitScheme) and (scheme.weight_bits, scheme.activation_bits) == (4, 4)


def test_bits_outside_two_to_sixteen_are_refused():
    with pytest.raises(UsageError, match="w1a8"):
        scheme_from_name("w1a8")


def test_a_json_file_gives_overrides(tmp_path):
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({"weight_bits": 4, "activation_bits": 8, "overrides": {"conv": {"weight_bits": 8}}}))
    scheme = scheme_from_name(str(path))
    assert (scheme.weight_bits, scheme.activation_bits) == (4, 8)


@pytest.mark.parametrize(
    "content,message",
    [("{not json", "not valid JSON"), ("[4, 8]", "mapping"), (json.dumps({"bits": 4}), "unknown keys \\['bits'\\]")],
)
def test_a_bad_scheme_file_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "scheme.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        scheme_from_name(str(path))


def test_a_missing_scheme_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        scheme_from_name(str(tmp_path / "absent.json"))
