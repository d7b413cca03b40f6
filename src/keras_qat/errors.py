"""The exceptions keras-qat raises on purpose, so that callers (and the conformance table) can tell a
refusal from a failure.

Every refusal is a ``ValueError`` subclass, as Keras raises for bad arguments, with a message that
names each layer concerned, what is wrong and what to do.

One error is Keras's, not ours: loading a saved QAT model (``keras.models.load_model``) in a
process that has not imported ``keras_qat`` raises Keras's ``TypeError: Could not locate class
'QuantizeLayer'`` (or ``'QuantizeWrapper'``, ...), followed by the layer's whole config. Keras
finds classes only in its registry, and imports modules on its own only for the ``keras``,
``keras_hub``, ``keras_cv`` and ``keras_nlp`` packages, so no package can hook into that error.
What to look for in it: ``'registered_name': 'keras_qat>QuantizeLayer'`` and ``'module':
'keras_qat.layers'``, which name the package to import. The fix: ``import keras_qat`` before
``load_model`` (before or after ``import keras``; the classes are registered as soon as both are
imported), or load inside ``keras_qat.quantize_scope()``.
"""

from __future__ import annotations


class NotDeployableError(ValueError):
    """A model that a deployment target cannot compute exactly as the QAT model does.

    Raised up front (by ``quantize_model`` with a target, by ``diagnose(..., target=...)`` users, and
    by every exporter before it writes anything), listing every layer the target cannot take and why.

    Attributes:
        target: the target's name (``"tflite"``, ``"kqat"``, ``"onnx"``).
        reasons: ``{layer name: why}``, one entry per refused layer, in graph order; each
            ``why`` is a sentence that names the layer, what it cannot do and what to do.
    """

    def __init__(self, target: str, reasons: dict[str, str], hint: str = ""):
        self.target = target
        self.reasons = dict(reasons)
        lines = [f"{target}: {len(self.reasons)} layer(s) cannot be deployed exactly:"]
        lines += [f"  - {why}" for why in self.reasons.values()]
        if hint:
            lines.append(hint)
        self.hint = hint
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return type(self), (self.target, self.reasons, self.hint)


class UnsupportedLayerError(ValueError):
    """Layers that a scheme cannot quantize, all of them at once.

    Raised by ``quantize_apply`` / ``quantize_model`` before the model is rebuilt, naming every
    layer the scheme has no config for, and for each the ways out that work.

    Attributes:
        layers: ``{layer name: why}``, in graph order; each ``why`` names the layer and its type
            and says what to do.
    """

    def __init__(self, caller: str, scheme: str, layers: dict[str, str]):
        self.caller = caller
        self.scheme = scheme
        self.layers = dict(layers)
        count = f"{len(self.layers)} layer{'s are' if len(self.layers) != 1 else ' is'}"
        lines = [f"{caller}: {count} not supported by {scheme}:"]
        lines += [f"  - {why}" for why in self.layers.values()]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return type(self), (self.caller, self.scheme, self.layers)


class InexactInferenceWarning(UserWarning):
    """The QAT model's inference computes fake quantization, not the deployed integer kernels,
    because the backend lacks int64 or float64 (JAX without ``jax_enable_x64``): it can differ
    from the exported model by a quantization step in some outputs. Warned once per process."""


__all__ = ["NotDeployableError", "UnsupportedLayerError", "InexactInferenceWarning"]
