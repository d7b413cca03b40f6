"""The ``keras-qat`` subcommands other than ``demo``: quantize, export, run, inspect, compare.

Each takes the parsed arguments and a :class:`rich.console.Console`, prints its result and
returns nothing; a user's mistake raises :class:`~keras_qat.cli.errors.UsageError`. Keras and
TensorFlow are imported only by the commands that need them (``run`` of a ``.kqat`` needs
neither).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from keras_qat.cli import data as datasets
from keras_qat.cli import deployed
from keras_qat.cli.errors import UsageError
from keras_qat.cli.schemes import scheme_from_name


def _existing(path: str, what: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist.")
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {path} must be a {' or '.join(suffixes)} file.")
    return path


def load_keras_model(path: str):
    """A saved Keras model (float or QAT: importing keras_qat registers its layers)."""
    import keras

    import keras_qat

    for name in keras_qat.__all__:  # imports every layer and quantizer, registering them for loading
        getattr(keras_qat, name)
    path = _existing(path, "model", (".keras",))
    try:
        return keras.models.load_model(path)
    except (ValueError, TypeError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load the Keras model {path}: {first[:300]}") from None


def _table(title: str, columns: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


# ---- quantize ------------------------------------------------------------------------------


def _loss(model, labels: np.ndarray):
    """Sparse categorical cross-entropy for integer labels (from logits unless the model ends in
    a softmax), categorical for one-hot labels, mean squared error otherwise."""
    import keras

    from keras_qat.registry import activation_name

    last = model.layers[-1]
    probabilities = activation_name(getattr(last, "activation", "linear")) == "softmax" or type(last).__name__ == "Softmax"
    if np.issubdtype(labels.dtype, np.integer):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    if labels.ndim == 2 and labels.shape[1] > 1 and set(np.unique(labels)) <= {0, 1}:
        return keras.losses.CategoricalCrossentropy(from_logits=not probabilities)
    return keras.losses.MeanSquaredError()


def quantize(args: argparse.Namespace, console) -> None:
    """Fine-tune a float model with QAT under a scheme and save the QAT model."""
    import keras

    import keras_qat as kq
    from keras_qat.cli.progress import EpochProgress

    dataset = datasets.load(args.data, need_training=True)
    scheme = scheme_from_name(args.scheme)
    model = load_keras_model(args.model)
    out = Path(args.out)
    if out.suffix != ".keras":
        raise UsageError(f"--out {out} must end in .keras (the QAT model is saved in Keras's format).")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist.")
    target = None if args.target == "any" else args.target
    qat_model = kq.quantize_model(model, scheme, target=target)
    classification = np.issubdtype(dataset.y_train.dtype, np.integer) or dataset.y_train.ndim == 2
    qat_model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=_loss(qat_model, dataset.y_train),
        metrics=["accuracy"] if classification else [],
    )
    validation = (dataset.x_val, dataset.y_val) if dataset.x_val is not None and dataset.y_val is not None else None
    with EpochProgress(console, args.epochs, f"QAT {args.scheme}") as progress:
        qat_model.fit(
            dataset.x_train,
            dataset.y_train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_data=validation,
            callbacks=[progress.callback()],
            verbose=0,
        )
    qat_model.save(out)
    x, y = dataset.evaluation()
    accuracy = datasets.accuracy(deployed.qat_outputs(qat_model, x), y) if classification else None
    console.print(f"saved the QAT model ({args.scheme}) to {out}" + (f"; accuracy {accuracy:.2%}" if accuracy is not None else ""))


# ---- export --------------------------------------------------------------------------------


def export(args: argparse.Namespace, console) -> None:
    """Export a QAT model; with ``--data``, check the deployed model against it."""
    dataset = datasets.load(args.data) if args.data else None
    model = load_keras_model(args.model)
    if not hasattr(model, "_nodes_by_depth"):
        raise UsageError(f"{args.model} is not a functional model; export the model quantize_model returned.")
    out = Path(args.out) if args.out else Path(args.model).with_suffix(f".{args.format}")
    if out.suffix != f".{args.format}":
        raise UsageError(f"--out {out} must end in .{args.format} for --format {args.format}.")
    path = deployed.export(model, args.format, out)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if dataset is not None:
        x, y = dataset.evaluation()
        _print_agreement(console, model, path, x, y)


def _print_agreement(console, model, path: Path, x, y) -> None:
    expected = deployed.qat_outputs(model, x)
    result = deployed.evaluate(path, x, y, expected)
    rows = [
        ["QAT model", _percent(datasets.accuracy(expected, y)), "-", "-"],
        [f".{result.format}", _percent(result.accuracy), f"{result.identical_fraction:.2%}", str(result.max_step_difference)],
    ]
    console.print(_table(f"{path.name} against the QAT model on {len(x)} samples", ["model", "accuracy", "identical", "max steps"], rows))


# ---- run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace, console) -> None:
    """Run a deployed model on data: accuracy with labels, else predictions to .npy."""
    path = _existing(args.artifact, "deployed model", deployed.SUFFIXES)
    dataset = datasets.load(args.data)
    x, y = dataset.evaluation()
    outputs, _ = deployed.deployed_outputs(path, x)
    accuracy = datasets.accuracy(outputs, y)
    if args.out or accuracy is None:
        out = Path(args.out or "predictions.npy")
        np.save(out, outputs)
        console.print(f"wrote {len(outputs)} predictions of {path.name} to {out}")
    if accuracy is not None:
        console.print(f"{path.name}: accuracy {accuracy:.2%} on {len(x)} samples")


# ---- compare -------------------------------------------------------------------------------


def compare(args: argparse.Namespace, console) -> None:
    """The deployed model against the QAT model, in output steps."""
    path = _existing(args.deployed, "deployed model", deployed.SUFFIXES)
    dataset = datasets.load(args.data)
    model = load_keras_model(args.model)
    x, y = dataset.evaluation()
    _print_agreement(console, model, path, x, y)


# ---- inspect -------------------------------------------------------------------------------


def inspect(args: argparse.Namespace, console) -> None:
    """Per layer of a QAT model (or op of an artifact): type, bits, channels, ranges, size."""
    path = _existing(args.path, "model or artifact", (".keras", ".kqat", ".tflite"))
    if path.suffix == ".kqat":
        return _inspect_artifact(path, console)
    if path.suffix == ".tflite":
        return _inspect_tflite(path, console)
    return _inspect_model(path, console)


def _inspect_model(path: Path, console) -> None:
    from keras_qat.export import diagnose, quantized_weights
    from keras_qat.export.targets import TARGETS

    model = load_keras_model(str(path))
    diagnosis = diagnose(model)
    weights = quantized_weights(model) if diagnosis.layers else {}
    sizes: dict[str, int] = {}
    for name, tensor in weights.items():
        layer = name.split("/")[0]
        sizes[layer] = sizes.get(layer, 0) + (tensor.values.size * tensor.bits + 7) // 8
    rows = []
    for entry in diagnosis.layers:
        tensors = entry.quantized or []
        rows.append(
            [
                entry.layer,
                entry.kind,
                "\n".join(f"{t.tensor}: {t.bits} bits" for t in tensors) or "float",
                "\n".join(f"{t.channels} channels" if t.channels else "per tensor" for t in tensors) or "-",
                "\n".join(f"[{t.range_min:.4g}, {t.range_max:.4g}]" for t in tensors) or "-",
                f"{sizes[entry.layer]:,}" if entry.layer in sizes else "-",
            ]
        )
    console.print(_table(f"{path.name}: {len(diagnosis.layers)} layers", ["layer", "type", "bits", "channels", "range", "weight bytes"], rows))
    for target in TARGETS:
        verdict = diagnose(model, target)
        if verdict.refused:
            console.print(f"[bold]{target}[/bold]: refuses {len(verdict.refused)} layer(s):")
            for reason in verdict.refused.values():
                console.print(f"  - {reason}", markup=False)
        else:
            console.print(f"[bold]{target}[/bold]: deploys exactly")


def _inspect_artifact(path: Path, console) -> None:
    from keras_qat.format import container

    manifest, payload = container.read(path)
    tensors = manifest["tensors"]
    rows = []
    for op in manifest["ops"]:
        out = tensors[op["outputs"][0]]
        weights = op.get("weights", {})
        rows.append(
            [
                op["layer"],
                op["op"],
                f"{out.get('bits', '-')} bits",
                ", ".join(f"{name}: {w['bits']} bits {tuple(w['shape'])}" for name, w in weights.items()) or "-",
                f"{sum(w['nbytes'] for w in weights.values()):,}" if weights else "-",
            ]
        )
    title = f"{path.name}: {len(manifest['ops'])} integer ops, {len(payload):,} payload bytes (format {manifest['format_version']})"
    console.print(_table(title, ["layer", "op", "output", "weights", "bytes"], rows))


def _inspect_tflite(path: Path, console) -> None:
    from keras_qat.export.tflite.inspect import _interpreter

    interpreter = _interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    rows = []
    for op in interpreter._get_ops_details():
        outputs = [tensors[int(i)] for i in op["outputs"] if int(i) in tensors]
        rows.append([op["op_name"], ", ".join(np.dtype(t["dtype"]).name for t in outputs), ", ".join(t["name"][:60] for t in outputs)])
    console.print(_table(f"{path.name}: {len(rows)} ops", ["op", "output type", "output"], rows))


__all__ = ["quantize", "export", "run", "compare", "inspect", "load_keras_model"]
