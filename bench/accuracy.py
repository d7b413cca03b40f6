"""Held-out accuracy of low-bit QAT: keras-qat's methods against float and against tfmot.

For each data set (mnist1d's Conv1D CNN, the digits CNN) and seed: the float model is trained
(``accuracy_setup.FLOAT_EPOCHS``), then for each scheme (W8A8 ... W2A2; the first and last
layers at 8 bits) and method (minmax, lsq, pact) a copy is quantized, calibrated
(``keras_qat.calibrate``: min/max at 8 bits, MSE clipping below, bias correction) and
fine-tuned (``QAT_EPOCHS``, never more than the float epochs; see ``accuracy_setup``). Accuracy is the QAT model's inference
(what deploys) on the held-out set, after calibration and after fine-tuning. tfmot 0.8.1
(its 8-bit ``quantize_model`` and its experimental n-bit scheme at W4A4 and W4A8) runs the same
protocol in the environment ``make bench-env`` creates (``.venv-bench``, with tf-keras), through
``bench/tfmot_accuracy.py``; without that environment its rows say so.

Run ``.venv/bin/python bench/accuracy.py`` (``--seeds 0,1,2``, ``--datasets mnist1d,digits``,
``--methods minmax,lsq,pact``, ``--schemes w8a8,w4a4``, ``--no-tfmot``; ``--render A.json
B.json`` combines the rows of runs made side by side, e.g. keras-qat's and tfmot's on the two
cores). It prints the table
(mean and spread over seeds) and writes ``bench/results/accuracy.json`` and the accuracy
section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy_setup as setup  # noqa: E402
from common import RESULTS_MD, machine_info, print_table, write_json_atomic, write_results_section  # noqa: E402

BENCH_PYTHON = HERE.parent / ".venv-bench" / "bin" / "python"

#: How tfmot's rows were made, for the note under the table.
TFMOT_PROTOCOL = (
    "0.8.1 in .venv-bench, the same data, model, seeds and budget with no calibration step (it has none); its n-bit "
    "scheme quantizes every layer at the width named, the first and last included, and its float row is tf-keras's "
    "own training of the same network"
)
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"


def _scheme_name(weight_bits: int, activation_bits: int) -> str:
    return f"W{weight_bits}A{activation_bits}"


def _is_default(system: str, scheme: str, method: str) -> bool:
    """Whether ``method`` is what NBitScheme's "auto" picks for ``scheme`` ("W4A8"), by the code
    in use now, so that rows measured earlier and rendered again carry today's mark."""
    from keras_qat.schemes.base import resolve_method

    if system != "keras-qat":
        return False
    weight_bits, activation_bits = (int(bits) for bits in scheme[1:].split("A"))
    return resolve_method("auto", weight_bits, activation_bits) == method


def run_keras_qat(dataset, seed: int, schemes, methods, log) -> list[dict]:
    import keras

    import keras_qat as kq
    rows = []
    started = time.time()
    float_model = setup.train_float(keras, dataset, seed)
    float_accuracy = setup.accuracy(keras.ops.convert_to_numpy(float_model(dataset.x_test, training=False)), dataset.y_test)
    rows.append({"system": "float", "scheme": "float", "method": "-", "dataset": dataset.name, "seed": seed, "accuracy": float_accuracy})
    log(f"{dataset.name} seed {seed}: float {float_accuracy:.2%} ({time.time() - started:.0f} s)")
    eight_bit = {name: {"weight_bits": 8, "activation_bits": 8} for name in setup.EIGHT_BIT_LAYERS}
    freeze_after = int(setup.FREEZE_BN_AFTER * setup.QAT_EPOCHS * setup.steps_per_epoch(dataset))
    for weight_bits, activation_bits in schemes:
        for method in methods:
            started = time.time()
            keras.utils.set_random_seed(seed)
            scheme = kq.NBitScheme(
                weight_bits, activation_bits, method=method, overrides=eight_bit, freeze_bn_after_steps=freeze_after
            )
            quantized = kq.quantize_model(float_model, scheme)
            calibration = "minmax" if min(weight_bits, activation_bits) >= 8 else "mse"
            kq.calibrate(quantized, dataset.x_train, steps=20, method=calibration, batch_size=setup.BATCH_SIZE)
            calibrated = setup.accuracy(keras.ops.convert_to_numpy(quantized(dataset.x_test, training=False)), dataset.y_test)
            setup.compile_for_qat(keras, quantized, dataset)
            quantized.fit(dataset.x_train, dataset.y_train, epochs=setup.QAT_EPOCHS, batch_size=setup.BATCH_SIZE, verbose=0)
            tuned = setup.accuracy(keras.ops.convert_to_numpy(quantized(dataset.x_test, training=False)), dataset.y_test)
            name = _scheme_name(weight_bits, activation_bits)
            rows.append(
                {"system": "keras-qat", "scheme": name, "method": method, "dataset": dataset.name, "seed": seed,
                 "calibrated": calibrated, "accuracy": tuned}
            )
            log(f"{dataset.name} seed {seed}: keras-qat {name} {method}: calibrated {calibrated:.2%}, fine-tuned {tuned:.2%} ({time.time() - started:.0f} s)")
    return rows


def run_tfmot(datasets: list[str], seeds: list[int], log) -> tuple[list[dict], str | None]:
    """tfmot's rows from the bench environment, or why there are none."""
    if not BENCH_PYTHON.exists():
        return [], "not run: `make bench-env` creates .venv-bench (tfmot needs tf-keras)"
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "tfmot.json"
        command = [str(BENCH_PYTHON), str(HERE / "tfmot_accuracy.py"), "--datasets", ",".join(datasets),
                   "--seeds", ",".join(map(str, seeds)), "--output", str(output)]
        log("tfmot: " + " ".join(command))
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "PYTHONPATH": str(HERE)}
        done = subprocess.run(command, env=env, text=True, capture_output=True)
        if done.returncode != 0 or not output.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return [], f"failed: {last[:200]}"
        return json.loads(output.read_text())["rows"], None


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (min..max) over seeds, per (dataset, system, scheme, method)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["system"], row["scheme"], row["method"]), []).append(row)
    summary = []
    for (dataset, system, scheme, method), members in groups.items():
        values = np.array([m["accuracy"] for m in members])
        entry = {"dataset": dataset, "system": system, "scheme": scheme, "method": method, "seeds": len(members),
                 "default": _is_default(system, scheme, method),
                 "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
        calibrated = [m["calibrated"] for m in members if "calibrated" in m]
        if calibrated:
            entry["calibrated_mean"] = float(np.mean(calibrated))
        summary.append(entry)
    return summary


def table_cells(summary: list[dict]) -> list[list[str]]:
    floats = {s["dataset"]: s["mean"] for s in summary if s["system"] == "float"}
    cells = []
    for s in summary:
        delta = s["mean"] - floats.get(s["dataset"], s["mean"])
        calibrated = f"{s['calibrated_mean']:.1%}" if "calibrated_mean" in s else "-"
        method = f"{s['method']} (default)" if s.get("default") else s["method"]
        cells.append([s["dataset"], s["system"], s["scheme"], method, calibrated, f"{s['mean']:.1%}",
                      f"{s['min']:.1%}..{s['max']:.1%}", f"{delta * 100:+.1f}", str(s["seeds"])])
    return cells


HEADERS = ["data", "system", "scheme", "method", "calibrated", "accuracy", "spread", "vs float (pts)", "seeds"]


def markdown(cells: list[list[str]], note: str) -> str:
    lines = [START, "## Accuracy (bench/accuracy.py)", "", note, "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines + [END])


def write_results_md(section: str) -> None:
    write_results_section(section, START, END)


def _schemes(text: str) -> list[tuple[int, int]]:
    wanted = {name.strip().upper() for name in text.split(",")}
    chosen = [s for s in setup.SCHEMES if _scheme_name(*s) in wanted]
    if len(chosen) != len(wanted):
        raise SystemExit(f"--schemes: choose among {', '.join(_scheme_name(*s).lower() for s in setup.SCHEMES)}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default="mnist1d,digits")
    parser.add_argument("--methods", default="minmax,lsq,pact")
    parser.add_argument("--schemes", default=",".join(_scheme_name(*s).lower() for s in setup.SCHEMES))
    parser.add_argument("--no-tfmot", action="store_true", help="skip tfmot even where .venv-bench exists")
    parser.add_argument("--output", default=str(HERE / "results" / "accuracy.json"))
    parser.add_argument(
        "--render", nargs="+", metavar="JSON",
        help="measure nothing: combine the rows of earlier runs (this script's JSON, or bench/tfmot_accuracy.py's, "
        "e.g. run side by side on the two cores) into the table, --output and bench/RESULTS.md",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, Path(args.output))
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = [d.strip() for d in args.datasets.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    schemes = _schemes(args.schemes)
    log = lambda message: print(message, flush=True)  # noqa: E731
    started = time.time()
    rows = []
    for name in datasets:
        dataset = setup.DATASETS[name]()
        for seed in seeds:
            rows += run_keras_qat(dataset, seed, schemes, methods, log)
    tfmot_rows, tfmot_note = ([], "skipped (--no-tfmot)") if args.no_tfmot else run_tfmot(datasets, seeds, log)
    rows += tfmot_rows
    summary = summarize(rows)
    cells = table_cells(summary)
    print_table(HEADERS, {4, 5, 6, 7, 8}, cells, "Held-out accuracy: QAT model inference (what deploys)")
    measured = (
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/accuracy.py --seeds {args.seeds} --datasets {args.datasets} "
        f"--methods {args.methods} --schemes {args.schemes}` in {time.time() - started:.0f} s on {os.cpu_count()} cores."
    )
    note = f"{measured} {protocol_note(tfmot_note or TFMOT_PROTOCOL)}"
    _write(rows, summary, cells, note, Path(args.output))
    return 0


def protocol_note(tfmot: str) -> str:
    return (
        f"Float {setup.FLOAT_EPOCHS} epochs (Adam {setup.FLOAT_LEARNING_RATE}), QAT {setup.QAT_EPOCHS} epochs (Adam "
        f"{setup.QAT_LEARNING_RATE} decayed to 0 on a cosine; keras-qat freezes folded BatchNorm for the second half), "
        f"batch {setup.BATCH_SIZE}; first and last layers at 8 bits; calibrated (keras-qat only) by min/max at 8 bits, "
        "MSE below, with bias correction; the default method of `NBitScheme` for each width is marked. tfmot: " + tfmot + "."
    )


def _write(rows, summary, cells, note: str, output: Path) -> None:
    payload = {"machine": machine_info(), "rows": rows, "summary": summary, "note": note}
    write_json_atomic(output, payload)
    write_results_md(markdown(cells, note))
    print(f"wrote {output} and {RESULTS_MD}")


def render(paths: list[str], output: Path) -> int:
    """The table of the rows of earlier runs together (``--render``)."""
    rows, sources, seen = [], [], set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            key = (row["dataset"], row["system"], row["scheme"], row["method"], row["seed"])
            if "accuracy" in row and key not in seen:  # a seed's float model, trained by each run, counts once
                seen.add(key)
                rows.append(row)
        sources.append(data.get("note", f"{Path(path).name}: rows of bench/tfmot_accuracy.py."))
    has_tfmot = any(row["system"] == "tfmot" for row in rows)
    summary = summarize(rows)
    cells = table_cells(summary)
    print_table(HEADERS, {4, 5, 6, 7, 8}, cells, "Held-out accuracy: QAT model inference (what deploys)")
    combined = " ".join(source.split(" Float ")[0] for source in sources)
    note = (
        f"Combined by `bench/accuracy.py --render` from runs side by side: {combined} "
        + protocol_note(TFMOT_PROTOCOL if has_tfmot else "not run")
    )
    _write(rows, summary, cells, note, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
