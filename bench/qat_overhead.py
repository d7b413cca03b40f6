#!/usr/bin/env python
"""Benchmark the train-step overhead of quantization-aware training with keras-qat.

What it measures
----------------
For each model, the wall-clock time (``time.perf_counter``, milliseconds) of one training
step of the float Keras model and of the same model after ``keras_qat.quantize_model``
(default scheme: TFLite int8, i.e. per-channel 8-bit weight fake-quant for convolutions,
per-tensor for Dense, 8-bit moving-average fake-quant of activations and outputs):

* ``mobilenetv2``: ``keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3),
  weights=None, classes=10)``;
* ``resnet50``: ``keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None,
  classes=10)``.

Both models of a pair are compiled the same way: TensorFlow backend, SGD with momentum,
sparse categorical cross-entropy, no metrics, ``jit_compile=False`` (no XLA). A "step" is
one ``model.train_on_batch(x, y)`` call on a fixed random batch of 32 (``x`` and ``y`` are
TensorFlow tensors made once, from a fixed seed). With a batch given directly,
``train_on_batch`` calls Keras's compiled ``tf.function`` train step (forward pass, loss,
gradients, optimizer update; for the QAT model also the range-variable updates) once, plus a
small eager overhead that both models share (resetting the loss tracker, reading the loss
back as a NumPy number, which also waits for the step to finish). This is the most direct
public way to run exactly one compiled train step; ``make_train_function()`` builds the same
function but only exposes it behind an iterator wrapper.

Each model is warmed up first (``--warmup`` calls each, at least 3; the first traces the
``tf.function``). Then every timed repetition runs one float step and one QAT step back to
back, in an order that alternates between repetitions (float first, then QAT first), so that
noise from other processes on the machine hits both about equally.

How to read the table
---------------------
``median``/``p10``/``p90`` are over the ``--repeats`` timed repetitions. ``ratio`` is the QAT
median over the float median: 1.00 means QAT training costs nothing extra, 1.50 means a QAT
step takes 50% longer. ``paired`` is the median of the per-repetition ratios (each QAT step
over the float step timed next to it), which is less sensitive to slow drifts in machine
load; when the two disagree by much, the machine was noisy. The ``tfmot`` column is the
ratio that TensorFlow Model Optimization reports for the same models on this kind of machine
(1.59 for MobileNetV2, 1.68 for ResNet50): reference numbers given with the issue, not
measured by this script. The target is ``ratio <= 1.3``. ``quantized layers`` counts the
``keras_qat.QuantizeWrapper`` and ``keras_qat.QuantizeFoldedBatchNorm`` (Conv + BatchNorm
folded) layers in the QAT model, a cheap check that it is quantized.

Timings on a small CPU machine are sensitive to anything else running: run on an otherwise
idle machine, and compare ``paired`` with ``ratio``; the JSON keeps every raw step time and
the load average before and after.

Run ``python bench/qat_overhead.py`` (``--quick`` for a smoke run); results are also written
as JSON to ``bench/results/qat_overhead.json`` (``--output`` to change).
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is first imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import datetime
import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from common import machine_info as base_machine_info
from common import print_table, summarize, time_alternating, warm_up, write_json_atomic

SEED = 0
BATCH_SIZE = 32
NUM_CLASSES = 10
DEFAULT_REPEATS = 20
QUICK_REPEATS = 3
MIN_WARMUP = 3
LEARNING_RATE = 0.01
MOMENTUM = 0.9
TARGET_RATIO = 1.3
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "qat_overhead.json"

FLOAT = "float"
QAT = "qat"

#: tfmot's published QAT / float train-step ratios on this kind of machine (given reference
#: numbers, not measured here).
TFMOT_REFERENCE_RATIO: dict[str, float] = {"mobilenetv2": 1.59, "resnet50": 1.68}


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its name, input shape and how to build it."""

    name: str
    input_shape: tuple[int, int, int]
    description: str
    build: Callable[[], Any]


def _mobilenetv2() -> Any:
    import keras

    return keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=NUM_CLASSES
    )


def _resnet50() -> Any:
    import keras

    return keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=NUM_CLASSES)


MODELS: dict[str, ModelSpec] = {
    "mobilenetv2": ModelSpec(
        "mobilenetv2",
        (96, 96, 3),
        "keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10)",
        _mobilenetv2,
    ),
    "resnet50": ModelSpec(
        "resnet50",
        (64, 64, 3),
        "keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10)",
        _resnet50,
    ),
}


@dataclass
class ModelResult:
    """Everything measured for one model."""

    model: str
    description: str
    float_params: int
    qat_params: int
    quantize_wrappers: int
    build_s: float
    warmup_s: dict[str, float]
    float_ms: dict[str, float]
    qat_ms: dict[str, float]
    ratio: float
    paired_ratio: dict[str, float]
    tfmot_reference_ratio: Optional[float]
    meets_target: bool
    final_loss: dict[str, float]
    raw_ms: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------


def make_batch(spec: ModelSpec) -> tuple[Any, Any]:
    """A fixed random batch (x in [0, 1), integer labels) as TensorFlow tensors."""
    import tensorflow as tf

    rng = np.random.default_rng([SEED, sorted(MODELS).index(spec.name)])
    x = rng.random((BATCH_SIZE, *spec.input_shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(BATCH_SIZE,), dtype=np.int32)
    return tf.constant(x), tf.constant(y)


def compile_for_training(model: Any) -> None:
    """Compile ``model`` identically for both variants: SGD, cross-entropy, no XLA."""
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        jit_compile=False,
    )


def count_quantize_wrappers(model: Any) -> int:
    """Number of quantized layers (wrappers and folded Conv+BN) in ``model``, nested included."""
    import keras_qat

    return sum(
        isinstance(layer, (keras_qat.QuantizeWrapper, keras_qat.QuantizeFoldedBatchNorm))
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )


def build_pair(spec: ModelSpec) -> tuple[Any, Any]:
    """The float model and its QAT copy, both compiled."""
    import keras

    import keras_qat

    keras.utils.set_random_seed(SEED)
    float_model = spec.build()
    qat_model = keras_qat.quantize_model(float_model)
    compile_for_training(float_model)
    compile_for_training(qat_model)
    return float_model, qat_model


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def train_step_fn(model: Any, x: Any, y: Any) -> Callable[[], float]:
    """One compiled train step on the fixed batch; returns the loss (which syncs)."""

    def step() -> float:
        return float(model.train_on_batch(x, y))

    return step


def measure_model(spec: ModelSpec, repeats: int, warmup: int) -> ModelResult:
    """Build, warm up and time the float and QAT models of ``spec``."""
    started = time.perf_counter()
    float_model, qat_model = build_pair(spec)
    build_s = time.perf_counter() - started
    x, y = make_batch(spec)
    fns = {FLOAT: train_step_fn(float_model, x, y), QAT: train_step_fn(qat_model, x, y)}
    warmup_s = warm_up(fns, warmup)
    times = time_alternating(fns, repeats)
    float_stats, qat_stats = summarize(times[FLOAT]), summarize(times[QAT])
    ratio = qat_stats["median"] / float_stats["median"]
    paired = summarize([q / f for q, f in zip(times[QAT], times[FLOAT])])
    result = ModelResult(
        model=spec.name,
        description=spec.description,
        float_params=int(float_model.count_params()),
        qat_params=int(qat_model.count_params()),
        quantize_wrappers=count_quantize_wrappers(qat_model),
        build_s=build_s,
        warmup_s=warmup_s,
        float_ms=float_stats,
        qat_ms=qat_stats,
        ratio=ratio,
        paired_ratio=paired,
        tfmot_reference_ratio=TFMOT_REFERENCE_RATIO.get(spec.name),
        meets_target=ratio <= TARGET_RATIO,
        final_loss={FLOAT: fns[FLOAT](), QAT: fns[QAT]()},
        raw_ms=times,
    )
    return result


def release_models() -> None:
    """Clear Keras's global state and collect the last pair's models (call between models)."""
    import keras

    keras.backend.clear_session()
    gc.collect()


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

HEADERS = [
    "model",
    "quantized layers",
    "float median ms",
    "float p10-p90",
    "QAT median ms",
    "QAT p10-p90",
    "ratio",
    "paired",
    "tfmot (reference, not measured)",
    f"<= {TARGET_RATIO}",
]
NUMERIC_COLUMNS = {1, 2, 3, 4, 5, 6, 7, 8}


def table_cells(r: ModelResult) -> list[str]:
    reference = "-" if r.tfmot_reference_ratio is None else f"{r.tfmot_reference_ratio:.2f}"
    return [
        r.model,
        str(r.quantize_wrappers),
        f"{r.float_ms['median']:.1f}",
        f"{r.float_ms['p10']:.1f}-{r.float_ms['p90']:.1f}",
        f"{r.qat_ms['median']:.1f}",
        f"{r.qat_ms['p10']:.1f}-{r.qat_ms['p90']:.1f}",
        f"{r.ratio:.2f}",
        f"{r.paired_ratio['median']:.2f}",
        reference,
        "yes" if r.meets_target else "no",
    ]


def print_notes(results: list[ModelResult]) -> None:
    print(f"target: ratio (QAT median / float median) <= {TARGET_RATIO}")
    print("ratio: QAT median / float median; paired: median of per-repetition QAT/float ratios.")
    print("tfmot: published tfmot ratios given with the issue (reference, not measured here).")
    for r in results:
        if r.ratio > TARGET_RATIO:
            print(f"  {r.model}: {r.ratio:.2f}x is above the target by "
                  f"{(r.ratio / TARGET_RATIO - 1) * 100:.0f}%")


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def load_average() -> Optional[list[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    import keras_qat

    return {
        **base_machine_info(),
        "keras_backend": keras.backend.backend(),
        "keras_qat": keras_qat.__version__,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }

def parameters(models: Sequence[str], repeats: int, warmup: int) -> dict[str, Any]:
    return {
        "models": {name: MODELS[name].description for name in models},
        "batch_size": BATCH_SIZE,
        "num_classes": NUM_CLASSES,
        "seed": SEED,
        "data": "x ~ U[0, 1) float32, y ~ U{0..9} int32, one fixed batch per model",
        "optimizer": f"SGD(learning_rate={LEARNING_RATE}, momentum={MOMENTUM})",
        "loss": "SparseCategoricalCrossentropy()",
        "jit_compile": False,
        "qat": "keras_qat.quantize_model(model) with the default scheme (Default8BitScheme)",
        "step": "model.train_on_batch(x, y) with tf tensors (one call of the compiled train step)",
        "warmup_calls": warmup,
        "repeats": repeats,
        "order": "float and QAT back to back, order reversed every other repetition",
        "timer": "time.perf_counter",
        "ratio": "QAT median / float median",
        "paired_ratio": "statistics of per-repetition QAT / float ratios",
        "target_ratio": TARGET_RATIO,
        "tfmot_reference_ratio": dict(TFMOT_REFERENCE_RATIO),
        "tfmot_reference_note": "published tfmot ratios given with the issue; not measured",
    }


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def parse_models(value: str) -> list[str]:
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {unknown or value!r}; choose from {', '.join(MODELS)}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed repetitions per model (default {DEFAULT_REPEATS})")
    parser.add_argument("--models", type=parse_models, default=list(MODELS),
                        help=f"comma-separated models (default {','.join(MODELS)})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="JSON results file (default bench/results/qat_overhead.json)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run with {QUICK_REPEATS} repetitions")
    parser.add_argument("--warmup", type=int, default=MIN_WARMUP,
                        help=f"untimed train steps per model before timing (>= {MIN_WARMUP})")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = QUICK_REPEATS
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup < MIN_WARMUP:
        parser.error(f"--warmup must be >= {MIN_WARMUP}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = load_average()
    results = []
    for name in args.models:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(measure_model(MODELS[name], args.repeats, args.warmup))
        release_models()
    elapsed = time.perf_counter() - started

    title = (f"QAT train-step overhead (TF backend, jit_compile=False, batch {BATCH_SIZE}, "
             f"{args.repeats} alternating repeats after {args.warmup} warm-up)")
    print_table(HEADERS, NUMERIC_COLUMNS, [table_cells(r) for r in results], title)
    print_notes(results)

    payload = {
        "benchmark": "qat_overhead",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "elapsed_s": elapsed,
        "machine": {**machine_info(), "load_average_before": load_before,
                    "load_average_after": load_average()},
        "parameters": parameters(args.models, args.repeats, args.warmup),
        "results": [asdict(r) for r in results],
    }
    write_json_atomic(args.output, payload)
    print(f"wrote {args.output}")
    finite = all(np.isfinite(v) for r in results for v in r.final_loss.values())
    return 0 if finite and all(r.quantize_wrappers > 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
