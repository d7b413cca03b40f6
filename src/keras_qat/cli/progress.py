"""Progress bars on the console (rich), for training epochs and the demo's stages."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def _bar(console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class StageProgress:
    """One bar for a piece of work measured as a fraction done, with the current stage named."""

    def __init__(self, console, title: str):
        self._progress = _bar(console)
        self._title = title
        self._task = None

    def __enter__(self) -> "StageProgress":
        self._progress.__enter__()
        self._task = self._progress.add_task(self._title, total=1.0)
        return self

    def __call__(self, message: str, fraction: float) -> None:
        self._progress.update(self._task, completed=min(max(fraction, 0.0), 1.0), description=f"{self._title}: {message}")

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)


class EpochProgress:
    """A bar advanced by a Keras callback at the end of each epoch, showing the loss."""

    def __init__(self, console, epochs: int, title: str):
        self._progress = _bar(console)
        self._epochs = epochs
        self._title = title
        self._task = None

    def __enter__(self) -> "EpochProgress":
        self._progress.__enter__()
        self._task = self._progress.add_task(self._title, total=self._epochs)
        return self

    def callback(self):
        import keras

        progress, task, title = self._progress, self._task, self._title

        class _Advance(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                loss = (logs or {}).get("loss")
                description = f"{title}: epoch {epoch + 1}" + (f", loss {loss:.4f}" if loss is not None else "")
                progress.update(task, advance=1, description=description)

        return _Advance()

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)


__all__ = ["StageProgress", "EpochProgress"]
