"""quantize_model on keras.applications architectures: train a step, save, load, same bits.

Weights are random (``weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from tests.end_to_end.conftest import APPLICATIONS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("trained_application", list(APPLICATIONS), indirect=True)
def test_quantize_fit_save_load(trained_application, tmp_path):
    app = trained_application
    model, quantized, x = app.float_model, app.quantized, app.x
    quantized_layers = (kq.QuantizeWrapper, kq.QuantizeFoldedBatchNorm)
    kernels = [w for w in quantized.layers if isinstance(w, quantized_layers) and w.quantized_weights()]
    float_kernels = [l for l in model.layers if hasattr(l, "kernel") or hasattr(l, "depthwise_kernel")]
    assert len(kernels) == len(float_kernels), "every kernel layer is quantized"

    assert np.isfinite(app.history.history["loss"][0])
    ranges = [to_float(v) for w in kernels for v in w.quantized_weights()[0][2].values()]
    assert all(np.all(np.isfinite(r)) for r in ranges)

    predictions = to_float(quantized(x[:4], training=False))
    path = tmp_path / f"{app.name}.keras"
    quantized.save(path)
    restored = keras.models.load_model(path)
    assert np.array_equal(to_float(restored(x[:4], training=False)), predictions)


def to_float(variable):
    return keras.ops.convert_to_numpy(variable)
