"""``keras-qat``: the command line. ``keras-qat --help`` lists the commands.

Exit status: 0 on success; 2 with a one-line reason for a user's mistake (a missing file, a
wrong array name, an unknown scheme); 1 with the library's message when the work itself is
refused (a layer no target takes) or fails. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from keras_qat.cli.demo import DemoSettings
from keras_qat.cli.errors import UsageError

EXAMPLES = """examples:
  keras-qat demo                                   # the whole story on the digits, in under a minute
  keras-qat quantize float.keras --data d.npz --scheme w4a8 --epochs 3 --out qat.keras
  keras-qat export qat.keras --format kqat --out model.kqat --data d.npz
  keras-qat run model.kqat --data d.npz
  keras-qat inspect qat.keras
  keras-qat compare qat.keras model.tflite --data d.npz
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-qat",
        description="Quantization-aware training for Keras 3, from training to real integers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    defaults = DemoSettings()
    demo = commands.add_parser("demo", help="train, quantize, export and compare on the offline digits")
    demo.add_argument("--out", default=str(defaults.out), help=f"report folder (default: {defaults.out})")
    schemes = ",".join(defaults.schemes)
    demo.add_argument("--schemes", default=schemes, help=f"comma-separated schemes (default: {schemes})")
    demo.add_argument("--seed", type=int, default=defaults.seed, help=f"data split, initial weights and training order (default {defaults.seed})")
    demo.add_argument("--float-epochs", type=int, default=defaults.float_epochs, help=f"epochs of float training (default {defaults.float_epochs})")
    demo.add_argument("--qat-epochs", type=int, default=defaults.qat_epochs, help=f"epochs of QAT fine-tuning per scheme (default {defaults.qat_epochs})")

    quantize = commands.add_parser("quantize", help="fine-tune a float model with QAT and save it")
    quantize.add_argument("model", help="the float model, a .keras file")
    quantize.add_argument("--data", required=True, help=".npz with x_train, y_train (and optionally x_val, y_val)")
    quantize.add_argument("--scheme", default="w8a8", help="w8a8, w4a8, w4a4, w2a8, ... or a .json/.yaml scheme file")
    quantize.add_argument("--epochs", type=int, default=3, help="QAT epochs (default 3)")
    quantize.add_argument("--batch-size", type=int, default=32)
    quantize.add_argument("--learning-rate", type=float, default=1e-3)
    quantize.add_argument("--target", choices=("tflite", "kqat", "onnx", "any"), default="any", help="refuse up front what this target cannot deploy exactly")
    quantize.add_argument("--out", required=True, help="the QAT model to write, a .keras file")

    export = commands.add_parser("export", help="export a QAT model to .kqat, LiteRT (.tflite) or ONNX (.onnx)")
    export.add_argument("model", help="the QAT model, a .keras file")
    export.add_argument("--format", choices=("kqat", "tflite", "onnx"), default="kqat")
    export.add_argument("--out", help="the file to write (default: the model's name with the format's suffix)")
    export.add_argument("--data", help=".npz to check the deployed model against the QAT model on")

    run = commands.add_parser("run", help="run a deployed model (.kqat, .tflite or .onnx) on data")
    run.add_argument("artifact", help="a .kqat, .tflite or .onnx file")
    run.add_argument("--data", required=True, help=".npz with x_val (or x_train), and labels for accuracy")
    run.add_argument("--out", help="write the predictions to this .npy (always, when there are no labels)")

    inspect = commands.add_parser("inspect", help="per layer: type, bits, channels, ranges, size; what each target takes")
    inspect.add_argument("path", help="a QAT model (.keras), an artifact (.kqat) or a LiteRT model (.tflite)")

    compare = commands.add_parser("compare", help="a deployed model against its QAT model, in output steps")
    compare.add_argument("model", help="the QAT model, a .keras file")
    compare.add_argument("deployed", help="the deployed model, a .kqat, .tflite or .onnx file")
    compare.add_argument("--data", required=True, help=".npz with x_val (or x_train)")
    return parser


def _demo(args, console) -> None:
    from keras_qat.cli import demo
    from keras_qat.cli.progress import StageProgress

    schemes = tuple(name.strip() for name in args.schemes.split(",") if name.strip())
    if not schemes:
        raise UsageError("--schemes names no scheme; e.g. --schemes w8a8,w4a8.")
    for name, value in (("--float-epochs", args.float_epochs), ("--qat-epochs", args.qat_epochs)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}.")
    settings = DemoSettings(Path(args.out), schemes, args.seed, args.float_epochs, args.qat_epochs)
    with StageProgress(console, "demo") as progress:
        report = demo.run(settings, progress)
    from keras_qat.cli.commands import _table

    console.print(_table(f"keras-qat demo: {report.samples} held-out digits, seed {report.seed}", list(report.COLUMNS), report.rows()))
    console.print(f"report: {settings.out / 'index.html'} (results.json, results.md, plots); {report.elapsed_s:.0f} s")


def _dispatch(args, console) -> None:
    from keras_qat.cli import commands

    handlers = {
        "demo": _demo,
        "quantize": commands.quantize,
        "export": commands.export,
        "run": commands.run,
        "inspect": commands.inspect,
        "compare": commands.compare,
    }
    handlers[args.command](args, console)


def main(argv: list[str] | None = None) -> int:
    """Run ``keras-qat`` with ``argv`` (default: the process's); return the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from rich.console import Console

    console, errors = Console(), Console(stderr=True, soft_wrap=True)
    if not console.is_terminal:  # a pipe or a file: tables at full width, not 80 columns
        console = Console(width=140)
    try:
        _dispatch(args, console)
    except UsageError as error:
        if args.debug:
            raise
        errors.print(f"keras-qat {args.command}: {error}", markup=False, highlight=False)
        return 2
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        if args.debug:
            raise
        message = str(error).strip() or type(error).__name__
        errors.print(f"keras-qat {args.command}: {message}", markup=False, highlight=False)
        errors.print("(run with --debug for the traceback)", style="dim")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
