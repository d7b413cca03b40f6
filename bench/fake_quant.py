#!/usr/bin/env python
"""Benchmark keras_qat.ops.fake_quant against TensorFlow's own fake-quant ops.

What it measures
----------------
Wall-clock time (``time.perf_counter``, in milliseconds) of one 8-bit, full-range fake
quantization of a 1,048,576-element float32 tensor, including materializing the result
(``.numpy()`` for TensorFlow, ``.block_until_ready()`` for JAX). There are three layouts:

* ``per-tensor``:  x of shape (16, 32, 32, 64), scalar min/max (``axis=None``);
* ``per-axis -1``: the same x, 64 per-channel ranges on the last axis;
* ``per-axis 0``:  x of shape (64, 32, 32, 16), 64 ranges on axis 0. TF's per-channel op
  only takes the channel axis last, so this layout's reference row runs the raw op on a
  channels-last copy of the same data, and its ratio shows what keras-qat's transposes
  (to channels last and back) cost.

The paths are:

* ``tf raw op``: ``tf.quantization.fake_quant_with_min_max_vars`` (per-tensor) or
  ``..._per_channel`` (per-axis), inside a ``tf.function`` and eagerly;
* ``keras-qat/tf``: ``keras_qat.ops.fake_quant`` on the TensorFlow Keras backend, the same
  two modes. Each timed repetition calls the raw op and keras-qat back to back (in an order
  that alternates), so machine noise hits both equally;
* ``keras-qat/jax``: ``keras_qat.ops.fake_quant`` on the JAX backend, under ``jax.jit`` with
  num_bits, narrow_range and axis static. The Keras backend is fixed per process, so this
  runs in a subprocess (``--worker jax``) that prints its rows as JSON.

How to read the table
---------------------
``median``/``p10``/``p90`` are over the timed repetitions, after warm-up (which also traces
and compiles). ``ratio`` is the row's median over the median of the raw TF op in the same
mode and layout; for JAX rows it is over the raw op under ``tf.function``, which was measured
in the main process and not interleaved with the JAX calls, so it is noisier. 1.00 means as
fast as TF's op, 2.00 twice as slow. ``bit_identical`` says whether the row's output equals
the raw TF op's output bit for bit (compared once per row as uint32, in the process that ran
the row; the JAX worker computes its reference with the raw TF op too). ``ref`` marks the
reference rows.

Run ``python bench/fake_quant.py`` (``--quick`` for a smoke run); results are also written
as JSON to ``bench/results/fake_quant.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from common import machine_info, print_table, time_call, write_json_atomic

SEED = 0
NUM_BITS = 8
NARROW_RANGE = False
WARMUP = 5
DEFAULT_REPEATS = 50
QUICK_REPEATS = 5
WORKER_TIMEOUT_S = 600
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "fake_quant.json"
JSON_MARKER = "FAKE_QUANT_BENCH_JSON:"

RAW = "tf raw op"
QAT_TF = "keras-qat/tf"
QAT_JAX = "keras-qat/jax"
TF_FUNCTION = "tf.function"
EAGER = "eager"
JAX_JIT = "jax.jit"


@dataclass(frozen=True)
class Case:
    """One input layout: a tensor shape and the channel axis (None for per-tensor)."""

    layout: str
    shape: tuple[int, ...]
    axis: Optional[int]


CASES: tuple[Case, ...] = (
    Case("per-tensor", (16, 32, 32, 64), None),
    Case("per-axis -1", (16, 32, 32, 64), -1),
    Case("per-axis 0", (64, 32, 32, 16), 0),
)


@dataclass
class Row:
    """One measured (path, mode, layout) combination."""

    path: str
    mode: str
    layout: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio: Optional[float]
    bit_identical: Optional[bool]  # None for the reference rows
    repeats: int


# --------------------------------------------------------------------------------------
# Inputs and reference
# --------------------------------------------------------------------------------------


def make_inputs(index: int, case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic x, min and max for a case (identical in every process)."""
    rng = np.random.default_rng([SEED, index])
    x = (2.0 * rng.standard_normal(case.shape)).astype(np.float32)
    if case.axis is None:
        return x, np.asarray(-3.0, np.float32), np.asarray(2.5, np.float32)
    channels = case.shape[case.axis]
    lo = (-rng.uniform(0.5, 4.0, channels)).astype(np.float32)
    hi = rng.uniform(0.5, 4.0, channels).astype(np.float32)
    return x, lo, hi


def channels_last(x: np.ndarray, axis: Optional[int]) -> np.ndarray:
    """``x`` with its channel axis moved last (a contiguous copy), as TF's op needs it."""
    if axis is None or axis % x.ndim == x.ndim - 1:
        return x
    return np.ascontiguousarray(np.moveaxis(x, axis, -1))


def raw_tf_op(tf: Any, x: Any, lo: Any, hi: Any, per_channel: bool) -> Any:
    """TF's fake-quant op (the channel axis, if any, must be last)."""
    if per_channel:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lo, hi, num_bits=NUM_BITS, narrow_range=NARROW_RANGE
        )
    return tf.quantization.fake_quant_with_min_max_vars(
        x, lo, hi, num_bits=NUM_BITS, narrow_range=NARROW_RANGE
    )


def reference_output(tf: Any, case: Case, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The raw TF op's output for ``x`` in ``x``'s own layout (eager)."""
    out = raw_tf_op(tf, channels_last(x, case.axis), lo, hi, case.axis is not None).numpy()
    if case.axis is None or case.axis % x.ndim == x.ndim - 1:
        return out
    return np.moveaxis(out, -1, case.axis)


def bits_equal(actual: np.ndarray, expected: np.ndarray) -> bool:
    """Bit-for-bit equality of two float32 arrays."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return (
        actual.shape == expected.shape
        and actual.dtype == expected.dtype == np.float32
        and bool(np.array_equal(actual.view(np.uint32), expected.view(np.uint32)))
    )


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Time several functions in one loop, alternating their order every repetition."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(time_call(fns[name]))
    return times


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile in milliseconds (the JSON keys carry the unit)."""
    p10, median, p90 = np.percentile(np.asarray(times_ms), [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90)}


def make_row(
    path: str, mode: str, layout: str, times_ms: Sequence[float], identical: Optional[bool]
) -> Row:
    return Row(path, mode, layout, ratio=None, bit_identical=identical, repeats=len(times_ms),
               **summarize(times_ms))


# --------------------------------------------------------------------------------------
# TensorFlow backend (main process)
# --------------------------------------------------------------------------------------


def measure_tf_case(tf: Any, fake_quant: Callable, index: int, case: Case, repeats: int) -> list[Row]:
    """Raw TF op and keras-qat on TF for one case, in tf.function and eager mode."""
    x, lo, hi = make_inputs(index, case)
    per_channel = case.axis is not None
    reference = reference_output(tf, case, x, lo, hi)
    tx, tlo, thi = tf.constant(x), tf.constant(lo), tf.constant(hi)
    t_raw_x = tf.constant(channels_last(x, case.axis))

    def raw(a, l, h):
        return raw_tf_op(tf, a, l, h, per_channel)

    def qat(a, l, h):
        return fake_quant(a, l, h, num_bits=NUM_BITS, narrow_range=NARROW_RANGE, axis=case.axis)

    rows = []
    modes = {TF_FUNCTION: (tf.function(raw), tf.function(qat)), EAGER: (raw, qat)}
    for mode, (raw_fn, qat_fn) in modes.items():
        identical = bits_equal(qat_fn(tx, tlo, thi).numpy(), reference)
        times = time_interleaved(
            {
                RAW: lambda: raw_fn(t_raw_x, tlo, thi).numpy(),
                QAT_TF: lambda: qat_fn(tx, tlo, thi).numpy(),
            },
            WARMUP,
            repeats,
        )
        rows.append(make_row(RAW, mode, case.layout, times[RAW], None))
        rows.append(make_row(QAT_TF, mode, case.layout, times[QAT_TF], identical))
    return rows


def run_tensorflow(repeats: int) -> list[Row]:
    """All TF rows, measured in this process (the Keras backend must be TensorFlow)."""
    import keras
    import tensorflow as tf

    from keras_qat.ops import fake_quant

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"expected the TensorFlow Keras backend, got {keras.backend.backend()}")
    rows: list[Row] = []
    for index, case in enumerate(CASES):
        rows.extend(measure_tf_case(tf, fake_quant, index, case, repeats))
    return rows


# --------------------------------------------------------------------------------------
# JAX backend (worker subprocess)
# --------------------------------------------------------------------------------------


def run_jax_worker(repeats: int) -> dict[str, Any]:
    """The JAX rows and the JAX machine details (run with KERAS_BACKEND=jax)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import tensorflow as tf

    from keras_qat.ops import fake_quant

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"expected the JAX Keras backend, got {keras.backend.backend()}")
    jitted = jax.jit(fake_quant, static_argnames=("num_bits", "narrow_range", "axis"))
    # All TF work first, so that TF's idle thread pool does not run during the timings.
    references = [reference_output(tf, c, *make_inputs(i, c)) for i, c in enumerate(CASES)]
    rows = []
    for index, (case, reference) in enumerate(zip(CASES, references)):
        x, lo, hi = make_inputs(index, case)
        jx, jlo, jhi = (jax.device_put(a) for a in (x, lo, hi))

        def call(case: Case = case) -> Any:
            return jitted(
                jx, jlo, jhi, num_bits=NUM_BITS, narrow_range=NARROW_RANGE, axis=case.axis
            ).block_until_ready()

        identical = bits_equal(np.asarray(call()), reference)
        times = time_interleaved({QAT_JAX: call}, WARMUP, repeats)[QAT_JAX]
        rows.append(asdict(make_row(QAT_JAX, JAX_JIT, case.layout, times, identical)))
    info = {
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "keras_in_jax_worker": keras.__version__,
    }
    return {"rows": rows, "machine": info}


def spawn_jax_worker(repeats: int) -> dict[str, Any]:
    """Run this script as ``--worker jax`` with KERAS_BACKEND=jax and parse its JSON."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "jax",
               "--repeats", str(repeats)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(JSON_MARKER):
            return json.loads(line[len(JSON_MARKER):])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"JAX worker failed (exit code {proc.returncode}):\n{tail}")


# --------------------------------------------------------------------------------------
# Ratios, report, JSON
# --------------------------------------------------------------------------------------


def add_ratios(rows: list[Row]) -> None:
    """Divide each median by the raw TF op's median (same mode; tf.function for JAX)."""
    raw = {(r.mode, r.layout): r.median_ms for r in rows if r.path == RAW}
    for r in rows:
        mode = TF_FUNCTION if r.path == QAT_JAX else r.mode
        base = raw.get((mode, r.layout))
        r.ratio = None if not base else r.median_ms / base


def sort_rows(rows: list[Row]) -> list[Row]:
    layouts = [c.layout for c in CASES]
    order = [(RAW, TF_FUNCTION), (QAT_TF, TF_FUNCTION), (RAW, EAGER), (QAT_TF, EAGER),
             (QAT_JAX, JAX_JIT)]
    return sorted(rows, key=lambda r: (layouts.index(r.layout), order.index((r.path, r.mode))))


def table_cells(row: Row) -> list[str]:
    identical = "ref" if row.bit_identical is None else str(row.bit_identical)
    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
    return [row.path, row.mode, row.layout, f"{row.median_ms:.3f}", f"{row.p10_ms:.3f}",
            f"{row.p90_ms:.3f}", ratio, identical]


HEADERS = ["path", "mode", "layout", "median ms", "p10 ms", "p90 ms", "ratio", "bit_identical"]
NUMERIC_COLUMNS = {3, 4, 5, 6}


def parameters(repeats: int) -> dict[str, Any]:
    return {
        "cases": [asdict(c) for c in CASES],
        "dtype": "float32",
        "num_bits": NUM_BITS,
        "narrow_range": NARROW_RANGE,
        "warmup": WARMUP,
        "repeats": repeats,
        "seed": SEED,
        "timer": "time.perf_counter",
        "materialize": {"tensorflow": ".numpy()", "jax": ".block_until_ready()"},
        "ratio": "median / median of the raw TF op in the same mode and layout "
                 "(JAX rows: the raw TF op under tf.function)",
        "per_axis_0_reference": "raw TF per-channel op on a channels-last copy of x",
    }


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed repetitions per row (default {DEFAULT_REPEATS})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="JSON results file (default bench/results/fake_quant.json)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run with {QUICK_REPEATS} repetitions")
    parser.add_argument("--worker", choices=["jax"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = QUICK_REPEATS
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker == "jax":
        print(JSON_MARKER + json.dumps(run_jax_worker(args.repeats)))
        return 0

    os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is first imported
    started = time.perf_counter()
    rows = run_tensorflow(args.repeats)
    machine = machine_info()
    errors: list[str] = []
    try:
        worker = spawn_jax_worker(args.repeats)
        rows.extend(Row(**r) for r in worker["rows"])
        machine.update(worker["machine"])
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        errors.append(str(exc))
        print(f"warning: no JAX rows: {exc}", file=sys.stderr)
    rows = sort_rows(rows)
    add_ratios(rows)
    elapsed = time.perf_counter() - started

    title = (f"fake_quant, float32 x {int(np.prod(CASES[0].shape)):,} elements, "
             f"{NUM_BITS} bits, {args.repeats} repeats after {WARMUP} warm-up")
    section_ends = [i + 1 < len(rows) and rows[i + 1].layout != row.layout for i, row in enumerate(rows)]
    print_table(HEADERS, NUMERIC_COLUMNS, [table_cells(r) for r in rows], title, section_ends)
    print("ratio: median / raw TF op median in the same mode and layout "
          "(JAX rows: / raw TF op under tf.function).")
    print("per-axis 0 reference: the raw per-channel op on a channels-last copy of x.")

    payload = {
        "benchmark": "fake_quant",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "elapsed_s": elapsed,
        "machine": machine,
        "parameters": parameters(args.repeats),
        "rows": [asdict(r) for r in rows],
        "errors": errors,
    }
    write_json_atomic(args.output, payload)
    print(f"wrote {args.output}")
    all_identical = all(r.bit_identical is not False for r in rows)
    return 0 if all_identical and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
