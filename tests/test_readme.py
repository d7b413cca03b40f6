"""The README's Python examples (the quickstart, QAT on several devices), run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    """The Python block between the README's ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    text = README.read_text()
    block = re.search(rf"<!-- {name}:start -->\s*```python\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert block, f"the README lost its {name} markers"
    return block.group(1)


def run_as_written(name: str, directory: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", example(name)], cwd=directory, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the quickstart exports to LiteRT")
def test_the_quickstart_runs_as_written_and_deploys_exactly(tmp_path):
    result = run_as_written("quickstart", tmp_path)
    assert "100.0000% of outputs identical, max 0 step(s) apart" in result.stdout
    accuracy = float(result.stdout.strip().splitlines()[-1])
    assert accuracy > 0.8, result.stdout
    assert (tmp_path / "digits_w4a8.tflite").is_file() and (tmp_path / "digits_w4a8.kqat").is_file()


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the example runs on tf.distribute")
def test_the_distributed_example_runs_as_written_and_exports_exactly(tmp_path):
    """On this host's CPU MirroredStrategy has one replica; tests/test_distributed.py runs two."""
    result = run_as_written("distributed", tmp_path)
    assert "100.0000% of outputs identical, max 0 step(s) apart" in result.stdout, result.stdout
    assert (tmp_path / "digits_w4a8.onnx").is_file()
