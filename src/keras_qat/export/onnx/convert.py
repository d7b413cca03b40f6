"""``to_onnx``: a QAT model as an ONNX QDQ graph, written from its integer form.

Every tensor the QAT model quantizes is a ``QuantizeLinear`` onto its trained grid followed by
a ``DequantizeLinear``; weights are stored as integers (int4, int8 or int16) with their scales
and zero points, per axis for per-channel kernels. Between the pairs, standard ONNX ops compute
the integer arithmetic of the ``.kqat`` runtime and of LiteRT's reference kernels exactly
(:mod:`keras_qat.export.onnx.lowering`): ONNX Runtime computes what the QAT model computes,
with its graph optimizations off or on. Nothing is derived again: grids, codes, biases and
requantization parameters are the ones :func:`keras_qat.export.artifact.build` writes into a
``.kqat`` file.

Why not the plain ``DequantizeLinear -> Conv -> QuantizeLinear`` pattern: there ONNX computes
the convolution on real values in float32 and rounds once, half to even, where the QAT model
requantizes an integer accumulator in fixed point and rounds twice, half away from zero. Each
layer then differs in a few elements per thousand by a step, and later layers amplify those
steps (measured on the digits CNN at W8A8: 68% of outputs identical, up to 15 steps apart).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper

from keras_qat.errors import NotDeployableError
from keras_qat.export.onnx.graph import GraphBuilder, onnx_type
from keras_qat.export.onnx.lowering import LOWERINGS, LoweringRefusal, OpContext, grid_of
from keras_qat.export.onnx.symbolic import OnnxOps, Value
from keras_qat.export.validate import non_finite_variables, require_finite
from keras_qat.format.atomic import write_atomically

#: The deployment target's name in refusals.
TARGET = "onnx"

#: The opset :func:`to_onnx` writes unless told otherwise: the first with int4 and int16
#: QuantizeLinear/DequantizeLinear.
DEFAULT_OPSET = 21

#: The earliest opset it writes: per-axis QuantizeLinear/DequantizeLinear (int8 only).
MIN_OPSET = 13


def to_onnx(model: keras.Model, path: str | os.PathLike, opset: int | None = None) -> Path:
    """Write ``model`` (a QAT model from ``quantize_apply``) as an ONNX QDQ graph at ``path``.

    Tensors keep the Keras model's layout (channels last): inputs and outputs are float32 with
    the Keras shapes. Codes go in the narrowest signed ONNX type that holds their bit width:
    int4 up to 4 bits and int16 above 8 at ``opset >= 21``, int8 otherwise; a width with no type
    of its own (3, 5, 6, 7 bits, or a narrow range) is held in the next wider type, and a clip
    before its QuantizeLinear keeps the values on the trained grid. Checked with
    ``onnx.checker`` (with shape inference) and written atomically.

    Args:
        model: the QAT model.
        path: where to write the ``.onnx`` file.
        opset: the ``ai.onnx`` opset, :data:`MIN_OPSET` up to what the installed ``onnx``
            knows; :data:`DEFAULT_OPSET` when None.

    Returns:
        The path written.

    Raises:
        keras_qat.errors.NotDeployableError: listing every layer the integer form cannot hold
            (as ``save_artifact`` refuses them), every weight or range holding NaN or Inf, and
            every tensor wider than ``opset``'s types; nothing is written then.
        ValueError: an opset out of range, or not a functional QAT model.
    """
    opset = _checked_opset(opset)
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise ValueError(f"to_onnx: needs a functional QAT model, got {type(model).__name__}.")
    require_finite(model, TARGET)
    manifest, payload = _integer_form(model, opset)
    output_names = [_output_name(model, i) for i in range(len(manifest["outputs"]))]
    graph = build_graph(manifest, payload, opset, model.name, output_names)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="keras-qat",
        ir_version=_ir_version(opset),
    )
    helper.set_model_props(onnx_model, {"keras_qat.source_model": model.name})
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except Exception as error:  # the checker raises several types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise RuntimeError(
            f"to_onnx: the ONNX graph of model '{model.name}' fails onnx.checker ({first}). Please report it "
            "with the model; save_artifact (.kqat) exports it meanwhile."
        ) from None
    return write_atomically(Path(path), onnx_model.SerializeToString())


def build_graph(
    manifest: dict, payload: bytes, opset: int, name: str, output_names: list[str]
) -> onnx.GraphProto:
    """The ONNX graph of a ``.kqat`` manifest and payload (:func:`keras_qat.export.artifact.build`).

    Raises:
        keras_qat.errors.NotDeployableError: every op whose integers ONNX cannot hold exactly.
    """
    g = GraphBuilder(opset)
    tensors = manifest["tensors"]
    dequantized: dict[str, str] = {}
    codes: dict[str, Value] = {}
    graph_inputs = []
    for tensor_id in manifest["inputs"]:
        entry = tensors[tensor_id]
        input_name = g.name(entry.get("name", tensor_id))
        dequantized[tensor_id] = input_name
        graph_inputs.append(helper.make_tensor_value_info(input_name, TensorProto.FLOAT, _dims(entry["shape"])))

    def codes_of(tensor_id: str, xp: OnnxOps) -> Value:
        """The integer codes of a quantized tensor (float32, zero point included), read back
        from its dequantized values: exact, since they are codes times the scale."""
        if tensor_id not in codes:
            entry = tensors[tensor_id]
            steps = xp.round(xp.value(dequantized[tensor_id], "float32") / np.float32(entry["scale"]))
            codes[tensor_id] = steps + float(entry["zero_point"])
        return codes[tensor_id]

    reasons: dict[str, str] = {}
    for op in manifest["ops"]:
        out_id = op["outputs"][0]
        entry = tensors[out_id]
        context = OpContext(op, [tensors[t] for t in op["inputs"]], entry, payload, opset)
        xp = OnnxOps(g, op["layer"])
        if op["op"] == "quantize":
            shape = tuple(tensors[op["inputs"][0]]["shape"])
            out_codes = grid_of(entry).quantize(xp.value(dequantized[op["inputs"][0]], "float32", shape), xp)
        else:
            try:
                out_codes = LOWERINGS[op["op"]](g, context, xp, [codes_of(t, xp) for t in op["inputs"]])
            except LoweringRefusal as refusal:
                reasons[op["layer"]] = f"layer '{op['layer']}' ({op['op']}): {refusal}."
                out_codes = xp.value(dequantized[op["inputs"][0]], "float32")  # a stand-in; the next ops are checked too
        real = (xp.cast(out_codes, "float32") - float(entry["zero_point"])) * np.float32(entry["scale"])
        dequantized[out_id] = _quantize_dequantize(g, real.name, entry, opset, op["layer"])
    if reasons:
        raise NotDeployableError(TARGET, reasons)
    graph_outputs = []
    for tensor_id, output_name in zip(manifest["outputs"], output_names):
        final = g.name(output_name)
        g.nodes.append(helper.make_node("Identity", [dequantized[tensor_id]], [final], name=g.name(f"{final}/Identity")))
        graph_outputs.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, _dims(tensors[tensor_id]["shape"])))
    return helper.make_graph(g.nodes, name, graph_inputs, graph_outputs, initializer=g.initializers)


def _quantize_dequantize(g: GraphBuilder, real: str, grid: dict, opset: int, hint: str) -> str:
    """Real values on ``grid`` through its QuantizeLinear (which the integer codes come out of
    unchanged) and back to float (DequantizeLinear): the QDQ pair of a quantized tensor."""
    type_ = onnx_type(grid["bits"], opset)
    scale, zero_point = g.grid_constants(f"{hint}/output", np.float32(grid["scale"]), grid["zero_point"], type_)
    codes = g.quantize(real, scale, zero_point, f"{hint}/q")
    return g.dequantize(codes, scale, zero_point, f"{hint}/dq")


def _integer_form(model: keras.Model, opset: int) -> tuple[dict, bytes]:
    """The artifact's manifest and payload, or one refusal listing every layer the integer form
    cannot hold and every tensor wider than ``opset``'s integer types."""
    from keras_qat.export import artifact

    try:
        manifest, payload = artifact.build(model)
    except NotDeployableError as refusal:
        raise NotDeployableError(TARGET, refusal.reasons) from None
    too_wide = _too_wide(manifest, opset)
    if too_wide:
        raise NotDeployableError(TARGET, too_wide)
    return manifest, payload


def refusals(model: keras.Model, opset: int | None = None) -> dict[str, str]:
    """``{layer name: why}`` for every layer :func:`to_onnx` would refuse at ``opset`` (empty when
    it would write the file). Reads the model; writes nothing."""
    reasons = non_finite_variables(model)
    opset = _checked_opset(opset)
    try:
        manifest, payload = _integer_form(model, opset)
        build_graph(manifest, payload, opset, model.name, [f"output_{i}" for i in range(len(manifest["outputs"]))])
    except NotDeployableError as error:
        for name, why in error.reasons.items():
            reasons.setdefault(name, why)
    return reasons


def _too_wide(manifest: dict, opset: int) -> dict[str, str]:
    """``{layer: why}`` for every op whose output or kernel has no ONNX type at ``opset``."""
    reasons: dict[str, str] = {}
    for op in manifest["ops"]:
        widths = [manifest["tensors"][t]["bits"] for t in op["outputs"]]
        widths += [w["bits"] for name, w in op["weights"].items() if name == "kernel"]
        wide = [bits for bits in widths if onnx_type(bits, opset) is None]
        if wide:
            reasons[op["layer"]] = (
                f"layer '{op['layer']}' holds {max(wide)}-bit integers, which ONNX opset {opset} has no type for "
                f"(int16 needs opset {DEFAULT_OPSET} or later); export with to_onnx(..., opset={DEFAULT_OPSET})."
            )
    return reasons


def _checked_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"to_onnx: opset must be an integer from {MIN_OPSET} (per-axis QuantizeLinear) to {newest} (the "
            f"installed onnx {onnx.__version__}), got {opset!r}; the default, {DEFAULT_OPSET}, holds int4 and int16."
        )
    return int(opset)


def _ir_version(opset: int) -> int:
    """The IR version that ``onnx`` released with ``opset``: the oldest that can hold it, which
    older runtimes accept."""
    for _, ir_version, ai_onnx, *_ in helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir_version
    return onnx.IR_VERSION


def _dims(shape: list) -> list:
    """A tensor's declared shape: the batch named ``N`` (one batch in, one out), every other
    unknown size left unnamed (a name would claim it equal to another tensor's)."""
    return ["N" if i == 0 else d for i, d in enumerate(shape)]


def _output_name(model: keras.Model, index: int) -> str:
    names = list(getattr(model, "output_names", None) or [])
    return names[index] if index < len(names) else f"output_{index}"


__all__ = ["to_onnx", "refusals", "build_graph", "TARGET", "DEFAULT_OPSET", "MIN_OPSET"]
