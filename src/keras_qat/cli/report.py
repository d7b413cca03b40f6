"""The report folder of ``keras-qat demo``: the results table as JSON and Markdown, PNG plots,
and an ``index.html`` that shows them. Files are written atomically."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_qat.cli.deployed import DeployedResult
from keras_qat.format.atomic import write_atomically


@dataclass
class SchemeResult:
    """One scheme of the demo: its QAT model's accuracy and every deployed form of it."""

    scheme: str
    weight_bits: int | None
    activation_bits: int | None
    qat_accuracy: float | None
    deployed: list[DeployedResult] = field(default_factory=list)
    #: ``{layer/weight: (per-channel minima, maxima)}`` of the deployed weights.
    weight_ranges: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: ``{layer/weight: (real - deployed) / step}``: each weight's rounding error, in steps.
    weight_errors: dict[str, np.ndarray] = field(default_factory=dict)
    #: ``{layer/weight: mask}``: the weights outside their grid's range (clipped, as a learned
    #: range clips on purpose), whose error passes half a step.
    weight_clipped: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Report:
    """Everything the demo measured."""

    float_accuracy: float | None
    float_bytes: int
    samples: int
    seed: int
    schemes: list[SchemeResult]
    elapsed_s: float = 0.0

    COLUMNS = ("scheme", "float acc.", "QAT acc.", "format", "deployed acc.", "identical", "max steps", "bytes", "vs float")

    def rows(self) -> list[list[str]]:
        """The table, one row per deployed form, as text."""
        rows = []
        for result in self.schemes:
            for deployed in result.deployed:
                rows.append(
                    [
                        result.scheme,
                        _percent(self.float_accuracy),
                        _percent(result.qat_accuracy),
                        deployed.format,
                        _percent(deployed.accuracy),
                        f"{deployed.identical_fraction:.2%}",
                        str(deployed.max_step_difference),
                        f"{deployed.size_bytes:,}",
                        f"{deployed.size_bytes / self.float_bytes:.1%}" if self.float_bytes else "-",
                    ]
                )
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "float_accuracy": self.float_accuracy,
            "float_weight_bytes": self.float_bytes,
            "held_out_samples": self.samples,
            "seed": self.seed,
            "elapsed_s": round(self.elapsed_s, 1),
            "schemes": [
                {
                    "scheme": r.scheme,
                    "weight_bits": r.weight_bits,
                    "activation_bits": r.activation_bits,
                    "qat_accuracy": r.qat_accuracy,
                    "deployed": [d.as_dict() for d in r.deployed],
                }
                for r in self.schemes
            ],
        }

    def markdown(self) -> str:
        lines = [
            f"# keras-qat demo (seed {self.seed}, {self.samples} held-out digits)",
            "",
            "| " + " | ".join(self.COLUMNS) + " |",
            "|" + "---|" * len(self.COLUMNS),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        lines += [
            "",
            "identical: the deployed model's outputs equal to the QAT model's; max steps: the largest "
            "difference in output quantization steps; bytes: the deployed file against the float "
            f"model's {self.float_bytes:,} bytes of float32 weights.",
        ]
        return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


# ---- plots ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomically(path, buffer.getvalue())


def plot_accuracy(report: Report, path: Path) -> None:
    """Accuracy per scheme (in the order run): float, QAT and every deployed form."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 3.8))
    labels = [r.scheme for r in report.schemes]
    positions = np.arange(len(labels))
    if report.float_accuracy is not None:
        axes.axhline(report.float_accuracy, color="gray", linestyle="--", label="float")
    axes.plot(positions, [_value(r.qat_accuracy) for r in report.schemes], "o-", label="QAT model")
    formats = sorted({d.format for r in report.schemes for d in r.deployed})
    for offset, fmt in enumerate(formats):
        values = [_value(next((d.accuracy for d in r.deployed if d.format == fmt), None)) for r in report.schemes]
        axes.plot(positions + 0.06 * (offset + 1), values, "s", label=f"deployed .{fmt}")
    axes.set_xticks(positions, labels)
    axes.set_xlabel("scheme (weight bits, activation bits)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title("Accuracy against bit width")
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def _value(value: float | None) -> float:
    return np.nan if value is None else value


def plot_weight_ranges(result: SchemeResult, path: Path) -> None:
    """Per layer, each output channel's deployed weight range."""
    plt = _pyplot()
    names = list(result.weight_ranges)
    figure, axes = plt.subplots(len(names), 1, figsize=(6.4, 1.6 * max(len(names), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        lows, highs = result.weight_ranges[name]
        channels = np.arange(lows.size)
        ax.vlines(channels, lows, highs, linewidth=3)
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.set_ylabel(name.split("/")[0], rotation=0, ha="right", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("output channel")
    figure.suptitle(f"{result.scheme}: deployed weight range per channel")
    _save(figure, path)
    plt.close(figure)


def plot_weight_errors(result: SchemeResult, path: Path) -> None:
    """Per layer, the histogram of each weight's rounding error, in quantization steps."""
    plt = _pyplot()
    names = list(result.weight_errors)
    columns = min(3, max(len(names), 1))
    rows = -(-max(len(names), 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        ax.hist(result.weight_errors[name].ravel(), bins=41, range=(-1.0, 1.0))
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    figure.suptitle(f"{result.scheme}: weight quantization error (steps; |error| > 0.5 is clipping)")
    _save(figure, path)
    plt.close(figure)


# ---- the folder ----------------------------------------------------------------------------


def write(report: Report, folder: Path) -> list[Path]:
    """Write the table (JSON, Markdown), the plots and ``index.html`` into ``folder``; return
    the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    json_path, markdown_path = folder / "results.json", folder / "results.md"
    write_atomically(json_path, (json.dumps(report.as_dict(), indent=2) + "\n").encode())
    write_atomically(markdown_path, report.markdown().encode())
    written += [json_path, markdown_path]
    plots = [("Accuracy against bit width", folder / "accuracy_vs_bits.png")]
    plot_accuracy(report, plots[0][1])
    for result in report.schemes:
        slug = result.scheme.lower()
        ranges, errors = folder / f"weight_ranges_{slug}.png", folder / f"weight_error_{slug}.png"
        plot_weight_ranges(result, ranges)
        plot_weight_errors(result, errors)
        plots += [(f"{result.scheme}: weight ranges per channel", ranges), (f"{result.scheme}: weight quantization error", errors)]
    written += [p for _, p in plots]
    index = folder / "index.html"
    write_atomically(index, _html(report, plots).encode())
    return written + [index]


def _html(report: Report, plots: list[tuple[str, Path]]) -> str:
    header = "".join(f"<th>{html.escape(c)}</th>" for c in Report.COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in report.rows())
    figures = "".join(
        f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, path in plots
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>keras-qat demo</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:720px}</style></head><body>"
        f"<h1>keras-qat demo</h1><p>Seed {report.seed}; {report.samples} held-out digits; "
        f"float model: {report.float_bytes:,} bytes of float32 weights.</p>"
        f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>{figures}</body></html>\n"
    )


__all__ = ["Report", "SchemeResult", "write", "plot_accuracy", "plot_weight_ranges", "plot_weight_errors"]
