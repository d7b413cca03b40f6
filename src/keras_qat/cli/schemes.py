"""Schemes by name on the command line: ``w8a8``, ``w4a8``, ``w4a4``, ``w2a8``, ... or a JSON
(or YAML) file with per-layer overrides.

``w8a8`` is TFLite's int8 scheme (:class:`keras_qat.Default8BitScheme`); ``wXaY`` is
:class:`keras_qat.NBitScheme` with X-bit weights and Y-bit activations, per-channel. A file
holds the arguments of ``NBitScheme``::

    {"weight_bits": 4, "activation_bits": 8, "per_axis": true,
     "overrides": {"conv_first": {"weight_bits": 8, "activation_bits": 8}, "head": null}}

where an override of ``null`` keeps that layer in float.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from keras_qat.cli.errors import UsageError

_NAME = re.compile(r"^w(\d+)a(\d+)$")
_FILE_KEYS = {
    "weight_bits", "activation_bits", "per_axis", "overrides", "fold_batch_norm", "fuse_activations", "method",
    "freeze_bn_after_steps",
}

#: The schemes the demo trains when none are named.
DEMO_SCHEMES = ("w8a8", "w4a8", "w4a4")


def bits_of(name: str) -> tuple[int, int] | None:
    """``(weight_bits, activation_bits)`` of a ``wXaY`` name, or None for another name."""
    match = _NAME.match(name.strip().lower())
    return (int(match.group(1)), int(match.group(2))) if match else None


def scheme_from_name(name: str):
    """The scheme that ``name`` (``wXaY``, or a path to a .json/.yaml file) stands for.

    Raises:
        UsageError: an unknown name, a file that cannot be read, or bits outside 2..16.
    """
    import keras_qat as kq

    bits = bits_of(name)
    if bits is not None:
        weight_bits, activation_bits = bits
        try:
            if bits == (8, 8):
                return kq.Default8BitScheme()
            return kq.NBitScheme(weight_bits, activation_bits)
        except ValueError as error:
            raise UsageError(f"scheme '{name}': {error}") from None
    path = Path(name)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return _scheme_from_file(path)
    raise UsageError(
        f"unknown scheme '{name}': name one as wXaY (X-bit weights, Y-bit activations, 2..16; "
        "e.g. w8a8, w4a8, w4a4, w2a8) or give a .json/.yaml file of NBitScheme arguments."
    )


def _scheme_from_file(path: Path):
    import keras_qat as kq

    if not path.is_file():
        raise UsageError(f"scheme file {path} does not exist.")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"scheme file {path} is not valid JSON: {error}.") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UsageError(f"scheme file {path}: reading YAML needs PyYAML (pip install pyyaml); or write it as JSON.") from None
        settings = yaml.safe_load(text)
    if not isinstance(settings, dict):
        raise UsageError(f"scheme file {path} must hold a mapping of NBitScheme arguments, got {type(settings).__name__}.")
    unknown = sorted(set(settings) - _FILE_KEYS)
    if unknown:
        raise UsageError(f"scheme file {path}: unknown keys {unknown}; allowed: {sorted(_FILE_KEYS)}.")
    settings: dict[str, Any] = dict(settings)
    try:
        return kq.NBitScheme(**settings)
    except (TypeError, ValueError) as error:
        raise UsageError(f"scheme file {path}: {error}") from None


def label(name: str) -> str:
    """A short label for tables: ``W4A8`` for ``w4a8``, the file's stem for a file."""
    return name.upper() if bits_of(name) else Path(name).stem


__all__ = ["scheme_from_name", "bits_of", "label", "DEMO_SCHEMES"]
