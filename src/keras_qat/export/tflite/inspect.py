"""What a converted TFLite model computes in float, and where it quantizes twice.

:func:`analyse_flatbuffer` reads a flatbuffer with the LiteRT interpreter and lists, each op
named with the Keras layer it comes from (:func:`layer_of_tensor`):

* ops left computing in float (a range the converter needed was not simulated, so it kept the
  op in float between a DEQUANTIZE and a QUANTIZE);
* requantizations: a QUANTIZE whose input is already an integer tensor, or a DEQUANTIZE that
  feeds a QUANTIZE, each rounding a second time where the QAT model rounded once (except
  after the int8 kernels whose output grid is fixed, whose requantization the QAT model
  computes too).

The interpreter is ``ai_edge_litert.interpreter.Interpreter``; ``tf.lite.Interpreter`` is deprecated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from keras_qat.export.targets import iter_layers

_QUANTIZE = "QUANTIZE"
_DEQUANTIZE = "DEQUANTIZE"


@dataclass(frozen=True)
class TFLiteOp:
    """One op of a TFLite model that a check reports.

    Attributes:
        op: the TFLite op type (``"CONV_2D"``, ``"QUANTIZE"``, ...).
        index: the op's position in the model's (first) subgraph.
        tensor: the name of the tensor it produces (the converter names tensors after the TF
            ops fused into them, so the name says where it came from).
        layer: the Keras layer of the QAT model that the tensor comes from, or None if its
            name matches no layer.
        detail: what is wrong with it, in words.
    """

    op: str
    index: int
    tensor: str
    layer: str | None
    detail: str

    def __str__(self) -> str:
        layer = f"layer '{self.layer}'" if self.layer else "no matching layer"
        return f"{self.op} #{self.index} ({layer}), tensor '{self.tensor}': {self.detail}"


@dataclass
class TFLiteCheck:
    """What :func:`to_tflite` wrote, and what in it differs from the QAT model's arithmetic.

    Attributes:
        path: where the flatbuffer was written.
        float_ops: ops that compute in float, apart from the QUANTIZE of a graph input and
            the DEQUANTIZE of a graph output.
        redundant_quantize_pairs: QUANTIZE ops that requantize an integer tensor, and
            DEQUANTIZE ops whose output is quantized again.
    """

    path: Path
    float_ops: list[TFLiteOp] = field(default_factory=list)
    redundant_quantize_pairs: list[TFLiteOp] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the model is integer-only and quantizes each tensor once."""
        return not self.float_ops and not self.redundant_quantize_pairs

    def __str__(self) -> str:
        verdict = "integer-only, each tensor quantized once" if self.ok else "issues found"
        lines = [f"TFLite model {self.path}: {verdict}"]
        for title, entries in (
            ("ops computing in float", self.float_ops),
            ("redundant (re)quantizations", self.redundant_quantize_pairs),
        ):
            lines.append(f"  {title}: {len(entries)}")
            lines.extend(f"    - {entry}" for entry in entries)
        return "\n".join(lines)


def _interpreter(**kwargs):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(**kwargs)


class _Graph:
    """The first subgraph of a TFLite model: ops, tensors, producers and consumers."""

    def __init__(self, interpreter):
        self.tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
        self.ops = [
            dict(op, inputs=[int(i) for i in op["inputs"] if i >= 0], outputs=[int(i) for i in op["outputs"]])
            for op in interpreter._get_ops_details()  # -1 marks an omitted optional input
        ]
        self.producer = {t: op for op in self.ops for t in op["outputs"]}
        self.consumers: dict[int, list[dict]] = {}
        for op in self.ops:
            for t in op["inputs"]:
                self.consumers.setdefault(t, []).append(op)
        self.graph_inputs = {int(d["index"]) for d in interpreter.get_input_details()}
        self.graph_outputs = {int(d["index"]) for d in interpreter.get_output_details()}

    def is_float(self, tensor: int) -> bool:
        return np.issubdtype(self.tensors[tensor]["dtype"], np.floating)

    def name(self, tensor: int) -> str:
        return self.tensors[tensor]["name"]

    def quantization(self, tensor: int) -> str:
        """``dtype scale s, zero point z`` of a per-tensor quantized tensor."""
        details = self.tensors[tensor]
        scale, zero_point = details["quantization"]
        return f"{np.dtype(details['dtype']).name} (scale {scale:.6g}, zero point {zero_point})"

    def consumer_names(self, tensor: int) -> str:
        names = [op["op_name"] for op in self.consumers.get(tensor, [])]
        return ", ".join(names) if names else "nothing"


def layer_names(model) -> list[str]:
    """The names of every layer of ``model`` and of its nested models."""
    return [layer.name for layer in iter_layers(model)]


def layer_of_tensor(tensor_name: str, names: Iterable[str]) -> str | None:
    """The Keras layer a TFLite tensor name comes from, or None.

    The converter names a tensor after the TF ops fused into it, ``;``-separated, each a
    path of name scopes (``functional_1/quant_conv1_1/conv1_1/convolution``) in which Keras
    adds ``_<n>`` to layer names. In the first fused name that mentions a layer, the
    innermost scope that is a layer name (exactly, or with that suffix) wins, and among
    names matching one scope the longest.
    """
    names = sorted(set(names), key=len, reverse=True)
    for fused in tensor_name.split(";"):
        for scope in reversed(fused.split("/")):
            for name in names:
                if scope == name or re.fullmatch(re.escape(name) + r"_\d+", scope):
                    return name
    return None


def _op_layer(graph: _Graph, op: dict, names: list[str]) -> str | None:
    """The layer of an op: that of its output; else of its constant inputs (its weights,
    which belong to its layer), else of its other inputs. A graph output is named
    ``Identity``, after no layer."""
    constants = [t for t in op["inputs"] if t not in graph.producer and t not in graph.graph_inputs]
    others = [t for t in op["inputs"] if t not in constants]
    for tensor in op["outputs"] + constants + others:
        layer = layer_of_tensor(graph.name(tensor), names)
        if layer is not None:
            return layer
    return None


def analyse_flatbuffer(content: bytes, names: Sequence[str]) -> tuple[list[TFLiteOp], list[TFLiteOp]]:
    """``(float ops, redundant quantizations)`` of a TFLite model, attributed to ``names``."""
    graph = _Graph(_interpreter(model_content=content))
    names = list(names)

    def entry(op, detail):
        tensor = op["outputs"][0] if op["outputs"] else op["inputs"][0]
        return TFLiteOp(op["op_name"], int(op["index"]), graph.name(tensor), _op_layer(graph, op, names), detail)

    redundant, paired = _redundant_quantizations(graph, entry, names)
    float_ops = [
        entry(op, _float_detail(graph, op))
        for op in graph.ops
        if op["index"] not in paired and _computes_in_float(graph, op)
    ]
    return float_ops, redundant


def _redundant_quantizations(graph: _Graph, entry, names: list[str]) -> tuple[list[TFLiteOp], set[int]]:
    """Requantizing QUANTIZE ops and DEQUANTIZE -> QUANTIZE pairs; also the indices of the
    ops they cover, which are not reported again as float ops."""
    found: list[TFLiteOp] = []
    covered: set[int] = set()
    for op in graph.ops:
        if op["op_name"] == _QUANTIZE and not graph.is_float(op["inputs"][0]) and not _from_fixed_grid(graph, op):
            source, target = op["inputs"][0], op["outputs"][0]
            found.append(entry(op, (
                f"requantizes {graph.quantization(source)} to {graph.quantization(target)}; "
                f"feeds {graph.consumer_names(target)}"
            )))
            covered.add(op["index"])
        elif op["op_name"] == _DEQUANTIZE:
            output = op["outputs"][0]
            quantizes = [c for c in graph.consumers.get(output, []) if c["op_name"] == _QUANTIZE]
            if not quantizes:
                continue
            targets = " and ".join(
                f"QUANTIZE (layer '{_op_layer(graph, q, names)}') to {graph.quantization(q['outputs'][0])}"
                for q in quantizes
            )
            found.append(entry(op, (
                f"dequantizes {graph.quantization(op['inputs'][0])} to float, then {targets} quantizes it again"
            )))
            covered.add(op["index"])
            covered.update(q["index"] for q in quantizes)
    return found, covered


#: Int8 kernels whose output grid is fixed (scale 1/256 or 1/128): a QUANTIZE after one moves it
#: to the grid of an activation trained below 8 bits, which the QAT model computes too
#: (:func:`keras_qat.emulation.fixed_range_inference`).
_FIXED_GRID_OPS = ("SOFTMAX", "LOGISTIC", "TANH")


def _from_fixed_grid(graph: _Graph, op: dict) -> bool:
    producer = graph.producer.get(op["inputs"][0])
    return producer is not None and producer["op_name"] in _FIXED_GRID_OPS


def _computes_in_float(graph: _Graph, op: dict) -> bool:
    """Whether an op reads or writes a float tensor, boundary conversions apart."""
    if not any(graph.is_float(t) for t in op["inputs"] + op["outputs"]):
        return False
    if op["op_name"] == _QUANTIZE and op["inputs"][0] in graph.graph_inputs:
        return False
    if op["op_name"] == _DEQUANTIZE and op["outputs"][0] in graph.graph_outputs:
        return False
    return True


def _float_detail(graph: _Graph, op: dict) -> str:
    def dtypes(tensors):
        return ", ".join(np.dtype(graph.tensors[t]["dtype"]).name for t in tensors) or "none"

    return f"computes in float (inputs {dtypes(op['inputs'])}; outputs {dtypes(op['outputs'])})"


__all__ = ["TFLiteOp", "TFLiteCheck", "analyse_flatbuffer", "layer_of_tensor", "layer_names"]
