"""The integer-only runtime: runs a ``.kqat`` artifact (:func:`keras_qat.export.save_artifact`).

Between the input quantization and the output dequantization everything is integer
arithmetic (:mod:`keras_qat.runtime.kernels`), as on a microcontroller or an accelerator:
the reference that shows what the integer model computes, at any bit width.

    model = keras_qat.runtime.load("model.kqat")
    probabilities = model.run(images)            # float in, float out
    codes = model.run(input_codes, integer_io=True)   # signed integer codes in and out
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from keras_qat.format import container, packing
from keras_qat.format.manifest import OPS
from keras_qat.grid import IntegerGrid
from keras_qat.inputs import InputSpec, check_codes, check_floats
from keras_qat.integer import AddOp, KernelOp, MeanOp, Requantize
from keras_qat.runtime import kernels as K


class UnsupportedOpError(ValueError):
    """An artifact op that this runtime does not implement."""


class IntegerModel:
    """A loaded artifact. Use :func:`load`.

    Attributes:
        manifest: the artifact's manifest (see :mod:`keras_qat.export.artifact`).
        input_grids, output_grids: the integer grids of the model's inputs (after their
            quantization) and outputs, for the integer mode of :meth:`run`.
    """

    def __init__(self, manifest: dict[str, Any], payload: bytes, source: str = "artifact"):
        self.manifest = manifest
        self._source = source
        self._grids = {name: IntegerGrid.from_manifest(t) for name, t in manifest["tensors"].items() if not t.get("float")}
        self._steps: list[tuple[dict, Callable]] = []
        for op in manifest["ops"]:
            if op.get("op") not in OPS:
                raise UnsupportedOpError(
                    f"{source}: layer '{op.get('layer')}' needs op '{op.get('op')}', which this runtime "
                    f"does not implement (it runs: {', '.join(OPS)}). Upgrade keras-qat, or export "
                    "the model without that layer."
                )
            self._steps.append((op, self._prepare(op, payload)))
        self._quantized_inputs = {op["inputs"][0]: op["outputs"][0] for op in manifest["ops"] if op["op"] == "quantize"}
        self.input_grids = [self._grids[self._quantized_inputs[name]] for name in manifest["inputs"]]
        self.output_grids = [self._grids[name] for name in manifest["outputs"]]
        self.input_specs = [self._input_spec(name, grid) for name, grid in zip(manifest["inputs"], self.input_grids)]

    def _input_spec(self, name: str, grid: IntegerGrid) -> InputSpec:
        """What input ``name`` takes: its Keras name (the tensor id in artifacts written without
        it), one example's shape, and the real range its quantization covers."""
        tensor = self.manifest["tensors"][name]
        low, high = ((q - grid.zero_point) * grid.scale for q in (grid.qmin, grid.qmax))
        value_range = (float(np.min(low)), float(np.max(high)))
        return InputSpec(tensor.get("name", name), tuple(tensor["shape"][1:]), value_range)

    # ---- preparing each op once -------------------------------------------------------------

    def _weight(self, op: dict, name: str, payload: bytes) -> np.ndarray:
        return packing.read_weight(op["weights"][name], payload)

    def _prepare(self, op: dict, payload: bytes) -> Callable:
        kind, attributes = op["op"], op["attributes"]
        grids = [self._grids.get(name) for name in op["inputs"]]
        out = self._grids[op["outputs"][0]]
        if kind == "quantize":
            return lambda x: K.quantize(x, out)
        if kind in ("conv", "depthwise_conv", "dense"):
            return self._prepare_kernel(op, payload, grids[0], out)
        if kind == "add":
            if "integer" in op:
                add = AddOp.from_manifest(op["integer"], out)
            else:  # written before the artifact carried its lowered ops
                add = AddOp.lower(grids[0], grids[1], out, attributes["activation"])
            zero_a, zero_b = grids[0].zero_point, grids[1].zero_point
            return lambda a, b: K.add(a, b, zero_a, zero_b, add)
        if kind == "mean":
            if "integer" in op:
                mean = MeanOp(Requantize.from_manifest(op["integer"]["requantize"], out))
            else:
                mean = MeanOp.lower(grids[0], out, attributes.get("activation", "linear"))
            return lambda x: K.mean(x, grids[0].zero_point, attributes["keepdims"], mean)
        if kind == "concatenate":
            axis = attributes["axis"]
            return lambda *xs: np.concatenate([K.requantize_codes(x, g, out) for x, g in zip(xs, grids)], axis=axis)
        if kind == "max_pool":
            return lambda x: K.requantize_codes(
                K.max_pool(x, attributes["pool_size"], attributes["strides"], attributes["padding"]), grids[0], out
            )
        if kind == "average_pool":
            return lambda x: K.requantize_codes(
                K.average_pool(x, attributes["pool_size"], attributes["strides"], attributes["padding"]), grids[0], out
            )
        if kind == "pad":
            padding = [(0, 0)] + [tuple(p) for p in attributes["padding"]] + [(0, 0)]
            return lambda x: K.requantize_codes(np.pad(x, padding, constant_values=grids[0].zero_point), grids[0], out)
        if kind == "reshape":
            shape = tuple(attributes["shape"])
            return lambda x: K.requantize_codes(x.reshape((x.shape[0],) + shape), grids[0], out)
        if kind == "identity":
            return lambda x: K.requantize_codes(x, grids[0], out)
        if kind == "lookup":
            table = self._weight(op, "table", payload)
            return lambda x: K.lookup(x, table, grids[0].qmin)
        if kind == "softmax":
            table = self._weight(op, "exp_table", payload)
            try:
                output = K.SoftmaxOutput.of(out)
            except ValueError as error:
                raise UnsupportedOpError(f"{self._source}: layer '{op['layer']}': {error}") from None
            return lambda x: K.softmax(x, table, output)
        raise UnsupportedOpError(f"{self._source}: layer '{op['layer']}': op '{kind}' is not implemented.")

    def _prepare_kernel(self, op: dict, payload: bytes, grid: IntegerGrid, out: IntegerGrid) -> Callable:
        attributes = op["attributes"]
        kernel = self._weight(op, "kernel", payload)
        bias = self._weight(op, "bias", payload) if "bias" in op["weights"] else None
        if "integer" in op:
            requantize = Requantize.from_manifest(op["integer"]["requantize"], out)
        else:  # written before the artifact carried its lowered ops
            weights = op["weights"]["kernel"]
            weight_grid = IntegerGrid(np.asarray(weights["scale"], np.float32), 0, 0, 0, weights["bits"], signed=True)
            single_rounding = attributes.get("single_rounding", op["op"] == "dense")
            requantize = KernelOp.lower(grid, weight_grid, out, None, attributes["activation"], single_rounding).requantize
        kernel_op = KernelOp(bias, requantize)
        if op["op"] == "dense":
            return lambda x: K.dense(x, grid.zero_point, kernel, kernel_op)
        rank = attributes["rank"]
        if rank not in (1, 2):
            raise UnsupportedOpError(f"{self._source}: layer '{op['layer']}': {rank}-D convolutions are not implemented.")
        function = K.depthwise_conv if op["op"] == "depthwise_conv" else K.conv
        strides, dilation, padding = attributes["strides"], attributes["dilation_rate"], attributes["padding"]
        return lambda x: function(x, grid.zero_point, kernel, strides, dilation, padding, kernel_op)

    # ---- running ----------------------------------------------------------------------------

    def run(self, x, integer_io: bool = False):
        """Run the model on a batch.

        Args:
            x: one array, or a list in the model's input order: a batch of float values (the
                real values the model was trained on, not integer pixels), of each input's
                shape with the batch axis first (:attr:`input_specs`); with ``integer_io``, the
                signed integer codes on :attr:`input_grids`.
            integer_io: take and return integer codes instead of float values.

        Raises:
            ValueError: an input that is not what the model takes (integer values taken for real
                ones, NaN or infinite values, a missing batch or channel axis, another shape),
                naming the input and saying what it takes.

        Returns:
            One array (or a list for several outputs): float32 values, or int64 codes on
            :attr:`output_grids` with ``integer_io``.
        """
        inputs = list(x) if isinstance(x, (list, tuple)) else [x]
        names = self.manifest["inputs"]
        if len(inputs) != len(names):
            raise ValueError(f"run: the model has {len(names)} inputs, got {len(inputs)}.")
        values: dict[str, np.ndarray] = {}
        model = self.manifest.get("model", self._source)
        for name, array, spec, grid in zip(names, inputs, self.input_specs, self.input_grids):
            if integer_io:
                codes = check_codes(array, spec, int(grid.qmin), int(grid.qmax), "run(integer_io=True)", model)
                values[self._quantized_inputs[name]] = codes
            else:
                hint = "; to pass the input's quantized codes instead, use run(codes, integer_io=True)"
                values[name] = check_floats(array, spec, "run", model, codes_hint=hint).astype(np.float32)
        for op, step in self._steps:
            if integer_io and op["op"] == "quantize":
                continue
            try:
                values[op["outputs"][0]] = step(*[values[name] for name in op["inputs"]])
            except (ValueError, IndexError, TypeError) as error:
                raise ValueError(f"run: layer '{op['layer']}' (op '{op['op']}') failed on its input: {error}") from error
        outputs = []
        for name, grid in zip(self.manifest["outputs"], self.output_grids):
            outputs.append(values[name] if integer_io else K.dequantize(values[name], grid))
        return outputs[0] if len(outputs) == 1 else outputs


def load(path: str | os.PathLike) -> IntegerModel:
    """Read and check the ``.kqat`` file at ``path`` (magic, version, lengths, checksum) and
    prepare every op.

    Raises:
        keras_qat.format.ArtifactError: truncated, corrupted or of an unknown version.
        UnsupportedOpError: an op this runtime lacks (naming the layer and the op).
    """
    manifest, payload = container.read(path)
    return IntegerModel(manifest, payload, source=str(path))


__all__ = ["load", "IntegerModel", "UnsupportedOpError"]
