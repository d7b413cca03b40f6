"""What the benchmark scripts share: alternating timed repetitions, percentiles, the
machine description that goes into every JSON result, the printed table and the atomic
JSON write."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
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


def print_table(
    headers: Sequence[str],
    numeric_columns: set[int] | frozenset[int],
    cells: list[list[str]],
    title: str,
    section_ends: Sequence[bool] | None = None,
) -> None:
    """Print ``cells`` with rich if it is installed, else as aligned plain text; numeric
    columns are right-aligned, and a rule follows each row whose ``section_ends`` is True."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain_table(headers, numeric_columns, cells, title)
        return
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in numeric_columns else "left")
    ends = section_ends or [False] * len(cells)
    for line, end in zip(cells, ends):
        table.add_row(*line, end_section=end)
    Console(width=max(160, shutil.get_terminal_size((160, 24)).columns)).print(table)


def _print_plain_table(headers, numeric_columns, cells: list[list[str]], title: str) -> None:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in numeric_columns else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))
        )

    print(title)
    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print(fmt(line))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write the results as JSON atomically (keras_qat's own atomic writer)."""
    from keras_qat.format.atomic import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_results_section(section: str, start: str, end: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into bench/RESULTS.md,
    replacing the one between those markers, atomically."""
    from keras_qat.format.atomic import write_atomically

    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n\nWritten by the scripts in bench/; each section says which and when.\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomically(RESULTS_MD, text.encode("utf-8"))
