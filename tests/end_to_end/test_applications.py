"""quantize_model on keras.applications architectures: train a step, save, load, same bits.

Weights are random (``weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq

pytestmark = pytest.mark.slow

APPLICATIONS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10),
    "ResNet50": lambda: keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(input_shape=(64, 64, 3), weights=None, classes=10),
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None, classes=10),
}


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_quantize_fit_save_load(name, tmp_path):
    model = APPLICATIONS[name]()
    quantized = kq.quantize_model(model)
    quantized_layers = (kq.QuantizeWrapper, kq.QuantizeFoldedBatchNorm)
    kernels = [w for w in quantized.layers if isinstance(w, quantized_layers) and w.quantized_weights()]
    float_kernels = [l for l in model.layers if hasattr(l, "kernel") or hasattr(l, "depthwise_kernel")]
    assert len(kernels) == len(float_kernels), "every kernel layer is quantized"

    rng = np.random.default_rng(0)
    x = (rng.random((16,) + tuple(model.inputs[0].shape[1:])) * 255).astype("float32")
    y = np.arange(16) % 10
    quantized.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    history = quantized.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    ranges = [to_float(v) for w in kernels for v in w.quantized_weights()[0][2].values()]
    assert all(np.all(np.isfinite(r)) for r in ranges)

    predictions = quantized.predict(x[:4], verbose=0)
    path = tmp_path / f"{name}.keras"
    quantized.save(path)
    restored = keras.models.load_model(path)
    assert np.array_equal(restored.predict(x[:4], verbose=0), predictions)


def to_float(variable):
    return keras.ops.convert_to_numpy(variable)
