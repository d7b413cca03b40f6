"""keras.applications after one epoch of QAT on random data, exported to LiteRT int8.

The oracle is the LiteRT interpreter: the exported model has no float op between its
boundaries, no redundant quantize pair, and computes what the QAT model computes in
inference, in output quantization steps (the interpreter's reference kernels, whose
arithmetic the QAT model's inference reproduces; see ``keras_qat.emulation``).
"""

from __future__ import annotations

import pytest

from keras_qat.export import compare, to_tflite

pytestmark = pytest.mark.slow

CASES = ["MobileNetV2", "ResNet50", "MobileNetV3Small"]


@pytest.mark.parametrize("trained_application", CASES, indirect=True)
def test_litert_int8_model_agrees_with_the_qat_model(trained_application, tmp_path, record_agreement):
    name, quantized, held_out = trained_application.name, trained_application.quantized, trained_application.held_out
    check = to_tflite(quantized, tmp_path / f"{name}.tflite")
    assert check.float_ops == [], str(check)
    assert check.redundant_quantize_pairs == [], str(check)

    report = compare(quantized, check.path, held_out)
    if record_agreement.enabled:  # the optimized kernels round some ties differently: recorded, not asserted
        record_agreement(
            f"tflite_{name}",
            {
                kernels: {
                    "identical_fraction": r.identical_fraction,
                    "max_step_difference": r.max_step_difference,
                    "argmax_agreement": r.argmax_agreement,
                }
                for kernels, r in [
                    ("reference", report),
                    ("builtin", compare(quantized, check.path, held_out, kernels="builtin")),
                    ("default", compare(quantized, check.path, held_out, kernels="default")),
                ]
            },
        )
    assert report.identical_fraction == 1.0, str(report)
    assert report.max_step_difference == 0, str(report)
