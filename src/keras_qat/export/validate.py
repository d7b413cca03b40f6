"""Checks every export runs before it writes anything: no NaN or Inf in a weight or a range.

A diverged training run leaves NaN in a weight or a range variable; quantizing it gives
garbage integers without an error anywhere. Every exporter calls :func:`require_finite` first,
which names each layer and variable concerned, so nothing is written.
"""

from __future__ import annotations

from typing import Iterator

import keras
import numpy as np

from keras_qat.errors import NotDeployableError


def _layers(model) -> Iterator:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def non_finite_variables(model) -> dict[str, str]:
    """``{layer name: why}`` for every layer with a weight or range variable holding NaN or Inf."""
    found: dict[str, str] = {}
    for layer in _layers(model):
        if isinstance(layer, keras.Model):
            continue
        bad = [v.name for v in layer.weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]
        if bad:
            kinds = ["range" if name.endswith(("_min", "_max")) else "weight" for name in bad]
            listed = ", ".join(f"{kind} '{name}'" for kind, name in zip(kinds, bad))
            found[layer.name] = (
                f"layer '{layer.name}': {listed} holds NaN or Inf; it cannot be quantized. Retrain from a "
                "checkpoint before the divergence, or lower the learning rate."
            )
    return found


def require_finite(model, target: str) -> None:
    """Raise :class:`~keras_qat.errors.NotDeployableError` if any weight or range is not finite."""
    found = non_finite_variables(model)
    if found:
        raise NotDeployableError(target, found)


__all__ = ["non_finite_variables", "require_finite"]
