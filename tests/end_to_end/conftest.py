"""One QAT model per keras.applications architecture, trained once for all end-to-end tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import numpy as np
import pytest

import keras_qat as kq

APPLICATIONS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10),
    "ResNet50": lambda: keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(input_shape=(64, 64, 3), weights=None, classes=10),
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None, classes=10),
}


@dataclass
class TrainedApplication:
    name: str
    float_model: keras.Model
    quantized: keras.Model
    x: np.ndarray
    history: keras.callbacks.History
    held_out: np.ndarray


@pytest.fixture(scope="session")
def trained_application(request) -> TrainedApplication:
    """``request.param``'s architecture (random weights), quantized and fitted one epoch of
    2 steps of 8 random images. Session-scoped and parametrized indirectly: pytest groups the tests
    of one architecture and keeps one model alive at a time."""
    name = request.param
    keras.utils.set_random_seed(0)
    model = APPLICATIONS[name]()
    quantized = kq.quantize_model(model)
    rng = np.random.default_rng(0)
    shape = tuple(quantized.inputs[0].shape[1:])
    x = (rng.random((16,) + shape) * 255).astype("float32")
    y = rng.integers(0, 10, size=16)
    # Eager steps: tracing the training graph of these models costs 55-130 s each, an eager
    # step 3-20 s. Graph-mode training runs on the small models of the other test modules
    # and on every layer of bench/conformance.py.
    quantized.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    history = quantized.fit(x, y, batch_size=8, epochs=1, verbose=0)
    held_out = (rng.random((32,) + shape) * 255).astype("float32")
    return TrainedApplication(name, model, quantized, x, history, held_out)


class AgreementRecorder:
    """Writes agreement figures (JSON) to ``$KERAS_QAT_REPORT_DIR/<name>.json`` when that
    variable is set, for the closing notes to quote; :attr:`enabled` says whether it is."""

    def __init__(self, directory: str | None):
        self.directory = directory

    @property
    def enabled(self) -> bool:
        return bool(self.directory)

    def __call__(self, name: str, figures: dict) -> None:
        if self.enabled:
            os.makedirs(self.directory, exist_ok=True)
            with open(os.path.join(self.directory, f"{name}.json"), "w") as f:
                json.dump(figures, f)


@pytest.fixture
def record_agreement() -> AgreementRecorder:
    return AgreementRecorder(os.environ.get("KERAS_QAT_REPORT_DIR"))
