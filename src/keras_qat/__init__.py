"""keras-qat: quantization-aware training for Keras 3, with a path to real integers.

The public API is re-exported here; nothing is defined in this module. Names are imported on
first use (PEP 562), so that ``import keras_qat.runtime`` runs a ``.kqat`` artifact with NumPy
alone, without importing Keras or TensorFlow. When Keras is already imported, the API is
imported at once, which registers the package's layers with Keras for loading saved models.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "quantize_annotate_layer": "keras_qat.api",
    "quantize_annotate_model": "keras_qat.api",
    "quantize_apply": "keras_qat.api",
    "quantize_model": "keras_qat.api",
    "quantize_scope": "keras_qat.api",
    "QuantizeConfig": "keras_qat.config",
    "LayerQuantizeConfig": "keras_qat.config",
    "NoOpQuantizeConfig": "keras_qat.config",
    "QuantizeFoldedBatchNorm": "keras_qat.folding",
    "QuantizeAnnotate": "keras_qat.layers",
    "QuantizeAwareActivation": "keras_qat.layers",
    "QuantizeLayer": "keras_qat.layers",
    "QuantizeSameScale": "keras_qat.layers",
    "QuantizeWrapper": "keras_qat.layers",
    "fake_quant": "keras_qat.ops",
    "Quantizer": "keras_qat.quantizers",
    "LastValueQuantizer": "keras_qat.quantizers",
    "MovingAverageQuantizer": "keras_qat.quantizers",
    "AllValuesQuantizer": "keras_qat.quantizers",
    "FixedQuantizer": "keras_qat.quantizers",
    "Default8BitScheme": "keras_qat.schemes",
    "NBitScheme": "keras_qat.schemes",
}

#: Subpackages and modules reachable as attributes (``keras_qat.ops.fake_quant``).
_SUBMODULES = ("ops", "quantizers", "schemes", "export", "runtime", "grid", "fixed_point", "format", "errors")

__all__ = list(_SUBMODULES[:3]) + list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"keras_qat.{name}")
    else:
        raise AttributeError(f"module 'keras_qat' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


if "keras" in sys.modules:
    for _name in _EXPORTS:
        __getattr__(_name)
