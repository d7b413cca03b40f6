"""Data files for the command line (keras_qat.cli.data)."""

from __future__ import annotations

import numpy as np
import pytest

from keras_qat.cli.data import accuracy, load
from keras_qat.cli.errors import UsageError


def test_validation_falls_back_to_training_data(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2)), y_train=np.arange(4))
    dataset = load(tmp_path / "d.npz", need_training=True)
    x, y = dataset.evaluation()
    assert x.shape == (4, 2) and y.tolist() == [0, 1, 2, 3]


def test_mismatched_lengths_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2)), y_train=np.arange(3))
    with pytest.raises(UsageError, match="x_train has 4 rows but y_train has 3"):
        load(tmp_path / "d.npz")


def test_a_file_that_is_not_an_npz_is_refused(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(UsageError, match="not a NumPy .npz"):
        load(tmp_path / "d.npz")


def test_accuracy_takes_integer_or_one_hot_labels():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(scores, np.eye(2)[[1, 0, 0]]) == pytest.approx(2 / 3)
    assert accuracy(scores, None) is None
