"""The package's top level: what ``import keras_qat`` makes reachable, and what it imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_side_by_side

_CODE = """
import sys
import keras_qat
runtime, format = keras_qat.runtime, keras_qat.format
assert callable(runtime.load) and runtime.__name__ == "keras_qat.runtime"
assert not [m for m in ("keras", "tensorflow") if m in sys.modules], "keras_qat.runtime imported Keras"
assert "runtime" in dir(keras_qat) and "export" in dir(keras_qat)
from keras_qat import *
assert runtime.load is keras_qat.runtime.load
assert callable(export.save_artifact) and export is keras_qat.export
assert callable(keras_qat.export.compare)
print("OK")
"""


def test_runtime_and_export_are_reachable_after_a_plain_import():
    """``keras_qat.runtime`` and ``keras_qat.export`` need no import of their own, through
    the attribute or ``from keras_qat import *``; reaching the runtime imports no Keras."""
    done = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "OK", done.stderr[-3000:]


_MAKE = """
import keras
import keras_qat
inputs = keras.Input((4,))
keras_qat.quantize_model(keras.Model(inputs, keras.layers.Dense(2)(inputs))).save({path!r})
"""

_LOAD = """
import keras
try:
    model = keras.models.load_model({path!r})
except TypeError as error:
    print(error)
else:
    print("LOADED", type(model.layers[1]).__name__)
"""


def _command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(code), capture_output=True, text=True, timeout=300)


#: What a fresh Python imports before loading the saved model: keras_qat first, then Keras (or
#: TensorFlow, which imports Keras); Keras first; and Keras alone, without keras_qat.
IMPORTS = ("import keras_qat\n", "import keras_qat\nimport tensorflow\n", "import keras\nimport keras_qat\n", "")


@pytest.fixture(scope="module")
def loads(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """A QAT model saved by one fresh Python, then loaded by one fresh Python per ``IMPORTS``
    (side by side): each run's output, by its imports."""
    path = str(tmp_path_factory.mktemp("init") / "q.keras")
    made = _run(_MAKE.format(path=path))
    assert made.returncode == 0, made.stderr[-3000:]
    done = run_side_by_side(
        [_command(imports + _LOAD.format(path=path)) for imports in IMPORTS], capture_output=True, text=True, timeout=300
    )
    return dict(zip(IMPORTS, done))


def test_a_saved_qat_model_loads_after_import_keras_qat_before_or_after_keras(loads):
    """Importing keras_qat first, then Keras (or TensorFlow, which imports Keras), registers the
    classes as soon as Keras is there: no keras-qat name needs to be used before loading."""
    for imports in IMPORTS[:3]:
        done = loads[imports]
        assert done.stdout.strip() == "LOADED QuantizeLayer", imports + done.stdout + done.stderr[-3000:]


def test_loading_without_keras_qat_gives_keras_error_naming_the_package(loads):
    """Keras imports no package while loading but its own (documented in keras_qat.errors): its
    error names the class and the registered name ``keras_qat>...``, the package to import."""
    done = loads[""]
    assert "Could not locate class 'QuantizeLayer'" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "'registered_name': 'keras_qat>QuantizeLayer'" in done.stdout
