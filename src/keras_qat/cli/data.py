"""Data for the command line: an ``.npz`` file with ``x_train``/``y_train`` and optionally
``x_val``/``y_val`` (``quantize``), or any of those (``export``, ``run``, ``compare``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_qat.cli.errors import UsageError


@dataclass(frozen=True)
class Dataset:
    """The arrays of an ``.npz``; ``x_val``/``y_val`` fall back to the training arrays where the
    file has no validation split, and labels are None where it has none."""

    path: Path
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None

    def evaluation(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The inputs (and labels, if any) to evaluate on: the validation split, else the training one."""
        if self.x_val is not None:
            return self.x_val, self.y_val
        return self.x_train, self.y_train


def load(path: str | Path, need_training: bool = False) -> Dataset:
    """Read ``path``.

    Raises:
        UsageError: the file is missing or not an .npz, has none of the expected arrays, or
            lacks ``x_train``/``y_train`` when ``need_training``; or x and y lengths differ.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise UsageError(f"data file {path} is not a NumPy .npz archive ({error}).") from None
    expected = ("x_train", "y_train", "x_val", "y_val")
    if need_training and not {"x_train", "y_train"} <= set(arrays):
        raise UsageError(
            f"data file {path} must hold arrays x_train and y_train (and optionally x_val, y_val) "
            f"to train on; it holds {sorted(arrays)}."
        )
    if not {"x_train", "x_val"} & set(arrays):
        raise UsageError(f"data file {path} holds {sorted(arrays)}; expected arrays named {', '.join(expected)}.")
    for x_name, y_name in (("x_train", "y_train"), ("x_val", "y_val")):
        if x_name in arrays and y_name in arrays and len(arrays[x_name]) != len(arrays[y_name]):
            raise UsageError(f"data file {path}: {x_name} has {len(arrays[x_name])} rows but {y_name} has {len(arrays[y_name])}.")
    for name in ("x_train", "x_val"):
        if name in arrays and not np.issubdtype(arrays[name].dtype, np.number):
            raise UsageError(f"data file {path}: {name} must be numeric, got dtype {arrays[name].dtype}.")
    return Dataset(path, *(arrays.get(name) for name in expected))


def accuracy(outputs: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy of class scores ``outputs`` against integer (or one-hot) ``labels``."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.shape[-1] > 1:
        labels = labels.argmax(axis=-1)
    return float(np.mean(np.asarray(outputs).reshape(len(labels), -1).argmax(axis=-1) == labels.reshape(-1)))


__all__ = ["Dataset", "load", "accuracy"]
