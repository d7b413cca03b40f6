"""The README's Python quickstart, run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart:start -->\s*```python\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    assert block, "the README lost its quickstart markers"
    return block.group(1)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the quickstart exports to LiteRT")
def test_the_quickstart_runs_as_written_and_deploys_exactly(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", quickstart()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "100.0000% of outputs identical, max 0 step(s) apart" in result.stdout
    accuracy = float(result.stdout.strip().splitlines()[-1])
    assert accuracy > 0.8, result.stdout
    assert (tmp_path / "digits_w4a8.tflite").is_file() and (tmp_path / "digits_w4a8.kqat").is_file()
