#!/usr/bin/env python
"""QAT speed and memory, keras-qat against tfmot, float against QAT, in one run.

For each model (the digits CNN, MobileNetV2 0.35 at 96x96, ResNet50 at 64x64; batch 32;
each system's default 8-bit scheme), four processes (bench/speed_worker.py): keras-qat float
and QAT in this environment, tfmot float and QAT in the one ``make bench-env`` creates (tfmot
needs tf-keras). Each builds its model, times its first inference call (tracing included),
and warms up. Then ``--rounds`` rounds ask every process in turn, in an order that reverses
each round, for ``--steps`` training steps (steady state: per-step times between batch ends,
each synced) and ``--steps`` inference calls (``predict_on_batch``, after one untimed call as
the first training step is untimed), so that noise from the machine reaches all four alike.
Medians over every round's steps.

The table gives, per model: the QAT step over tfmot's QAT step, over Keras 3's float step;
QAT inference over the same system's float inference; the first inference call over the
float model's; and the memory QAT adds over float (peak resident memory growth of the QAT
process minus the float process's), for both systems. JSON goes to ``--output``
(bench/results/qat_speed.json) and the table to bench/RESULTS.md.

Run ``python bench/qat_speed.py`` (``--models digits --rounds 2`` for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, print_table, write_json_atomic, write_results_section  # noqa: E402

BENCH_PYTHON = HERE.parent / ".venv-bench" / "bin" / "python"
MODELS = ("digits", "mobilenetv2", "resnet50")
START, END = "<!-- qat_speed:start -->", "<!-- qat_speed:end -->"
HEADERS = [
    "model", "system", "QAT step ms", "float step ms", "QAT / tfmot QAT step", "QAT / float step",
    "QAT infer ms", "float infer ms", "QAT / float infer", "first call QAT s", "first call float s",
    "QAT / float first call", "QAT extra MiB",
]


class WorkerError(RuntimeError):
    pass


class Worker:
    """A speed_worker.py process and its one-line JSON protocol."""

    def __init__(self, system: str, model: str, variant: str):
        self.label = f"{system} {variant} {model}"
        python = sys.executable if system == "keras-qat" else str(BENCH_PYTHON)
        env = {**os.environ, "PYTHONPATH": str(HERE), "TF_CPP_MIN_LOG_LEVEL": "2"}
        if system == "tfmot":
            env["TF_USE_LEGACY_KERAS"] = "1"
        self.process = subprocess.Popen(
            [python, str(HERE / "speed_worker.py"), "--system", system, "--model", model, "--variant", variant],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        self._read()

    def _read(self):
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError(f"{self.label}: the worker exited (code {self.process.poll()})")
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise WorkerError(f"{self.label}: {reply['error']}")
        return reply

    def ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()


def measure_model(model: str, systems: list[str], rounds: int, steps: int, log) -> dict:
    """Setup, then alternating rounds, for every (system, variant) of ``model``."""
    workers: dict[tuple[str, str], Worker] = {}
    try:
        for system in systems:
            for variant in ("float", "qat"):
                workers[(system, variant)] = Worker(system, model, variant)
        setup = {}
        for key, worker in workers.items():
            setup[key] = worker.ask("setup")
            log(f"{worker.label}: first inference {setup[key]['first_inference_s']:.2f} s")
        step_ms = {key: [] for key in workers}
        infer_ms = {key: [] for key in workers}
        for round_index in range(rounds):
            order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
            for key in order:
                step_ms[key] += workers[key].ask(f"step {steps}")
                infer_ms[key] += workers[key].ask(f"infer {steps}")
            log(f"{model}: round {round_index + 1}/{rounds}")
        memory = {key: worker.ask("memory") for key, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    result = {}
    for (system, variant) in workers:
        key = (system, variant)
        result.setdefault(system, {})[variant] = {
            **setup[key],
            "step_ms": float(np.median(step_ms[key])),
            "infer_ms": float(np.median(infer_ms[key])),
            "peak_growth_mib": (memory[key]["peak_kib"] - memory[key]["before_kib"]) / 1024,
            "raw_step_ms": step_ms[key],
            "raw_infer_ms": infer_ms[key],
        }
    return result


def ratios(result: dict) -> dict:
    """The figures issue 13 asks for, per system."""
    out = {}
    for system, variants in result.items():
        qat, flt = variants["qat"], variants["float"]
        figures = {
            "qat_over_float_step": qat["step_ms"] / flt["step_ms"],
            "qat_over_float_infer": qat["infer_ms"] / flt["infer_ms"],
            "qat_over_float_first_call": qat["first_inference_s"] / flt["first_inference_s"],
            "qat_extra_mib": qat["peak_growth_mib"] - flt["peak_growth_mib"],
        }
        if "tfmot" in result and system != "tfmot":
            figures["qat_over_tfmot_qat_step"] = qat["step_ms"] / result["tfmot"]["qat"]["step_ms"]
        out[system] = figures
    return out


def table_cells(results: dict) -> list[list[str]]:
    cells = []
    for model, result in results.items():
        figures = ratios(result)
        for system, variants in result.items():
            qat, flt, f = variants["qat"], variants["float"], figures[system]
            versus_tfmot = f"{f['qat_over_tfmot_qat_step']:.2f}" if "qat_over_tfmot_qat_step" in f else "-"
            cells.append([
                model, system, f"{qat['step_ms']:.1f}", f"{flt['step_ms']:.1f}", versus_tfmot,
                f"{f['qat_over_float_step']:.2f}", f"{qat['infer_ms']:.1f}", f"{flt['infer_ms']:.1f}",
                f"{f['qat_over_float_infer']:.2f}", f"{qat['first_inference_s']:.2f}",
                f"{flt['first_inference_s']:.2f}", f"{f['qat_over_float_first_call']:.1f}",
                f"{f['qat_extra_mib']:.0f}",
            ])
    return cells


def markdown(cells: list[list[str]], note: str) -> str:
    lines = [START, "## QAT speed and memory (bench/qat_speed.py)", "", note, "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines + [END])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-tfmot", action="store_true", help="keras-qat only")
    parser.add_argument("--output", default=str(HERE / "results" / "qat_speed.json"))
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    systems = ["keras-qat"]
    tfmot_note = "not run (--no-tfmot)"
    if not args.no_tfmot:
        if BENCH_PYTHON.exists():
            systems.append("tfmot")
            tfmot_note = "tfmot 0.8.1 with tf-keras in .venv-bench"
        else:
            tfmot_note = "not run: `make bench-env` creates .venv-bench (tfmot needs tf-keras)"

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    started = time.time()
    results = {}
    for model in models:
        try:
            results[model] = measure_model(model, systems, args.rounds, args.steps, log)
        except WorkerError as error:
            log(f"{model}: {error}")
            return 1
    cells = table_cells(results)
    print_table(HEADERS, set(range(2, len(HEADERS))), cells, "QAT speed and memory (medians; ratios of medians)")
    command = "bench/qat_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"Measured {datetime.date.today().isoformat()} by `{command.strip()}` in {time.time() - started:.0f} s on "
        f"{os.cpu_count()} cores; batch 32, each system's default 8-bit scheme, SGD, no XLA; {args.rounds} rounds of "
        f"{args.steps} steps and {args.steps} inference calls per process (each after one untimed), alternating; "
        f"tfmot: {tfmot_note}. "
        "\"QAT extra MiB\": peak resident memory growth of the QAT process minus the float one's."
    )
    payload = {"machine": machine_info(), "note": note, "results": results,
               "ratios": {model: ratios(result) for model, result in results.items()}}
    write_json_atomic(Path(args.output), payload)
    write_results_section(markdown(cells, note), START, END)
    print(f"wrote {args.output} and bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
