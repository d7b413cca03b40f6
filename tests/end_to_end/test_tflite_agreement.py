"""keras.applications after one epoch of QAT on random data, exported to LiteRT int8.

The oracle is the LiteRT interpreter: the exported model has no float op between its
boundaries, no redundant quantize pair, and computes what the QAT model computes in
inference, in output quantization steps (the interpreter's reference kernels, whose
arithmetic the QAT model's inference reproduces; see ``keras_qat.emulation``).
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export import compare, to_tflite

pytestmark = pytest.mark.slow

APPLICATIONS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10),
    "ResNet50": lambda: keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10),
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None, classes=10),
}
CASES = list(APPLICATIONS)

#: Where the agreement figures go when set (the closing notes quote them).
REPORT_DIR = os.environ.get("KERAS_QAT_REPORT_DIR")


@pytest.mark.parametrize("name", CASES)
def test_litert_int8_model_agrees_with_the_qat_model(name, tmp_path):
    keras.utils.set_random_seed(0)
    quantized = kq.quantize_model(APPLICATIONS[name]())
    rng = np.random.default_rng(0)
    shape = tuple(quantized.inputs[0].shape[1:])
    x = (rng.random((64,) + shape) * 255).astype("float32")
    y = rng.integers(0, 10, size=64)
    quantized.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    quantized.fit(x, y, batch_size=16, epochs=1, verbose=0)

    check = to_tflite(quantized, tmp_path / f"{name}.tflite")
    assert check.float_ops == [], str(check)
    assert check.redundant_quantize_pairs == [], str(check)

    held_out = (rng.random((32,) + shape) * 255).astype("float32")
    report = compare(quantized, check.path, held_out)
    if REPORT_DIR:
        os.makedirs(REPORT_DIR, exist_ok=True)
        with open(os.path.join(REPORT_DIR, f"tflite_{name}.json"), "w") as f:
            json.dump(
                {
                    kernels: {
                        "identical_fraction": r.identical_fraction,
                        "max_step_difference": r.max_step_difference,
                        "argmax_agreement": r.argmax_agreement,
                    }
                    # The optimized kernels round some ties differently: recorded, not asserted.
                    for kernels, r in [
                        ("reference", report),
                        ("builtin", compare(quantized, check.path, held_out, kernels="builtin")),
                        ("default", compare(quantized, check.path, held_out, kernels="default")),
                    ]
                },
                f,
            )
    assert report.identical_fraction >= 0.999, str(report)
    assert report.max_step_difference <= 1, str(report)
