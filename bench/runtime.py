#!/usr/bin/env python
"""Benchmark keras-qat's integer-only NumPy runtime against the LiteRT interpreter.

Why
---
``keras_qat.runtime`` runs a ``.kqat`` artifact (``keras_qat.export.save_artifact``) with
integer arithmetic in NumPy, so that a QAT model can be deployed and checked without
TensorFlow or LiteRT. The issue sets its speed goal relative to LiteRT on the same model:
the runtime should be within 3x of LiteRT. This script measures that ratio, and checks on the
same inputs that the runtime computes what LiteRT's reference kernels compute.

What it measures
----------------
One model, ``keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3),
weights=None, classes=10)`` built after ``keras.utils.set_random_seed(0)``, quantized with
``keras_qat.quantize_model`` (default scheme) and trained for one epoch on 64 random images in
[0, 255] (Adam, batch 16, as ``tests/end_to_end/test_tflite_agreement.py`` does) so that its
quantization ranges are calibrated, not degenerate. It is exported twice into a temporary
directory: ``keras_qat.export.to_tflite`` (int8 flatbuffer, float input and output) and
``keras_qat.export.save_artifact`` (``.kqat``). Three contenders run it:

* ``runtime``: ``keras_qat.runtime.load(path)`` once, then timed ``.run(x)`` on a float32
  NumPy batch (float32 output);
* ``LiteRT reference``: ``ai_edge_litert.interpreter.Interpreter`` with
  ``experimental_op_resolver_type=OpResolverType.BUILTIN_REF``, LiteRT's reference kernels:
  the arithmetic that the runtime, like the QAT model, reproduces;
* ``LiteRT default``: the same with ``OpResolverType.AUTO``, LiteRT's default optimized
  kernels with the XNNPACK delegate, i.e. what a deployment would run.

For each batch size (1 and 32) every interpreter has its input resized to the batch and its
tensors allocated once; a timed LiteRT call is ``set_tensor`` + ``invoke`` + ``get_tensor``.
All contenders get the same fixed batch of random images in [0, 255] (the batch-1 input is
the first image of the batch-32 one). After ``--warmup`` untimed calls each, every timed
repetition calls the three back to back, in an order that is reversed every other
repetition (runtime, reference, default; default, reference, runtime; ...), so that noise from
other processes hits all three about equally. Times are ``time.perf_counter`` milliseconds.

How to read the table
---------------------
``median``/``p10-p90`` are over the timed repetitions (default 20 at batch 1, 10 at batch 32;
``--repeats N`` sets batch 1 to N and batch 32 to N/2). ``runtime / ref`` and ``runtime /
default`` are the runtime's median over LiteRT's median with each kernel set: 2.00 means the
runtime takes twice as long. The goal is ``<= 3`` (``TARGET_RATIO``); the XNNPACK column is
the harder and more realistic comparison, the reference column compares like with like
(plain kernels without hand-vectorization). ``identical`` is the fraction of output elements
on which the runtime and the reference kernels agree exactly, measured in the output's
quantization step (``round(|runtime - litert| / step) == 0``; the step is the scale of the
int8 tensor that the model's final DEQUANTIZE reads, 1/256 for the softmax output); the
JSON also has the largest difference in steps, the argmax agreement, and the same figures
against the default kernels, which round some ties differently.

Threads: LiteRT uses ``--threads`` (default: its own default); NumPy's BLAS uses what its
environment says (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ...), recorded in the JSON.
Run on an otherwise idle machine.

Run ``python bench/runtime.py`` (``--quick`` for a smoke run); results are also written as
JSON to ``bench/results/runtime.json`` (``--output`` to change).
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # to_tflite traces with TF; before keras is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from common import machine_info as base_machine_info
from common import print_table, summarize, time_alternating, warm_up, write_json_atomic

SEED = 0
INPUT_SHAPE = (96, 96, 3)
NUM_CLASSES = 10
MODEL_DESCRIPTION = (
    "keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10)"
)
CALIBRATION_SAMPLES = 64
CALIBRATION_BATCH = 16
BATCH_SIZES = (1, 32)
DEFAULT_REPEATS = 20  # at batch 1; batch 32 gets half
QUICK_REPEATS = 3
DEFAULT_WARMUP = 2
TARGET_RATIO = 3.0
#: The runtime must agree with LiteRT's reference kernels on at least this fraction of output
#: elements (the threshold of tests/end_to_end/test_tflite_agreement.py), else exit code 1.
MIN_IDENTICAL_FRACTION = 0.999
#: The step of a softmax output quantized to [0, 255/256], used when the flatbuffer gives none.
SOFTMAX_STEP = 1.0 / 256.0
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "runtime.json"

RUNTIME = "runtime"
LITERT_REF = "litert_reference"
LITERT_DEFAULT = "litert_default"
CONTENDERS = (RUNTIME, LITERT_REF, LITERT_DEFAULT)


@dataclass
class Agreement:
    """Differences of the runtime's output from a LiteRT output, in output steps."""

    identical_fraction: float
    max_step_difference: int
    argmax_agreement: float


@dataclass
class BatchResult:
    """Everything measured at one batch size."""

    batch: int
    repeats: int
    warmup: int
    allocate_s: dict[str, float]
    warmup_s: dict[str, float]
    ms: dict[str, dict[str, float]]
    ratio_reference: float
    ratio_default: float
    paired_ratio_reference: dict[str, float]
    paired_ratio_default: dict[str, float]
    meets_target_reference: bool
    meets_target_default: bool
    agreement_reference: Agreement
    agreement_default: Agreement
    raw_ms: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Model, data and export
# --------------------------------------------------------------------------------------


def random_images(count: int, stream: int) -> np.ndarray:
    """``count`` random float32 images in [0, 255], from a fixed seed."""
    rng = np.random.default_rng([SEED, stream])
    return (rng.random((count, *INPUT_SHAPE)) * 255).astype(np.float32)


def build_qat_model() -> Any:
    """MobileNetV2 quantized with keras-qat, its ranges calibrated by one epoch of training."""
    import keras

    import keras_qat

    keras.utils.set_random_seed(SEED)
    model = keras_qat.quantize_model(
        keras.applications.MobileNetV2(
            alpha=0.35, input_shape=INPUT_SHAPE, weights=None, classes=NUM_CLASSES
        )
    )
    x = random_images(CALIBRATION_SAMPLES, stream=0)
    y = np.random.default_rng([SEED, 1]).integers(0, NUM_CLASSES, size=CALIBRATION_SAMPLES)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=CALIBRATION_BATCH, epochs=1, verbose=0)
    return model


def export_both(model: Any, directory: Path) -> dict[str, Any]:
    """Write ``model.tflite`` and ``model.kqat`` into ``directory``; paths, sizes, times."""
    from keras_qat.export import save_artifact, to_tflite

    tflite_path, kqat_path = directory / "model.tflite", directory / "model.kqat"
    started = time.perf_counter()
    check = to_tflite(model, tflite_path)
    tflite_s = time.perf_counter() - started
    started = time.perf_counter()
    save_artifact(model, kqat_path)
    kqat_s = time.perf_counter() - started
    return {
        "tflite_path": tflite_path,
        "kqat_path": kqat_path,
        "tflite_bytes": tflite_path.stat().st_size,
        "kqat_bytes": kqat_path.stat().st_size,
        "tflite_export_s": tflite_s,
        "kqat_export_s": kqat_s,
        "tflite_float_ops": len(check.float_ops),
        "tflite_redundant_quantize_pairs": len(check.redundant_quantize_pairs),
    }


# --------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------


def litert_interpreter(path: Path, resolver: str, threads: Optional[int]) -> Any:
    """A LiteRT interpreter with the reference (``"reference"``) or default kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.BUILTIN_REF if resolver == LITERT_REF else OpResolverType.AUTO
    return Interpreter(model_path=str(path), experimental_op_resolver_type=kind,
                       num_threads=threads)


def output_step(interpreter: Any) -> tuple[float, str]:
    """The quantization step of the model's (first) output and where it was read.

    The output's own scale if it is quantized, else the scale of the int8 tensor that the
    DEQUANTIZE producing it reads; the fixed softmax step if neither gives one. Read on an
    interpreter whose kernels no delegate has replaced (the reference one)."""
    detail = interpreter.get_output_details()[0]
    scale, _ = detail["quantization"]
    if scale:
        return float(scale), "output tensor"
    output = int(detail["index"])
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    for op in interpreter._get_ops_details():
        if op["op_name"] == "DEQUANTIZE" and output in [int(i) for i in op["outputs"]]:
            scale, _ = tensors[int(op["inputs"][0])]["quantization"]
            if scale:
                return float(scale), "DEQUANTIZE input"
    return SOFTMAX_STEP, "softmax fixed range [0, 255/256]"


def litert_call(interpreter: Any, x: np.ndarray) -> Callable[[], np.ndarray]:
    """Resize the interpreter's input to ``x``'s batch, allocate once; return a function that
    runs ``set_tensor`` + ``invoke`` + ``get_tensor`` on ``x``."""
    input_detail = interpreter.get_input_details()[0]
    if not np.issubdtype(input_detail["dtype"], np.floating):
        raise ValueError(f"expected a float input in the TFLite model, got {input_detail['dtype']}")
    interpreter.resize_tensor_input(input_detail["index"], x.shape)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def call() -> np.ndarray:
        interpreter.set_tensor(input_index, x)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return call


def first_output(result: Any) -> np.ndarray:
    """The first output of ``runtime.run``, whether it returns an array, a list or a dict."""
    if isinstance(result, dict):
        result = next(iter(result.values()))
    elif isinstance(result, (list, tuple)):
        result = result[0]
    return np.asarray(result)


def runtime_call(program: Any, x: np.ndarray) -> Callable[[], np.ndarray]:
    def call() -> np.ndarray:
        return first_output(program.run(x))

    return call


# --------------------------------------------------------------------------------------
# Timing and agreement
# --------------------------------------------------------------------------------------


def agreement(actual: np.ndarray, expected: np.ndarray, step: float) -> Agreement:
    """How far ``actual`` is from ``expected``, in output quantization steps."""
    if actual.shape != expected.shape:
        raise ValueError(f"output shapes differ: runtime {actual.shape}, LiteRT {expected.shape}")
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    steps = np.rint(np.abs(a - e) / step).astype(np.int64)
    width = a.shape[-1] if a.ndim > 1 else 1
    argmax = np.argmax(a.reshape(-1, width), -1) == np.argmax(e.reshape(-1, width), -1)
    return Agreement(float(np.mean(steps == 0)), int(steps.max()), float(np.mean(argmax)))


def measure_batch(
    x: np.ndarray,
    program: Any,
    tflite_path: Path,
    step: float,
    threads: Optional[int],
    repeats: int,
    warmup: int,
) -> BatchResult:
    """Allocate, warm up, check and time the three contenders on the batch ``x``."""
    fns: dict[str, Callable[[], np.ndarray]] = {}
    allocate_s: dict[str, float] = {}
    for name in (LITERT_REF, LITERT_DEFAULT):
        started = time.perf_counter()
        fns[name] = litert_call(litert_interpreter(tflite_path, name, threads), x)
        allocate_s[name] = time.perf_counter() - started
    fns = {RUNTIME: runtime_call(program, x), **fns}
    outputs = {name: fn() for name, fn in fns.items()}
    if not np.all(np.isfinite(outputs[RUNTIME])):
        raise ValueError(f"the runtime's output at batch {x.shape[0]} is not finite")
    warmup_s = warm_up(fns, warmup)
    times = time_alternating(fns, repeats)
    ms = {name: summarize(times[name]) for name in CONTENDERS}
    ratio_ref = ms[RUNTIME]["median"] / ms[LITERT_REF]["median"]
    ratio_default = ms[RUNTIME]["median"] / ms[LITERT_DEFAULT]["median"]
    return BatchResult(
        batch=int(x.shape[0]),
        repeats=repeats,
        warmup=warmup,
        allocate_s=allocate_s,
        warmup_s=warmup_s,
        ms=ms,
        ratio_reference=ratio_ref,
        ratio_default=ratio_default,
        paired_ratio_reference=summarize(
            [r / l for r, l in zip(times[RUNTIME], times[LITERT_REF])]),
        paired_ratio_default=summarize(
            [r / l for r, l in zip(times[RUNTIME], times[LITERT_DEFAULT])]),
        meets_target_reference=ratio_ref <= TARGET_RATIO,
        meets_target_default=ratio_default <= TARGET_RATIO,
        agreement_reference=agreement(outputs[RUNTIME], outputs[LITERT_REF], step),
        agreement_default=agreement(outputs[RUNTIME], outputs[LITERT_DEFAULT], step),
        raw_ms=times,
    )


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

HEADERS = [
    "batch",
    "repeats",
    "runtime ms",
    "runtime p10-p90",
    "LiteRT ref ms",
    "LiteRT default ms",
    "runtime/ref",
    "runtime/default",
    f"<= {TARGET_RATIO:g}x (ref, default)",
    "identical vs ref",
]
NUMERIC_COLUMNS = {0, 1, 2, 3, 4, 5, 6, 7, 9}


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.1f}"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "no"


def table_cells(r: BatchResult) -> list[str]:
    return [
        str(r.batch),
        str(r.repeats),
        fmt_ms(r.ms[RUNTIME]["median"]),
        f"{fmt_ms(r.ms[RUNTIME]['p10'])}-{fmt_ms(r.ms[RUNTIME]['p90'])}",
        fmt_ms(r.ms[LITERT_REF]["median"]),
        fmt_ms(r.ms[LITERT_DEFAULT]["median"]),
        f"{r.ratio_reference:.2f}",
        f"{r.ratio_default:.2f}",
        f"{yes_no(r.meets_target_reference)}, {yes_no(r.meets_target_default)}",
        f"{r.agreement_reference.identical_fraction:.4%}",
    ]


def print_notes(results: list[BatchResult], step: float, step_source: str) -> None:
    print(f"goal: runtime median / LiteRT median <= {TARGET_RATIO:g}; "
          "ref = LiteRT reference kernels (BUILTIN_REF), default = AUTO (XNNPACK).")
    print(f"agreement in output steps of {step:.6g} ({step_source}):")
    for r in results:
        for label, a in (("reference", r.agreement_reference), ("default", r.agreement_default)):
            print(f"  batch {r.batch}, runtime vs LiteRT {label}: {a.identical_fraction:.4%} "
                  f"identical, max {a.max_step_difference} step(s) apart, argmax agreement "
                  f"{a.argmax_agreement:.2%}")


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "TF_NUM_INTRAOP_THREADS")


def load_average() -> Optional[list[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def numpy_blas() -> Optional[str]:
    """The BLAS NumPy was built with, as NumPy reports it."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # the config layout is not a stable API
        return None


def machine_info() -> dict[str, Any]:
    import ai_edge_litert
    import keras

    import keras_qat

    return {
        **base_machine_info(),
        "numpy_blas": numpy_blas(),
        "keras_backend": keras.backend.backend(),
        "keras_qat": keras_qat.__version__,
        "ai_edge_litert": getattr(ai_edge_litert, "__version__", None),
        "thread_environment": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }

def parameters(repeats: dict[int, int], warmup: int, threads: Optional[int]) -> dict[str, Any]:
    return {
        "model": MODEL_DESCRIPTION,
        "seed": SEED,
        "qat": "keras_qat.quantize_model(model) with the default scheme",
        "calibration": f"model.fit on {CALIBRATION_SAMPLES} images U[0, 255) float32, random "
                       f"labels, batch {CALIBRATION_BATCH}, 1 epoch, Adam(1e-3)",
        "inputs": "one fixed batch of 32 images U[0, 255) float32; batch 1 is its first image",
        "exports": "keras_qat.export.to_tflite (float I/O) and keras_qat.export.save_artifact",
        "batch_sizes": list(BATCH_SIZES),
        "repeats": {str(b): n for b, n in repeats.items()},
        "warmup_calls": warmup,
        "litert_threads": threads,
        "runtime": "keras_qat.runtime.load(path) once, timed .run(x)",
        "litert": "Interpreter(model_path, experimental_op_resolver_type=BUILTIN_REF or AUTO), "
                  "resized and allocated once per batch, timed set_tensor+invoke+get_tensor",
        "order": "runtime, reference, default; reversed every other repetition",
        "timer": "time.perf_counter",
        "ratio": "runtime median / LiteRT median",
        "target_ratio": TARGET_RATIO,
        "agreement": "round(|runtime - litert| / step) == 0, step = the output's int8 scale",
        "min_identical_fraction": MIN_IDENTICAL_FRACTION,
    }


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed repetitions at batch 1; batch 32 gets half "
                             f"(default {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed calls per contender and batch (default {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, default=None,
                        help="LiteRT interpreter threads (default: LiteRT's default)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="JSON results file (default bench/results/runtime.json)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_REPEATS} repetitions, 1 warm-up call")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = QUICK_REPEATS, 1
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def repeats_per_batch(repeats: int) -> dict[int, int]:
    """``repeats`` at batch 1, half of it (at least 1) at larger batches."""
    return {b: repeats if b == 1 else max(1, round(repeats / 2)) for b in BATCH_SIZES}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    started = time.perf_counter()
    load_before = load_average()
    repeats = repeats_per_batch(args.repeats)

    from keras_qat import runtime

    print("building and calibrating the QAT model ...", file=sys.stderr, flush=True)
    model = build_qat_model()
    x = random_images(max(BATCH_SIZES), stream=2)
    results = []
    with tempfile.TemporaryDirectory(prefix="keras_qat_bench_runtime_") as tmp:
        print("exporting .tflite and .kqat ...", file=sys.stderr, flush=True)
        export = export_both(model, Path(tmp))
        step, step_source = output_step(litert_interpreter(export["tflite_path"], LITERT_REF, None))
        load_started = time.perf_counter()
        program = runtime.load(export["kqat_path"])
        runtime_load_s = time.perf_counter() - load_started
        for batch in BATCH_SIZES:
            print(f"timing batch {batch} ...", file=sys.stderr, flush=True)
            results.append(measure_batch(np.ascontiguousarray(x[:batch]), program,
                                         export["tflite_path"], step, args.threads,
                                         repeats[batch], args.warmup))
    elapsed = time.perf_counter() - started

    title = (f"keras_qat.runtime vs LiteRT, MobileNetV2 (alpha 0.35, 96x96) int8, "
             f"alternating repeats after {args.warmup} warm-up")
    print_table(HEADERS, NUMERIC_COLUMNS, [table_cells(r) for r in results], title)
    print_notes(results, step, step_source)

    export_info = {k: v for k, v in export.items() if not k.endswith("_path")}
    payload = {
        "benchmark": "runtime",
        "command": command,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "elapsed_s": elapsed,
        "machine": {**machine_info(), "load_average_before": load_before,
                    "load_average_after": load_average()},
        "parameters": parameters(repeats, args.warmup, args.threads),
        "export": {**export_info, "runtime_load_s": runtime_load_s,
                   "output_step": step, "output_step_source": step_source},
        "results": [asdict(r) for r in results],
    }
    write_json_atomic(args.output, payload)
    print(f"wrote {args.output}")
    agrees = all(r.agreement_reference.identical_fraction >= MIN_IDENTICAL_FRACTION
                 for r in results)
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
