"""The exceptions keras-qat raises on purpose, so that callers (and the conformance table) can tell a
refusal from a failure.

Every refusal is a ``ValueError`` subclass, as Keras raises for bad arguments, with a message that
names each layer concerned, what is wrong and what to do.
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


__all__ = ["NotDeployableError"]
