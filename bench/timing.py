"""Timing helpers shared by the benchmark scripts: alternating repetitions, percentiles,
and the machine description that goes into every JSON result."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Sequence

import numpy as np


def time_call(fn: Callable[[], object]) -> float:
    """Milliseconds that one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def warm_up(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Call every function ``calls`` times (tracing on the first); seconds spent per function."""
    spent = {name: 0.0 for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            spent[name] += time_call(fn) / 1e3
    return spent


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time the functions back to back, reversing their order every other repetition, so
    that noise from other processes hits all of them about equally."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(time_call(fns[name]))
    return times


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile."""
    p10, median, p90 = np.percentile(np.asarray(times_ms, dtype=np.float64), [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def machine_info() -> dict[str, Any]:
    """Platform, CPUs and library versions (TensorFlow and Keras when importable)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "numpy": np.__version__,
    }
    try:
        import keras
        import tensorflow as tf

        info.update({"tensorflow": tf.__version__, "keras": keras.__version__})
    except ImportError:
        pass
    return info
