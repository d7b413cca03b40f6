"""``keras-qat demo`` (keras_qat.cli.demo) and its report folder (keras_qat.cli.report)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_qat.cli import demo

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the demo exports to LiteRT")


def _run(folder, seed):
    settings = demo.DemoSettings(out=folder, schemes=("w4a8",), seed=seed, float_epochs=2, qat_epochs=1)
    stages = []
    report = demo.run(settings, lambda message, done: stages.append((message, done)))
    return report, stages


@pytest.mark.slow
def test_the_demo_measures_every_deployed_form_and_writes_its_report(tmp_path):
    report, stages = _run(tmp_path / "seed0", seed=0)
    (result,) = report.schemes
    assert [d.format for d in result.deployed] == ["kqat", "tflite", "onnx"]
    for deployed in result.deployed:
        # Oracles: the integer runtime, LiteRT's reference kernels and ONNX Runtime, on the held-out digits.
        assert deployed.identical_fraction == 1.0 and deployed.max_step_difference == 0, deployed
        assert deployed.accuracy == result.qat_accuracy
        assert deployed.size_bytes == (tmp_path / "seed0" / "models" / f"w4a8.{deployed.format}").stat().st_size
    assert stages[-1][1] == 1.0 and all(b[1] >= a[1] for a, b in zip(stages, stages[1:]))
    written = {path.name for path in (tmp_path / "seed0").iterdir()}
    assert {"results.json", "results.md", "index.html", "accuracy_vs_bits.png", "weight_ranges_w4a8.png", "weight_error_w4a8.png"} <= written
    saved = json.loads((tmp_path / "seed0" / "results.json").read_text())
    assert saved["schemes"][0]["qat_accuracy"] == result.qat_accuracy and saved["float_accuracy"] == report.float_accuracy
    index = (tmp_path / "seed0" / "index.html").read_text()
    assert "accuracy_vs_bits.png" in index and "W4A8" in index
    # Rounding errors of weights inside their range are at most half a step; the rest are
    # clipped (a learned range clips on purpose).
    for name, errors in result.weight_errors.items():
        clipped = result.weight_clipped[name]
        assert abs(errors[~clipped]).max() <= 0.5 + 1e-3, name
        assert np.all(abs(errors[clipped]) >= 0.5 - 1e-3), name

    other, _ = _run(tmp_path / "seed1", seed=1)
    assert (other.float_accuracy, other.schemes[0].qat_accuracy) != (report.float_accuracy, result.qat_accuracy)


def test_a_demo_with_an_unknown_scheme_fails_before_training(tmp_path):
    from keras_qat.cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown scheme 'w4'"):
        demo.run(demo.DemoSettings(out=tmp_path, schemes=("w4",)))
    assert not (tmp_path / "models").exists()
