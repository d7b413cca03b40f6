"""What a model input takes, and the check of a batch against it, before anything runs.

The integer runtime (:meth:`keras_qat.runtime.IntegerModel.run`) and ``compare``
(:func:`keras_qat.export.compare`) check their inputs here, so that an integer array taken for
real values, a NaN, or a missing batch or channel axis is refused with a message that names the
input and says what it takes (shape, dtype, range), instead of computing on it silently or
failing deep inside an op. NumPy only: the runtime imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: the input's name (the Keras input's).
        shape: one example's shape (no batch axis); None where any size is taken.
        value_range: ``(low, high)``: the real values the input's quantizer covers (values
            outside it are clipped), or None where unknown.
    """

    name: str
    shape: tuple[int | None, ...]
    value_range: tuple[float, float] | None = None

    def batch_shape(self) -> str:
        """``(batch, 8, 8, 1)``."""
        return "(" + ", ".join(["batch"] + ["?" if d is None else str(d) for d in self.shape]) + ")"

    def takes_floats(self) -> str:
        """What the input takes as real values, in words."""
        text = f"float values of shape {self.batch_shape()}"
        if self.value_range is not None:
            low, high = self.value_range
            text += f", on the range [{low:.4g}, {high:.4g}] that its quantizer covers (values outside are clipped)"
        return text

    def takes_codes(self, qmin: int, qmax: int) -> str:
        """What the input takes as integer codes, in words."""
        return f"integer codes in [{qmin}, {qmax}] of shape {self.batch_shape()}"


def _fits(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _shape_hint(shape: tuple, spec: InputSpec) -> str:
    """Why a shape does not fit, where it is a common slip: a missing batch or channel axis."""
    if _fits(shape, spec.shape):
        return " The batch axis is missing: for one example, pass x[None]."
    if spec.shape and spec.shape[-1] == 1 and _fits(shape[1:] + (1,), spec.shape):
        return " The channel axis is missing: pass x[..., None]."
    return ""


def _refuse(caller: str, spec: InputSpec, model: str, takes: str, problem: str) -> ValueError:
    return ValueError(f"{caller}: input '{spec.name}' of model '{model}' takes {takes}; got {problem}")


def check_shape(array: np.ndarray, spec: InputSpec, caller: str, model: str, takes: str) -> None:
    """Refuse ``array`` unless it is a batch of ``spec``'s shape."""
    shape = tuple(array.shape)
    if not _fits(shape[1:], spec.shape) or not shape:
        raise _refuse(caller, spec, model, takes, f"shape {shape}.{_shape_hint(shape, spec)}")


def check_floats(x, spec: InputSpec, caller: str, model: str, codes_hint: str = "") -> np.ndarray:
    """``x`` as a float array, after checking that it is a batch of finite real values of
    ``spec``'s shape; else a ValueError that names the input and says what it takes.

    Args:
        codes_hint: how the caller takes integer codes instead, said when ``x`` is integer.
    """
    array = np.asarray(x)
    takes = spec.takes_floats()
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise _refuse(
            caller,
            spec,
            model,
            takes,
            f"{array.dtype} values, which are not taken as real values. Convert them as the model's "
            "training data was (e.g. x.astype('float32') / 255 for pixels trained on [0, 1], or "
            f"x.astype('float32') if it was trained on these values){codes_hint}.",
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise _refuse(caller, spec, model, takes, f"{array.dtype} values.")
    check_shape(array, spec, caller, model, takes)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise _refuse(caller, spec, model, takes, f"{bad} NaN or infinite value(s); the model computes on finite values only.")
    return array


def check_codes(x, spec: InputSpec, qmin: int, qmax: int, caller: str, model: str) -> np.ndarray:
    """``x`` as an int64 array, after checking that it is a batch of integer codes in
    ``[qmin, qmax]`` of ``spec``'s shape."""
    array = np.asarray(x)
    takes = spec.takes_codes(qmin, qmax)
    if not np.issubdtype(array.dtype, np.integer):
        raise _refuse(caller, spec, model, takes, f"{array.dtype} values; pass real values without integer_io=True.")
    check_shape(array, spec, caller, model, takes)
    if array.size and (array.min() < qmin or array.max() > qmax):
        raise _refuse(caller, spec, model, takes, f"codes from {array.min()} to {array.max()}.")
    return array.astype(np.int64)


__all__ = ["InputSpec", "check_floats", "check_codes", "check_shape"]
