"""The ``keras-qat`` command line: every command on a model and data made here, and its failures.

Every run goes through the installed console script in a subprocess, as a user runs it;
``--debug`` runs in-process, where the exception it lets through is caught. Each command runs
once (tests that check the same run share it), and the module's fixtures start the commands
that do not depend on each other side by side: each subprocess spends seconds of one core
importing TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_qat.cli import main
from tests.conftest import cpu_count, digits_data

L = keras.layers

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the CLI exports with TensorFlow")


def _script() -> list[str]:
    script = Path(sys.executable).parent / "keras-qat"
    if script.exists():
        return [str(script)]
    found = shutil.which("keras-qat")
    return [found] if found else [sys.executable, "-m", "keras_qat"]


def keras_qat(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script; its output and exit status."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "160"}
    return subprocess.run([*_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


class ConsoleScript:
    """The console script's runs in one folder. Each command (its argument list) runs once, and
    ``start`` starts commands side by side, as many at a time as there are CPUs (at most 4):
    a test or fixture starts what it will read, then reads each run with ``cli(*args)``."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, cpu_count())))
        self._runs: dict[tuple[str, ...], Future] = {}

    def start(self, *commands: tuple[str, ...]) -> None:
        for args in commands:
            if args not in self._runs:
                self._runs[args] = self._pool.submit(keras_qat, *args, cwd=self.cwd)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        self.start(args)
        return self._runs[args].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# The commands that more than one test or fixture names.
QUANTIZE = ("quantize", "float.keras", "--data", "digits.npz", "--scheme", "w4a8", "--epochs", "1", "--out", "qat.keras")
EXPORT_CHECKED = {fmt: ("export", "qat.keras", "--format", fmt, "--out", f"model.{fmt}", "--data", "digits.npz") for fmt in ("kqat", "tflite")}
EXPORT = ("export", "qat.keras", "--format", "kqat", "--out", "run.kqat")
INSPECT_MODEL = ("inspect", "qat.keras")
RUN_LABELLED = ("run", "run.kqat", "--data", "digits.npz")
RUN_UNLABELLED = ("run", "run.kqat", "--data", "unlabelled.npz", "--out", "predictions.npy")
COMPARE = ("compare", "qat.keras", "run.kqat", "--data", "digits.npz")
INSPECT_ARTIFACT = ("inspect", "run.kqat")
# Failures: what a user gets wrong, with the exit status each gives.
USERS_MISTAKE = ("run", "missing.kqat", "--data", "digits.npz")
MISSING_MODEL = ("quantize", "nope.keras", "--data", "digits.npz", "--out", "q.keras")
MISSING_DATA = ("compare", "float.keras", "model.kqat", "--data", "absent.npz")  # model.kqat exists
WRONG_NAMES = ("quantize", "float.keras", "--data", "wrong_names.npz", "--out", "q.keras")
UNKNOWN_SCHEME = ("quantize", "float.keras", "--data", "digits.npz", "--scheme", "int4", "--out", "q.keras")
UNSUPPORTED_LAYER = ("quantize", "lstm.keras", "--data", "digits.npz", "--out", "q.keras")
FAILURES = (USERS_MISTAKE, MISSING_MODEL, WRONG_NAMES, UNKNOWN_SCHEME, UNSUPPORTED_LAYER)  # need only the workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A float digits CNN (``float.keras``) and its data (``digits.npz``: train and validation
    splits; ``unlabelled.npz``: inputs only; ``wrong_names.npz``); ``lstm.keras``, a model
    with a layer that no target takes (a ``recurrent`` LSTM)."""
    folder = tmp_path_factory.mktemp("cli")
    images, labels = digits_data()
    np.savez(folder / "digits.npz", x_train=images[:1000], y_train=labels[:1000], x_val=images[1000:1300], y_val=labels[1000:1300])
    np.savez(folder / "unlabelled.npz", x_val=images[1300:1400])
    np.savez(folder / "wrong_names.npz", images=images[:10], labels=labels[:10])
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(10, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images[:1000], labels[:1000], epochs=2, verbose=0)
    model.save(folder / "float.keras")
    inputs = keras.Input((8, 8, 1))
    x = L.Reshape((8, 8), name="rows")(inputs)
    x = L.LSTM(4, name="recurrent")(x)
    keras.Model(inputs, L.Dense(10, name="head")(x)).save(folder / "lstm.keras")
    return folder


@pytest.fixture(scope="module")
def cli(workspace):
    """The console script, run in the workspace."""
    script = ConsoleScript(workspace)
    yield script
    script.close()


@pytest.fixture(scope="module")
def quantized(cli, workspace) -> Path:
    """``qat.keras``: the float model after ``keras-qat quantize`` at W4A8. The failures, which
    need only the workspace, run beside it; then it starts the commands that read it: the
    exports and ``inspect``."""
    cli.start(QUANTIZE, *FAILURES)
    result = cli(*QUANTIZE)
    assert result.returncode == 0, result.stderr
    assert "saved the QAT model" in result.stdout
    cli.start(*EXPORT_CHECKED.values(), EXPORT, INSPECT_MODEL)
    return workspace / "qat.keras"


@pytest.fixture(scope="module")
def exported(cli, quantized) -> Path:
    """``run.kqat``: ``qat.keras`` exported without a check (and ``model.kqat``, with one).
    Starts the commands that read them."""
    result = cli(*EXPORT)
    assert result.returncode == 0, result.stderr
    assert cli(*EXPORT_CHECKED["kqat"]).returncode == 0
    cli.start(RUN_LABELLED, RUN_UNLABELLED, COMPARE, INSPECT_ARTIFACT, MISSING_DATA)
    return quantized.parent / "run.kqat"


@pytest.fixture(scope="module")
def failures(cli):
    """The console script, with the failures that need only the workspace started."""
    cli.start(*FAILURES)
    return cli


@pytest.mark.slow
def test_quantize_writes_a_qat_model_at_the_schemes_bits(quantized):
    import keras_qat  # noqa: F401  (registers the layers for loading)
    from keras_qat.export import quantized_weights

    model = keras.models.load_model(quantized)
    bits = {name: tensor.bits for name, tensor in quantized_weights(model).items()}
    assert bits and set(bits.values()) == {4}, bits


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kqat", "tflite"])
def test_export_checks_the_deployed_model_on_the_data(cli, quantized, fmt):
    result = cli(*EXPORT_CHECKED[fmt])
    assert result.returncode == 0, result.stderr
    assert (quantized.parent / f"model.{fmt}").is_file()
    assert "100.00%" in result.stdout  # identical to the QAT model, element for element


@pytest.mark.slow
def test_run_and_compare_a_deployed_model(cli, exported):
    from keras_qat import runtime

    folder = exported.parent
    labelled = cli(*RUN_LABELLED)
    assert labelled.returncode == 0, labelled.stderr
    assert "accuracy" in labelled.stdout
    unlabelled = cli(*RUN_UNLABELLED)
    assert unlabelled.returncode == 0, unlabelled.stderr
    with np.load(folder / "unlabelled.npz") as data:
        want = runtime.load(exported).run(data["x_val"])
    np.testing.assert_array_equal(np.load(folder / "predictions.npy"), want)
    compared = cli(*COMPARE)
    assert compared.returncode == 0, compared.stderr
    assert "100.00%" in compared.stdout


@pytest.mark.slow
def test_inspect_lists_each_layer_and_the_targets_verdicts(cli, quantized, exported):
    model = cli(*INSPECT_MODEL)
    assert model.returncode == 0, model.stderr
    assert "conv" in model.stdout and "4 bits" in model.stdout
    assert "tflite" in model.stdout and "kqat" in model.stdout and "deploys exactly" in model.stdout
    artifact = cli(*INSPECT_ARTIFACT)
    assert artifact.returncode == 0, artifact.stderr
    assert "integer ops" in artifact.stdout and "conv" in artifact.stdout


@pytest.mark.slow
def test_a_users_mistake_gives_one_line_and_no_traceback(failures):
    result = failures(*USERS_MISTAKE)
    assert result.returncode == 2
    assert "missing.kqat does not exist" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- failures --------------------------------------------------------------------------------


def _fails(cli, status: int, args: tuple[str, ...]) -> str:
    """Run the script, expecting ``status``; its one-message stderr, which has no traceback."""
    result = cli(*args)
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.slow
def test_a_missing_file_is_named(failures, exported):
    err = _fails(failures, 2, MISSING_MODEL)
    assert "nope.keras does not exist" in err
    err = _fails(failures, 2, MISSING_DATA)
    assert "absent.npz does not exist" in err


@pytest.mark.slow
def test_wrong_array_names_list_what_the_file_holds(failures):
    err = _fails(failures, 2, WRONG_NAMES)
    assert "x_train and y_train" in err and "['images', 'labels']" in err


@pytest.mark.slow
def test_an_unknown_scheme_says_how_schemes_are_named(failures):
    err = _fails(failures, 2, UNKNOWN_SCHEME)
    assert "unknown scheme 'int4'" in err and "w4a8" in err


@pytest.mark.slow
def test_a_model_with_an_unsupported_layer_is_refused_naming_it(failures, workspace):
    err = _fails(failures, 1, UNSUPPORTED_LAYER)
    assert "recurrent" in err
    assert not (workspace / "q.keras").exists()


def test_debug_shows_the_traceback(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "run", "missing.kqat", "--data", "digits.npz"])
