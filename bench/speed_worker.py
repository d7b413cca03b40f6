"""One model of bench/qat_speed.py, timed in its own process: keras-qat's (Keras 3, ``.venv``)
or tfmot's (tf-keras, ``.venv-bench``), float or QAT.

A process per (system, variant) keeps the memory figures apart and lets the two systems, which
need different Keras versions, run in one benchmark. The coordinator sends one command per line
on stdin and reads one JSON line back:

* ``setup``: build the model, time its first inference call (``predict_on_batch``, tracing
  included), compile it and run a short warm-up fit; returns those times and the resident
  memory before the model existed.
* ``step N``: ``fit`` over N copies of the fixed batch; the per-step times between batch ends,
  each synced by reading the loss (a callback; ``fit``'s own wall time would include a tf.data
  timer at its end).
* ``infer N``: one untimed ``predict_on_batch`` call on the fixed batch (the process was idle
  while the others ran, as ``step``'s first batch, which no interval times), then N, each timed.
* ``memory``: peak resident memory so far (``VmHWM``) and the memory before ``setup``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

BATCH_SIZE = 32
NUM_CLASSES = 10
SEED = 0

#: name -> (input shape, builder taking the keras module).
INPUT_SHAPES = {"digits": (8, 8, 1), "mobilenetv2": (96, 96, 3), "resnet50": (64, 64, 3)}


def build(keras, name: str):
    """The float model ``name`` in ``keras`` (Keras 3 or tf-keras), from a fixed seed."""
    keras.utils.set_random_seed(SEED)
    if name == "digits":
        import accuracy_setup

        return accuracy_setup.digits_cnn(keras)
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(alpha=0.35, input_shape=INPUT_SHAPES[name], weights=None, classes=NUM_CLASSES)
    return keras.applications.ResNet50(input_shape=INPUT_SHAPES[name], weights=None, classes=NUM_CLASSES)


def quantized(system: str, model):
    """The QAT model of each system's default 8-bit scheme."""
    if system == "tfmot":
        import tensorflow_model_optimization as tfmot

        return tfmot.quantization.keras.quantize_model(model)
    import keras_qat

    return keras_qat.quantize_model(model)


def resident_kib(field: str = "VmRSS") -> int:
    """The process's resident memory (``VmRSS``) or its peak (``VmHWM``), KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Worker:
    def __init__(self, system: str, model: str, variant: str):
        if system == "tfmot":
            os.environ["TF_USE_LEGACY_KERAS"] = "1"
            import tf_keras as keras
        else:
            import keras
        import tensorflow as tf

        self.keras, self.tf = keras, tf
        self.system, self.name, self.variant = system, model, variant
        rng = np.random.default_rng(SEED)
        self.x = tf.constant(rng.random((BATCH_SIZE, *INPUT_SHAPES[model]), dtype=np.float32))
        self.y = tf.constant(rng.integers(0, NUM_CLASSES, size=(BATCH_SIZE,)).astype(np.int32))
        self.memory_before_kib = resident_kib()
        self.model = None

    def setup(self) -> dict:
        keras = self.keras
        started = time.perf_counter()
        model = build(keras, self.name)
        if self.variant == "qat":
            model = quantized(self.system, model)
        built = time.perf_counter() - started
        started = time.perf_counter()
        np.asarray(model.predict_on_batch(self.x))
        first_inference = time.perf_counter() - started
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        self.model = model
        started = time.perf_counter()
        self.step(3)
        first_fit = time.perf_counter() - started
        self.infer(1)  # compile() dropped the traced inference; trace it again before timing
        return {"build_s": built, "first_inference_s": first_inference, "first_fit_s": first_fit,
                "params": int(model.count_params())}

    def step(self, count: int) -> list[float]:
        ends: list[float] = []
        keras = self.keras

        class BatchEnds(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                float(np.asarray((logs or {}).get("loss", 0.0)))  # waits for the step
                ends.append(time.perf_counter())

        data = self.tf.data.Dataset.from_tensors((self.x, self.y)).repeat(count + 1)
        self.model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[BatchEnds()])
        return [(b - a) * 1e3 for a, b in zip(ends, ends[1:])]

    def infer(self, count: int) -> list[float]:
        np.asarray(self.model.predict_on_batch(self.x))  # after idling: caches and threads warm up
        times = []
        for _ in range(count):
            started = time.perf_counter()
            np.asarray(self.model.predict_on_batch(self.x))
            times.append((time.perf_counter() - started) * 1e3)
        return times

    def memory(self) -> dict:
        return {"before_kib": self.memory_before_kib, "peak_kib": resident_kib("VmHWM"), "now_kib": resident_kib()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["keras-qat", "tfmot"], required=True)
    parser.add_argument("--model", choices=sorted(INPUT_SHAPES), required=True)
    parser.add_argument("--variant", choices=["float", "qat"], required=True)
    args = parser.parse_args(argv)
    worker = Worker(args.system, args.model, args.variant)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "quit":
            break
        try:
            if command == "setup":
                reply = worker.setup()
            elif command in ("step", "infer"):
                reply = getattr(worker, command)(int(rest[0]))
            elif command == "memory":
                reply = worker.memory()
            else:
                reply = {"error": f"unknown command {command!r}"}
        except Exception as error:  # reported to the coordinator, which names the worker
            reply = {"error": f"{type(error).__name__}: {error}"[:500]}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
