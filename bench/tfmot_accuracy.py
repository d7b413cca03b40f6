"""tfmot's side of bench/accuracy.py, run in the environment ``make bench-env`` creates.

tfmot 0.8.1 needs tf-keras (Keras 2), which keras-qat's environment does not have; this script
runs there (``.venv-bench/bin/python``, with ``TF_USE_LEGACY_KERAS=1``) on the same data, models,
seeds and budget (``accuracy_setup``): the float model, then tfmot's 8-bit ``quantize_model`` and
its experimental n-bit scheme at W4A8 and W4A4, fine-tuned and evaluated in QAT inference. It
writes the rows as JSON (``--output``) for bench/accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_setup as setup  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="mnist1d,digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    import tf_keras as keras
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.experimental.default_n_bit import (
        default_n_bit_quantize_scheme,
    )

    quantization = tfmot.quantization.keras
    rows = []
    for name in args.datasets.split(","):
        dataset = setup.DATASETS[name]()
        for seed in (int(s) for s in args.seeds.split(",")):
            started = time.time()
            float_model = setup.train_float(keras, dataset, seed)
            float_accuracy = setup.accuracy(float_model.predict(dataset.x_test, verbose=0), dataset.y_test)
            rows.append({"system": "tfmot float", "scheme": "float", "method": "-", "dataset": name, "seed": seed, "accuracy": float_accuracy})
            print(f"{name} seed {seed}: tf-keras float {float_accuracy:.2%} ({time.time() - started:.0f} s)", flush=True)
            variants = {
                "W8A8": lambda m: quantization.quantize_model(m),
                "W4A8": lambda m: quantization.quantize_apply(
                    quantization.quantize_annotate_model(m),
                    scheme=default_n_bit_quantize_scheme.DefaultNBitQuantizeScheme(num_bits_weight=4, num_bits_activation=8),
                ),
                "W4A4": lambda m: quantization.quantize_apply(
                    quantization.quantize_annotate_model(m),
                    scheme=default_n_bit_quantize_scheme.DefaultNBitQuantizeScheme(num_bits_weight=4, num_bits_activation=4),
                ),
            }
            for scheme, quantize in variants.items():
                started = time.time()
                keras.utils.set_random_seed(seed)
                try:
                    quantized = quantize(float_model)
                except Exception as error:  # noqa: BLE001 - recorded: tfmot refusing a layer is a result
                    rows.append({"system": "tfmot", "scheme": scheme, "method": "tfmot", "dataset": name, "seed": seed,
                                 "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
                    continue
                setup.compile_for_qat(keras, quantized, dataset)
                quantized.fit(dataset.x_train, dataset.y_train, epochs=setup.QAT_EPOCHS, batch_size=setup.BATCH_SIZE, verbose=0)
                tuned = setup.accuracy(quantized.predict(dataset.x_test, verbose=0), dataset.y_test)
                rows.append({"system": "tfmot", "scheme": scheme, "method": "tfmot", "dataset": name, "seed": seed, "accuracy": tuned})
                print(f"{name} seed {seed}: tfmot {scheme} {tuned:.2%} ({time.time() - started:.0f} s)", flush=True)
    Path(args.output).write_text(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
