#!/usr/bin/env python
"""The conformance table: every supported layer x configuration x target -> verdict.

Why
---
keras-qat promises that what the QAT model computes in inference is what deploys: each layer
the README supports either exports and matches the QAT model exactly, or is refused up front
with a ``keras_qat.errors.NotDeployableError`` that names it. This script checks the promise
cell by cell, so that the table (and the list of its crashes) drives the fixes.

What it builds
--------------
Rows are the layer kinds of the README's supported list, each in a tiny functional model
(TensorFlow backend, built after ``keras.utils.set_random_seed(0)``):

* layers with kernels (Dense, Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D,
  Conv1D/2D/3DTranspose): ``Input -> LAYER`` or, in the "+BN+ReLU" configurations,
  ``Input -> LAYER -> BatchNormalization -> ReLU`` (how they are used, and what folding and
  activation fusion rewrite);
* every other layer: ``Input -> Conv(4, 3, "same") -> LAYER`` with the convolution of the
  layer's rank, so that the layer reads a tensor on a quantized grid that a kernel layer
  wrote (two convolutions for the merge layers; ``Input -> Dense -> RepeatVector``;
  ``Input -> LAYER -> Conv2D`` for Rescaling and Normalization, which sit at the input; and
  ``Input -> BatchNormalization`` for a BatchNormalization that nothing folds). The layer's
  output is the model's output: no head that could hide a difference.

Configurations: for kernel layers ``kq.NBitScheme(8, 8, per_axis=False)`` ("w8a8
per-tensor") and ``per_axis=True`` ("w8a8 per-channel"), each alone and "+BN+ReLU", and
``kq.NBitScheme(4, 4, per_axis=True)`` ("w4a4 per-channel"); for the other layers
``kq.Default8BitScheme()`` ("int8 default", what ``quantize_model(model)`` uses) and the same
W4A4 scheme.

Each (row, configuration) is quantized with ``kq.quantize_model(model, scheme=...)``
(per target, with ``target=`` when ``quantize_model`` accepts one; one model is trained
for the targets that give the same one), compiled (Adam 1e-3, MSE,
``jit_compile=False``) and trained for 2 ``train_on_batch`` steps in a compiled train step, as
``fit`` runs it (``--eager``: ``run_eagerly=True``, about 3 times faster, but it hides
failures that only graph tracing meets, such as TF's per-channel fake-quant gradient refusing
the rank-5 kernels of Conv3D) on batches of 8 random
inputs (uniform in [-1, 1]; [0, 255] for Rescaling) against random targets, so that every
range is set, then exported and compared on 16 held-out random inputs:

* ``tflite``: ``keras_qat.export.to_tflite(q, path)`` then ``keras_qat.export.compare(q,
  path, x)`` (LiteRT's reference kernels), differences in the TFLite output's steps;
* ``kqat``: ``keras_qat.export.save_artifact(q, path)``, ``keras_qat.runtime.load(path).run(x)``
  against ``q(x, training=False)``, differences counted in steps of the runtime's output
  grid (``IntegerModel.output_grids[0].scale``): ``round(|runtime - qat| / scale)``;
* ``onnx``: ``keras_qat.export.to_onnx(q, path)`` then ``keras_qat.export.compare(q, path, x)``
  with ONNX Runtime's graph optimizations off and on (``kernels="reference"`` and
  ``"default"``); the cell shows the worse of the two.

Verdicts
--------
* ``exact``: every output element identical (0 steps apart);
* ``within N``: at most N steps apart, with the fraction of identical elements;
* ``refused``: a ``keras_qat.errors.NotDeployableError`` (its stage is recorded: quantize,
  export, ...), or, from ``quantize_model`` only, another ``ValueError`` raised inside
  keras_qat whose message names a layer of the model (the README's "layers a scheme does not
  support raise an error naming the layer"); the message is kept;
* ``crash``: any other exception (type and first line kept; the JSON has the full message),
  including a worker process that died or hung on the cell.

Where ``keras_qat.export.diagnose`` accepts ``target=``, each quantized model is also
diagnosed for each target, and the JSON says whether diagnose refuses it and whether that
agrees with the verdict (``diagnose_agrees``; null for crashes and where diagnose has no
``target`` argument). The JSON also lists the ops ``to_tflite``'s check found left in float.

Each cell runs in a worker process (``--jobs`` of them), so that a segfault or a hang
(``--cell-timeout``) in the converter or the interpreter costs one cell, not the table.

Run ``python bench/conformance.py`` (``--quick`` for a handful of rows, ``--only SUBSTRING``
for the rows whose name contains it, ``--targets tflite,kqat,onnx``). It prints the table and
writes ``bench/results/conformance.json`` and ``.md`` next to it (``--output``). Exit code 1
if any cell crashed, else 0.
"""

from __future__ import annotations

import os
import re

os.environ["KERAS_BACKEND"] = "tensorflow"  # to_tflite traces with TF; before keras is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from common import machine_info, print_table, write_json_atomic

SEED = 0
TRAIN_BATCH = 8
TRAIN_STEPS = 2
HELD_OUT = 16
TARGETS = ("tflite", "kqat", "onnx")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "conformance.json"
#: A worker that reports no cell for this long is killed and its cell marked as a crash.
DEFAULT_CELL_TIMEOUT_S = 300.0
#: Rows of ``--quick``: one or two of each family.
QUICK_ROWS = ("Dense", "Conv2D", "Add", "MaxPooling2D", "Softmax", "UpSampling2D (bilinear)")

#: Notes (printed and in the Markdown) keep this much of the message; the JSON keeps it all.
NOTE_CHARS = 200

EXACT, WITHIN, REFUSED, CRASH = "exact", "within", "refused", "crash"
VERDICTS = (EXACT, WITHIN, REFUSED, CRASH)

# --------------------------------------------------------------------------------------
# Configurations and rows
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """A quantization scheme, and whether the layer is followed by BatchNormalization + ReLU."""

    name: str
    weight_bits: Optional[int] = None  # None: kq.Default8BitScheme()
    activation_bits: Optional[int] = None
    per_axis: bool = True
    bn_relu: bool = False

    def scheme(self) -> Any:
        import keras_qat as kq

        if self.weight_bits is None:
            return kq.Default8BitScheme()
        return kq.NBitScheme(self.weight_bits, self.activation_bits, per_axis=self.per_axis)

    def code(self) -> str:
        if self.weight_bits is None:
            scheme = "kq.Default8BitScheme()"
        else:
            scheme = f"kq.NBitScheme({self.weight_bits}, {self.activation_bits}, per_axis={self.per_axis})"
        return scheme + (" + BatchNormalization + ReLU" if self.bn_relu else "")


KERNEL_CONFIGS = (
    Config("w8a8 per-tensor", 8, 8, per_axis=False),
    Config("w8a8 per-channel", 8, 8, per_axis=True),
    Config("w8a8 per-tensor +BN+ReLU", 8, 8, per_axis=False, bn_relu=True),
    Config("w8a8 per-channel +BN+ReLU", 8, 8, per_axis=True, bn_relu=True),
    Config("w4a4 per-channel", 4, 4, per_axis=True),
)
LAYER_CONFIGS = (
    Config("int8 default"),
    Config("w4a4 per-channel", 4, 4, per_axis=True),
)

#: Input shape (without batch) per spatial rank; kept tiny.
SHAPES = {0: (6,), 1: (8, 3), 2: (8, 8, 3), 3: (4, 4, 4, 2)}


@dataclass(frozen=True)
class Row:
    """One layer kind in a tiny model: ``body(input, config)`` returns the model's output."""

    name: str
    family: str
    input_shape: tuple
    body: Callable[[Any, Config], Any]
    kernel: bool = False
    input_range: tuple = (-1.0, 1.0)

    @property
    def configs(self) -> tuple:
        return KERNEL_CONFIGS if self.kernel else LAYER_CONFIGS

    def build(self, config: Config) -> Any:
        import keras

        inputs = keras.Input(self.input_shape)
        return keras.Model(inputs, self.body(inputs, config), name="conformance")


def _layers():
    import keras

    return keras.layers


def _conv(rank: int, filters: int = 4, kernel_size: int = 3):
    L = _layers()
    return {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}[rank](filters, kernel_size, padding="same")


def _kernel_row(name: str, rank: int, make: Callable[[], Any]) -> Row:
    def body(x, config):
        y = make()(x)
        if config.bn_relu:
            y = _layers().BatchNormalization()(y)
            y = _layers().ReLU()(y)
        return y

    return Row(name, "kernel", SHAPES[rank], body, kernel=True)


def _after_conv(name: str, family: str, rank: int, make: Callable[[], Any]) -> Row:
    return Row(name, family, SHAPES[rank], lambda x, config: make()(_conv(rank)(x)))


def _merge_row(name: str, make: Callable[[], Any]) -> Row:
    def body(x, config):
        a = _conv(2)(x)
        b = _conv(2, kernel_size=1)(x)
        return make()([a, b])

    return Row(name, "merge", SHAPES[2], body)


def all_rows() -> list[Row]:
    """Every row of the table, in the README's order."""
    L = _layers()
    rows = [
        _kernel_row("Dense", 0, lambda: L.Dense(4)),
        _kernel_row("Conv1D", 1, lambda: L.Conv1D(4, 3, padding="same")),
        _kernel_row("Conv2D", 2, lambda: L.Conv2D(4, 3, padding="same")),
        _kernel_row("Conv3D", 3, lambda: L.Conv3D(4, 3, padding="same")),
        _kernel_row("DepthwiseConv1D", 1, lambda: L.DepthwiseConv1D(3, padding="same")),
        _kernel_row("DepthwiseConv2D", 2, lambda: L.DepthwiseConv2D(3, padding="same")),
        _kernel_row("SeparableConv1D", 1, lambda: L.SeparableConv1D(4, 3, padding="same")),
        _kernel_row("SeparableConv2D", 2, lambda: L.SeparableConv2D(4, 3, padding="same")),
        _kernel_row("Conv1DTranspose", 1, lambda: L.Conv1DTranspose(4, 3, strides=2, padding="same")),
        _kernel_row("Conv2DTranspose", 2, lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same")),
        _kernel_row("Conv3DTranspose", 3, lambda: L.Conv3DTranspose(4, 3, strides=2, padding="same")),
        Row("BatchNormalization (on the input)", "normalization", SHAPES[2], lambda x, c: L.BatchNormalization()(x)),
        Row(
            "BatchNormalization (after Conv2D+ReLU)",
            "normalization",
            SHAPES[2],
            lambda x, c: L.BatchNormalization()(L.ReLU()(_conv(2)(x))),
        ),
    ]
    for merge in ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"):
        rows.append(_merge_row(merge, getattr(L, merge)))
    for kind in ("AveragePooling", "MaxPooling"):
        for rank in (1, 2, 3):
            make = lambda k=kind, r=rank: getattr(L, f"{k}{r}D")(2)  # noqa: E731
            rows.append(_after_conv(f"{kind}{rank}D", "pooling", rank, make))
    for kind in ("GlobalAveragePooling", "GlobalMaxPooling"):
        for rank in (1, 2, 3):
            rows.append(_after_conv(f"{kind}{rank}D", "pooling", rank, lambda k=kind, r=rank: getattr(L, f"{k}{r}D")()))
    activations = [
        ("ReLU", lambda: L.ReLU()),
        ("ReLU(6)", lambda: L.ReLU(max_value=6.0)),
        ("LeakyReLU", lambda: L.LeakyReLU()),
        ("PReLU", lambda: L.PReLU()),
        ("ELU", lambda: L.ELU()),
        ("Softmax", lambda: L.Softmax()),
    ]
    for function in ("relu", "relu6", "sigmoid", "tanh", "swish", "hard_sigmoid", "softmax"):
        activations.append((f"Activation({function})", lambda f=function: L.Activation(f)))
    rows += [_after_conv(name, "activation", 2, make) for name, make in activations]
    rows += [
        Row(
            "Rescaling",
            "preprocessing",
            SHAPES[2],
            lambda x, c: _conv(2)(L.Rescaling(1.0 / 127.5, offset=-1.0)(x)),
            input_range=(0.0, 255.0),
        ),
        Row(
            "Normalization",
            "preprocessing",
            SHAPES[2],
            lambda x, c: _conv(2)(L.Normalization(mean=[0.1, -0.2, 0.0], variance=[0.5, 0.25, 1.0])(x)),
        ),
    ]
    for rank in (1, 2, 3):
        make = lambda r=rank: getattr(L, f"ZeroPadding{r}D")(1)  # noqa: E731
        rows.append(_after_conv(f"ZeroPadding{rank}D", "reshaping", rank, make))
    for rank in (1, 2, 3):
        rows.append(_after_conv(f"Cropping{rank}D", "reshaping", rank, lambda r=rank: getattr(L, f"Cropping{r}D")(1)))
    rows += [
        _after_conv("Flatten", "reshaping", 2, lambda: L.Flatten()),
        _after_conv("Reshape", "reshaping", 2, lambda: L.Reshape((16, 16))),
        _after_conv("Permute", "reshaping", 2, lambda: L.Permute((2, 1, 3))),
        Row("RepeatVector", "reshaping", SHAPES[0], lambda x, c: L.RepeatVector(3)(L.Dense(4)(x))),
        _after_conv("UpSampling1D", "reshaping", 1, lambda: L.UpSampling1D(2)),
        _after_conv("UpSampling2D (nearest)", "reshaping", 2, lambda: L.UpSampling2D(2, interpolation="nearest")),
        _after_conv("UpSampling2D (bilinear)", "reshaping", 2, lambda: L.UpSampling2D(2, interpolation="bilinear")),
        _after_conv("UpSampling3D", "reshaping", 3, lambda: L.UpSampling3D(2)),
        _after_conv("Dropout", "regularization", 2, lambda: L.Dropout(0.5)),
        _after_conv("SpatialDropout2D", "regularization", 2, lambda: L.SpatialDropout2D(0.5)),
        _after_conv("GaussianNoise", "regularization", 2, lambda: L.GaussianNoise(0.1)),
        _after_conv("GaussianDropout", "regularization", 2, lambda: L.GaussianDropout(0.1)),
        _after_conv("AlphaDropout", "regularization", 2, lambda: L.AlphaDropout(0.1)),
        _after_conv("Identity", "regularization", 2, lambda: L.Identity()),
    ]
    return rows


def select_rows(rows: list[Row], quick: bool, only: Optional[str]) -> list[Row]:
    if quick:
        rows = [row for row in rows if row.name in QUICK_ROWS]
    if only:
        rows = [row for row in rows if only.lower() in row.name.lower()]
    return rows


def units(rows: list[Row]) -> list[tuple[str, str]]:
    """(row name, configuration name) pairs in table order; each is quantized and trained once."""
    return [(row.name, config.name) for row in rows for config in row.configs]


# --------------------------------------------------------------------------------------
# One unit: quantize, train, then export and compare per target
# --------------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def _error_line(text: str) -> str:
    """The first line that says ``error:`` (converter messages put it after a preamble), from
    ``error:`` on (the source location before it is the Keras frame that was traced)."""
    for line in str(text).splitlines():
        at = line.lower().find("error:")
        if at >= 0:
            return line[at:].strip()[:300]
    return ""


def _raised_in_keras_qat(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}keras_qat{os.sep}" in frames[-1].filename


def _names_a_layer(message: str, model: Any) -> bool:
    if model is None:
        return False
    for layer in model.layers:
        if f"'{layer.name}'" in message or f'"{layer.name}"' in message or type(layer).__name__ in message:
            return True
    return False


def classify(error: BaseException, stage: str, float_model: Any = None) -> dict[str, Any]:
    """A failure as a cell: refused (NotDeployableError; at quantize, a keras_qat ValueError
    naming a layer) or crash."""
    from keras_qat.errors import NotDeployableError

    message = str(error)
    cell: dict[str, Any] = {
        "stage": stage,
        "error_type": type(error).__name__,
        "first_line": _first_line(message) or type(error).__name__,
        "message": message[:4000],
    }
    if _error_line(message) and _error_line(message) != cell["first_line"]:
        cell["error_line"] = _error_line(message)
    if isinstance(error, NotDeployableError):
        cell.update(verdict=REFUSED, reasons=dict(getattr(error, "reasons", {}) or {}))
    elif (
        stage == "quantize"
        and isinstance(error, ValueError)
        and _raised_in_keras_qat(error)
        and _names_a_layer(message, float_model)
    ):
        cell.update(verdict=REFUSED, note="a ValueError naming the layer, not a NotDeployableError")
    else:
        cell.update(verdict=CRASH)
    return cell


def diagnose_cell(q: Any, target: str) -> dict[str, Any]:
    """What ``diagnose(q, target=target)`` says: whether it refuses the model."""
    from keras_qat.export import diagnose

    try:
        return {"diagnose_refuses": not diagnose(q, target=target).deployable}
    except Exception as error:  # noqa: BLE001 - recorded, not fatal
        return {"diagnose": f"error: {type(error).__name__}: {_first_line(str(error))}"}


def _canonical_config(model: Any) -> str:
    """The model's config with Keras's name suffixes (``_1``, ``_2``...) removed."""
    text = json.dumps(model.get_config(), sort_keys=True, default=str)
    return re.sub(r"_\d+(?=[\"/])", "", text)


def _same_model(q: Any, earlier) -> Any:
    """An earlier target's quantized model when ``quantize_model(..., target=...)`` built the
    same one (same config; same seed, so same weights): it is trained once, for both."""
    try:
        config = _canonical_config(q)
        return next((e for e in earlier if _canonical_config(e) == config), q)
    except Exception:  # noqa: BLE001 - a model whose config cannot be read is trained on its own
        return q


def _random(shape: tuple, low: float, high: float, stream: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, stream])
    return rng.uniform(low, high, size=shape).astype(np.float32)


def _train(q: Any, row: Row, graph: bool) -> None:
    import keras

    q.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", jit_compile=False, run_eagerly=not graph)
    output_shape = tuple(q.outputs[0].shape[1:])
    for step in range(TRAIN_STEPS):
        x = _random((TRAIN_BATCH, *row.input_shape), *row.input_range, stream=2 * step)
        y = np.random.default_rng([SEED, 2 * step + 1]).normal(size=(TRAIN_BATCH, *output_shape)).astype(np.float32)
        q.train_on_batch(x, y)


def _agreement(identical: float, max_steps: int) -> dict[str, Any]:
    verdict = EXACT if identical == 1.0 and max_steps == 0 else WITHIN
    return {"verdict": verdict, "identical_fraction": float(identical), "max_steps": int(max_steps)}


def export_tflite(q: Any, x: np.ndarray, directory: Path) -> dict[str, Any]:
    from keras_qat.export import compare, to_tflite

    stage = "export"
    try:
        check = to_tflite(q, directory / "model.tflite")
        float_ops = [str(op) for op in getattr(check, "float_ops", [])]
        stage = "compare"
        report = compare(q, check.path, x)
    except Exception as error:  # noqa: BLE001 - every failure is a cell
        return classify(error, stage)
    cell = _agreement(report.identical_fraction, report.max_step_difference)
    cell["float_ops"] = float_ops
    return cell


def export_kqat(q: Any, x: np.ndarray, directory: Path) -> dict[str, Any]:
    import keras

    import keras_qat.runtime
    from keras_qat.export import save_artifact

    stage = "export"
    try:
        path = directory / "model.kqat"
        save_artifact(q, path)
        stage = "load"
        model = keras_qat.runtime.load(path)
        stage = "run"
        actual = np.asarray(model.run(x), dtype=np.float64)
        stage = "compare"
        expected = np.asarray(keras.ops.convert_to_numpy(q(x, training=False)), dtype=np.float64)
        if actual.shape != expected.shape:
            raise ValueError(f"runtime output shape {actual.shape} != QAT output shape {expected.shape}")
        scale = np.asarray(model.output_grids[0].scale, dtype=np.float64)
        steps = np.round(np.abs(actual - expected) / scale)
    except Exception as error:  # noqa: BLE001
        return classify(error, stage)
    if not np.all(np.isfinite(steps)):
        return {"verdict": CRASH, "stage": "compare", "error_type": "NonFinite", "first_line": "non-finite outputs"}
    return _agreement(float(np.mean(steps == 0)), int(steps.max()) if steps.size else 0)


def export_onnx(q: Any, x: np.ndarray, directory: Path) -> dict[str, Any]:
    from keras_qat.export import compare, to_onnx

    stage = "export"
    try:
        path = to_onnx(q, directory / "model.onnx")
        stage = "compare"
        reports = [compare(q, path, x, kernels=kernels) for kernels in ("reference", "default")]
    except Exception as error:  # noqa: BLE001
        return classify(error, stage)
    # The worse of ONNX Runtime without and with its graph optimizations.
    return _agreement(min(r.identical_fraction for r in reports), max(r.max_step_difference for r in reports))


EXPORTERS = {"tflite": export_tflite, "kqat": export_kqat, "onnx": export_onnx}


def run_unit(row: Row, config: Config, targets: Sequence[str], graph: bool = True) -> list[dict[str, Any]]:
    """Every target's cell for one (row, configuration); ``graph``: train in a compiled
    ``tf.function`` (as ``fit`` does), else eagerly."""
    import keras

    import keras_qat as kq

    start = time.perf_counter()
    cells: dict[str, dict[str, Any]] = {}
    quantized: dict[str, Any] = {}
    float_model = None

    def build():
        keras.utils.set_random_seed(SEED)
        return row.build(config)

    try:
        float_model = build()
    except Exception as error:  # noqa: BLE001
        cells = {target: classify(error, "build") for target in targets}
    if float_model is not None:
        for attempt, target in enumerate(targets):
            try:
                model = float_model if attempt == 0 else build()
                q = kq.quantize_model(model, scheme=config.scheme(), target=target)
            except Exception as error:  # noqa: BLE001
                cells[target] = classify(error, "quantize", float_model)
                continue
            quantized[target] = _same_model(q, quantized.values())
    trained: dict[int, Optional[dict[str, Any]]] = {}
    x = _random((HELD_OUT, *row.input_shape), *row.input_range, stream=1000)
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        for target in targets:
            if target in cells:
                continue
            q = quantized[target]
            if id(q) not in trained:
                try:
                    _train(q, row, graph)
                    trained[id(q)] = None
                except Exception as error:  # noqa: BLE001
                    trained[id(q)] = classify(error, "train")
            if trained[id(q)] is not None:
                cells[target] = dict(trained[id(q)])
                continue
            directory = Path(tmp) / target
            directory.mkdir()
            cell = EXPORTERS[target](q, x, directory)
            if cell["verdict"] != CRASH:
                cell.update(diagnose_cell(q, target))
                if cell.get("diagnose_refuses") is not None:
                    cell["diagnose_agrees"] = cell["diagnose_refuses"] == (cell["verdict"] == REFUSED)
            cells[target] = cell
    seconds = time.perf_counter() - start
    out = []
    for target in targets:
        cell = {"layer": row.name, "family": row.family, "config": config.name, "scheme": config.code()}
        cell["target"] = target
        cell.update(cells[target])
        cell["unit_seconds"] = round(seconds, 3)
        out.append(cell)
    keras.backend.clear_session()
    return out


# --------------------------------------------------------------------------------------
# Workers: each runs a list of units and appends one JSON line per unit
# --------------------------------------------------------------------------------------


def worker_main(units_path: Path, results_path: Path, targets: Sequence[str], graph: bool) -> int:
    rows = {row.name: row for row in all_rows()}
    for row_name, config_name in json.loads(units_path.read_text()):
        row = rows[row_name]
        config = next(c for c in row.configs if c.name == config_name)
        cells = run_unit(row, config, targets, graph)
        with open(results_path, "a") as f:
            f.write(json.dumps({"unit": [row_name, config_name], "cells": cells}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return 0


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a dying worker
    return results


def _died_cells(unit: tuple[str, str], rows: dict[str, Row], targets, why: str) -> list[dict[str, Any]]:
    row = rows[unit[0]]
    config = next(c for c in row.configs if c.name == unit[1])
    return [
        {
            "layer": row.name,
            "family": row.family,
            "config": config.name,
            "scheme": config.code(),
            "target": target,
            "verdict": CRASH,
            "stage": "worker",
            "error_type": "WorkerDied",
            "first_line": why,
            "message": why,
        }
        for target in targets
    ]


class Worker:
    """One worker process on a list of units; restarted past a unit that kills or hangs it."""

    def __init__(self, index: int, pending: list, targets: Sequence[str], tmp: Path, cell_timeout: float, graph: bool):
        self.index, self.pending, self.targets, self.tmp = index, list(pending), targets, tmp
        self.cell_timeout, self.graph = cell_timeout, graph
        self.generation = 0
        self.fruitless = 0  # generations in a row that died before finishing any unit
        self.process: Optional[subprocess.Popen] = None
        self.done: list[dict[str, Any]] = []
        self._start()

    def _start(self) -> None:
        self.generation += 1
        stem = self.tmp / f"worker{self.index}-{self.generation}"
        self.units_path, self.results_path, self.log_path = (stem.with_suffix(s) for s in (".units", ".jsonl", ".log"))
        self.units_path.write_text(json.dumps(self.pending))
        command = [sys.executable, str(Path(__file__).resolve())]
        command += ["--worker", str(self.units_path), str(self.results_path)]
        command += ["--targets", ",".join(self.targets)] + ([] if self.graph else ["--eager"])
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.seen = 0
        self.last_progress = time.monotonic()

    def poll(self, rows: dict[str, Row], report: Callable[[dict[str, Any]], None]) -> bool:
        """Collect new results; True while the worker has units left."""
        results = _read_results(self.results_path)
        for result in results[self.seen :]:
            self.done.append(result)
            report(result)
            self.pending.pop(0)
        if len(results) > self.seen:
            self.seen, self.last_progress = len(results), time.monotonic()
        code = self.process.poll()
        hung = code is None and time.monotonic() - self.last_progress > self.cell_timeout
        if code is None and not hung:
            return True
        if hung:
            self.process.kill()
            self.process.wait()
        self.log.close()
        if not self.pending:
            return False
        # The worker stopped (or hung) on the first pending unit: that unit is a crash.
        if hung:
            why = f"worker hung for more than {self.cell_timeout:.0f} s on this cell and was killed"
        else:
            tail = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
            why = f"worker process died (exit code {code})" + (f": {' | '.join(tail)[:300]}" if tail else "")
        self.fruitless = 0 if self.seen else self.fruitless + 1
        if self.fruitless >= 3:
            why += "; 3 workers in a row finished no cell, so the remaining cells were not run"
        # Three workers in a row that finished nothing: something systemic (an import error?):
        # every pending unit gets the same crash instead of a restart each.
        for unit in list(self.pending) if self.fruitless >= 3 else [self.pending[0]]:
            self.pending.pop(0)
            result = {"unit": list(unit), "cells": _died_cells(tuple(unit), rows, self.targets, why)}
            self.done.append(result)
            report(result)
        if not self.pending:
            return False
        self._start()
        return True


def run_all(
    unit_list: list, targets: Sequence[str], jobs: int, cell_timeout: float, graph: bool
) -> list[dict[str, Any]]:
    rows = {row.name: row for row in all_rows()}
    total, count = len(unit_list), [0]
    started = time.perf_counter()

    def report(result: dict[str, Any]) -> None:
        count[0] += 1
        cells = result["cells"]
        verdicts = ", ".join(f"{c['target']} {cell_text(c)}" for c in cells)
        seconds = cells[0].get("unit_seconds")
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        print(
            f"[{count[0]:3d}/{total}] {time.perf_counter() - started:6.0f} s  {cells[0]['layer']} / "
            f"{cells[0]['config']}: {verdicts}{took}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="conformance-workers-") as tmp:
        shares = [unit_list[i::jobs] for i in range(max(1, jobs))]
        workers = [Worker(i, share, targets, Path(tmp), cell_timeout, graph) for i, share in enumerate(shares) if share]
        active = list(workers)
        while active:
            time.sleep(0.3)
            active = [w for w in active if w.poll(rows, report)]
        order = {tuple(unit): i for i, unit in enumerate(unit_list)}
        results = sorted((r for w in workers for r in w.done), key=lambda r: order[tuple(r["unit"])])
    return [cell for result in results for cell in result["cells"]]


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def cell_text(cell: dict[str, Any]) -> str:
    verdict = cell["verdict"]
    if verdict == EXACT:
        return "exact"
    if verdict == WITHIN:
        return f"within {cell['max_steps']} ({cell['identical_fraction']:.1%} identical)"
    if verdict == REFUSED:
        return f"refused ({cell['stage']})"
    return f"crash ({cell['stage']}: {cell['error_type']})"


def summarize_cells(cells: list[dict[str, Any]], targets: Sequence[str]) -> dict[str, dict[str, int]]:
    summary = {t: {v: 0 for v in VERDICTS} for t in (*targets, "total")}
    for cell in cells:
        summary[cell["target"]][cell["verdict"]] += 1
        summary["total"][cell["verdict"]] += 1
    return summary


def summary_line(summary: dict[str, dict[str, int]], targets: Sequence[str]) -> str:
    def counts(c: dict[str, int]) -> str:
        return ", ".join(f"{c[v]} {v}" for v in VERDICTS)

    total = summary["total"]
    per_target = "; ".join(f"{t}: {counts(summary[t])}" for t in targets)
    return f"{sum(total.values())} cells: {counts(total)} ({per_target})"


def _full_note(cell: dict[str, Any], untruncated: bool = False) -> str:
    reasons = cell.get("reasons") or {}
    if reasons:  # a NotDeployableError: its first reason says more than its first line
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return f"{cell['target']}: {next(iter(reasons.values()))}{more}"
    text = cell.get("error_line") or cell["first_line"]
    if untruncated and cell.get("message"):
        lines = [line.strip() for line in cell["message"].splitlines() if line.strip()]
        errors = [line[line.lower().find("error:") :] for line in lines if "error:" in line.lower()]
        text = (errors or lines or [text])[0]
    return f"{cell['error_type']}: {text}" if cell["verdict"] == CRASH else text


def _note_text(cell: dict[str, Any]) -> str:
    text = _full_note(cell)
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 3] + "..."


def _note_key(cell: dict[str, Any]) -> str:
    """Notes that differ only in the converter's tensor types or in numbers (scales, zero
    points, shapes, the suffixes of Keras names) are one note."""
    text = re.sub(r"'tensor<[^']*('|$)", "'tensor<...>'", _full_note(cell, untruncated=True))
    text = re.sub(r"_\d+'", "'", text)  # quant_add_1 is quant_add
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text)


def table_lines(cells: list[dict[str, Any]], targets: Sequence[str]):
    """(row cells by target, per (layer, config)) in order, and the numbered notes: note
    key -> (number, text of its first cell)."""
    lines: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for cell in cells:
        lines.setdefault((cell["layer"], cell["config"]), {})[cell["target"]] = cell
    notes: dict[str, tuple[int, str]] = {}
    for by_target in lines.values():
        for target in targets:
            cell = by_target.get(target)
            if cell and cell["verdict"] in (REFUSED, CRASH):
                notes.setdefault(_note_key(cell), (len(notes) + 1, _note_text(cell)))
    return lines, notes


def _with_note(cell: Optional[dict[str, Any]], notes: dict[str, int]) -> str:
    if cell is None:
        return "-"
    text = cell_text(cell)
    if cell["verdict"] in (REFUSED, CRASH):
        text += f" [{notes[_note_key(cell)][0]}]"
    if cell.get("diagnose_agrees") is False:
        text += " (diagnose disagrees)"
    return text


def print_results(cells: list[dict[str, Any]], targets: Sequence[str], summary_text: str) -> None:
    lines, notes = table_lines(cells, targets)
    keys = list(lines)
    table = [[*key, *(_with_note(lines[key].get(t), notes) for t in targets)] for key in keys]
    ends = [i + 1 < len(keys) and keys[i + 1][0] != keys[i][0] for i in range(len(keys))]
    print()
    print_table(["layer", "configuration", *targets], set(), table, "Conformance: QAT model vs deployed model", ends)
    if notes:
        print("\nNotes:")
        for number, text in notes.values():
            print(f"  [{number}] {text}")
    print("\n" + summary_text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(cells: list[dict[str, Any]], targets: Sequence[str], summary_text: str, header: str) -> str:
    lines, notes = table_lines(cells, targets)
    out = [header, "", "| layer | configuration | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for (layer, config), by_target in lines.items():
        row = [layer, config, *(_with_note(by_target.get(t), notes) for t in targets)]
        out.append("| " + " | ".join(_md_escape(v) for v in row) + " |")
    out += ["", summary_text]
    if notes:
        out += ["", "Notes (first error line; the JSON has each message in full):", ""]
        out += [f"{number}. {_md_escape(text)}" for number, text in notes.values()]
    return "\n".join(out) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary name, then rename), as every keras-qat export does."""
    from keras_qat.format.atomic import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _targets(text: str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown target(s) {unknown or text!r}; choose from {', '.join(TARGETS)}")
    return chosen


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only the rows {', '.join(QUICK_ROWS)}")
    parser.add_argument("--only", metavar="SUBSTRING", help="rows whose name contains SUBSTRING (case-insensitive)")
    parser.add_argument("--targets", type=_targets, default=TARGETS, help="comma-separated: tflite,kqat,onnx (default all three)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="train eagerly (faster; hides graph-only training failures; default: a compiled train step, as fit)",
    )
    parser.add_argument(
        "--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT_S, help="seconds before a hung cell is killed"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON path; the Markdown goes next to it")
    parser.add_argument("--list", action="store_true", help="list the rows and configurations, run nothing")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="run nothing: print the table of a results JSON, write its .md"
    )
    parser.add_argument("--worker", nargs=2, metavar=("UNITS", "RESULTS"), type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker, args.targets, not args.eager)
    if args.render:
        return render(args.render)
    rows = select_rows(all_rows(), args.quick, args.only)
    if not rows:
        print(f"no row matches --only {args.only!r}", file=sys.stderr)
        return 2
    unit_list = units(rows)
    if args.list:
        for row_name, config_name in unit_list:
            print(f"{row_name} / {config_name}")
        return 0
    print(f"{len(rows)} rows, {len(unit_list)} (row, configuration) units, targets {', '.join(args.targets)}")
    started = time.perf_counter()
    cells = run_all(unit_list, args.targets, args.jobs, args.cell_timeout, not args.eager)
    elapsed = time.perf_counter() - started
    summary = summarize_cells(cells, args.targets)
    summary_text = summary_line(summary, args.targets)
    print_results(cells, args.targets, summary_text)
    print(f"\n{len(unit_list)} units in {elapsed:.0f} s ({args.jobs} worker(s))")

    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    payload = {
        "benchmark": "conformance",
        "generated": generated,
        "command": command,
        "elapsed_s": round(elapsed, 1),
        "machine": machine_info(),
        "settings": {
            "seed": SEED,
            "train_batch": TRAIN_BATCH,
            "train_steps": TRAIN_STEPS,
            "held_out": HELD_OUT,
            "targets": list(args.targets),
            "quick": args.quick,
            "only": args.only,
            "jobs": args.jobs,
            "graph_training": not args.eager,
        },
        "summary": summary,
        "summary_line": summary_text,
        "cells": cells,
    }
    write_json_atomic(args.output, payload)
    md_path = args.output.with_suffix(".md")
    write_text_atomic(md_path, markdown(cells, args.targets, summary_text, _md_header(generated, command)))
    print(f"wrote {args.output} and {md_path}")
    return 1 if summary["total"][CRASH] else 0


def _md_header(generated: str, command: str) -> str:
    return (
        f"Conformance of keras-qat ({generated}; `{command}`): QAT model in inference vs the deployed model, "
        "in output quantization steps (tflite: LiteRT reference kernels; kqat: keras_qat.runtime; onnx: ONNX Runtime, graph optimizations off and on)."
    )


def render(path: Path) -> int:
    """Print the table of an earlier run and (re)write its Markdown; exit code as the run's."""
    payload = json.loads(Path(path).read_text())
    targets, cells = payload["settings"]["targets"], payload["cells"]
    summary = summarize_cells(cells, targets)
    summary_text = summary_line(summary, targets)
    print_results(cells, targets, summary_text)
    md_path = Path(path).with_suffix(".md")
    header = _md_header(payload["generated"], payload["command"])
    write_text_atomic(md_path, markdown(cells, targets, summary_text, header))
    print(f"wrote {md_path}")
    return 1 if summary["total"][CRASH] else 0


if __name__ == "__main__":
    sys.exit(main())
