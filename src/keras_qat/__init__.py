"""keras-qat: quantization-aware training for Keras 3, with a path to real integers.

The public API is re-exported here; nothing is defined in this module. Names and subpackages
(``keras_qat.export``, ``keras_qat.runtime``, ...) are imported on first use (PEP 562), so that
``import keras_qat.runtime`` runs a ``.kqat`` artifact with NumPy alone, without importing Keras
or TensorFlow. The API is imported as soon as both keras_qat and Keras are imported, in either
order (when Keras comes second, right after it is imported), which registers the package's
layers with Keras for loading saved models (see :mod:`keras_qat.errors` for a process that
never imports keras_qat).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "quantize_annotate_layer": "keras_qat.api",
    "quantize_annotate_model": "keras_qat.api",
    "quantize_apply": "keras_qat.api",
    "quantize_model": "keras_qat.api",
    "quantize_scope": "keras_qat.api",
    "calibrate": "keras_qat.calibration",
    "CalibrationReport": "keras_qat.calibration",
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
    "LSQQuantizer": "keras_qat.learned",
    "PACTQuantizer": "keras_qat.learned",
    "Default8BitScheme": "keras_qat.schemes",
    "NBitScheme": "keras_qat.schemes",
}

#: Subpackages and modules reachable as attributes (``keras_qat.ops.fake_quant``).
_SUBMODULES = ("ops", "quantizers", "schemes", "export", "runtime", "grid", "fixed_point", "format", "errors")

__all__ = ["ops", "quantizers", "schemes", "export", "runtime"] + list(_EXPORTS)


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


def _register_with_keras() -> None:
    """Import the API, whose modules register the package's classes with Keras."""
    for name in _EXPORTS:
        __getattr__(name)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when Keras is first imported, after keras_qat, it lets Keras load
    as usual and then registers the package's classes, so that ``keras.models.load_model`` finds
    them without any keras-qat name used first."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        spec = self._others_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            _register_after(spec.loader)
        return spec

    def _others_spec(self, fullname, path, target):
        """The spec that the other finders give (None: Keras is not installed)."""
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
        return None


def _register_after(loader) -> None:
    """Make ``loader`` register the package's classes once it has executed the module."""
    original = loader.exec_module

    def exec_module(module):
        try:
            original(module)
        finally:
            del loader.exec_module
        _remove_hook()
        try:
            _register_with_keras()
        except Exception as error:  # never break ``import keras``
            warnings.warn(
                f"keras_qat could not register its layers with Keras ({error!r}); load QAT models "
                "inside keras_qat.quantize_scope().",
                stacklevel=2,
            )

    try:
        loader.exec_module = exec_module
    except AttributeError:  # a loader that takes no attributes: register on first use instead
        pass


def _remove_hook() -> None:
    """Take :class:`_RegisterAfterKeras` out of the import system: Keras is imported."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterKeras)]


if "keras" in sys.modules:
    _register_with_keras()
elif not any(isinstance(finder, _RegisterAfterKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
