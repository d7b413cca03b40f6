"""Trains the same QAT model on the same global batches on one device or on several, and
writes every variable to an ``.npz`` file: what ``tests/test_distributed.py`` compares.

Run in a fresh process, because the engines need settings before the backend starts (logical
CPU devices, XLA's host device count, ``TF_CONFIG``)::

    python tests/distributed/train.py ENGINE OUT.npz

ENGINE is ``single`` (TensorFlow, one device), ``mirrored`` (MirroredStrategy over 2 logical
CPUs), ``multiworker`` (MultiWorkerMirroredStrategy; ``TF_CONFIG`` names this worker; worker 0
writes), ``jax-single`` or ``jax-data-parallel`` (``keras.distribution.DataParallel`` over 2
host devices). ``quantizers-single`` and ``quantizers-mirrored`` call each quantizer kind in
training on the global batches directly instead (in processes of their own: collectives of
functions traced apart from Keras's in one MirroredStrategy process lose step with each other).
"""

from __future__ import annotations

import os
import sys

ENGINE, OUT = sys.argv[1], sys.argv[2]
JAX = ENGINE.startswith("jax")
os.environ["KERAS_BACKEND"] = "jax" if JAX else "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if JAX:
    os.environ["JAX_ENABLE_X64"] = "1"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 4


def _tf_strategy():
    import tensorflow as tf

    if ENGINE.endswith("mirrored"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if ENGINE == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()  # the default: one device


def _model(keras, kq, scheme):
    """Conv+BN+ReLU (folded), depthwise Conv+BN+ReLU6 (folded), a residual Add, Dense."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = layers.BatchNormalization(name="bn_dw")(y)
    y = layers.ReLU(6.0, name="relu6")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(10, name="fc")(x)
    return kq.quantize_model(keras.Model(inputs, outputs), scheme)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 8, 8, 2)).astype("float32")
    y = rng.integers(0, 10, GLOBAL_BATCH * STEPS)
    return x, y


def _fit(keras, model, x, y) -> None:
    """One epoch over the global batches in order: arrays on JAX, a tf.data.Dataset on
    TensorFlow (MultiWorkerMirroredStrategy splits a dataset across workers, not arrays)."""
    if JAX:
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        return
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    if ENGINE != "multiworker":
        model.fit(dataset, epochs=1, verbose=0)
        return
    # Keras 3's fit fails under MultiWorkerMirroredStrategy before its first step
    # (keras-team/keras#20585); its documented alternative is a custom loop on the strategy.
    strategy = model.distribute_strategy
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        def step(x, y):
            with tf.GradientTape() as tape:
                per_example = loss(y, model(x, training=True))
                total = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            gradients = tape.gradient(total, model.trainable_variables)
            model.optimizer.apply_gradients(list(zip(gradients, model.trainable_variables)))

        strategy.run(step, args=(x, y))

    for x_share, y_share in strategy.experimental_distribute_dataset(dataset):
        train_step(x_share, y_share)


def _schemes(kq) -> dict:
    """The model at 8 bits with min/max ranges (last value, moving average), which every engine
    trains and the tests compare with one device's; under MirroredStrategy also with LSQ, whose
    trained model is saved, loaded and exported (its variables are not compared: see
    ``tests/test_distributed.py``)."""
    schemes = {"minmax": kq.Default8BitScheme()}
    if ENGINE == "mirrored":
        schemes["lsq"] = kq.NBitScheme(8, 8, method="lsq")
    return schemes


def train_models() -> dict[str, np.ndarray]:
    """The models of :func:`_schemes`, each fitted one epoch of :data:`STEPS` global batches,
    in order."""
    import keras

    if ENGINE == "jax-data-parallel":
        devices = keras.distribution.list_devices("cpu")
        assert len(devices) == 2, devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    import keras_qat as kq

    strategy = None if JAX else _tf_strategy()
    x, y = _data()
    weights = {}
    for label, scheme in _schemes(kq).items():
        keras.utils.set_random_seed(0)
        if strategy is None:
            model = _model(keras, kq, scheme)
        else:
            with strategy.scope():
                model = _model(keras, kq, scheme)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        _fit(keras, model, x, y)
        # By position: auto-named layers (the input quantizer's) count up per process.
        for index, variable in enumerate(model.weights):
            weights[f"{label}/{index:03d}/{variable.name}"] = keras.ops.convert_to_numpy(variable)
        weights[f"{label}/outputs"] = keras.ops.convert_to_numpy(model(x[:GLOBAL_BATCH], training=False))
        if ENGINE == "mirrored":
            weights.update({f"{label}/deployed/{k}": v for k, v in _deployed_agreement(keras, kq, model, x).items()})
    return weights


def _deployed_agreement(keras, kq, model, x) -> dict[str, np.ndarray]:
    """The model trained under the strategy, saved and loaded, and exported to ``.kqat``,
    LiteRT and ONNX: the fraction of outputs identical to its own inference, each."""
    import tempfile

    from keras_qat import runtime

    held_out = x[:GLOBAL_BATCH]
    want = keras.ops.convert_to_numpy(model(held_out, training=False))
    with tempfile.TemporaryDirectory() as directory:
        model.save(os.path.join(directory, "qat.keras"))
        loaded = keras.saving.load_model(os.path.join(directory, "qat.keras"))
        integer_model = runtime.load(kq.export.save_artifact(model, os.path.join(directory, "qat.kqat")))
        kq.export.to_tflite(model, os.path.join(directory, "qat.tflite"))
        kq.export.to_onnx(model, os.path.join(directory, "qat.onnx"))
        return {
            "loaded": np.mean(keras.ops.convert_to_numpy(loaded(held_out, training=False)) == want),
            "kqat": np.mean(integer_model.run(held_out) == want),
            "tflite": kq.export.compare(model, os.path.join(directory, "qat.tflite"), held_out).identical_fraction,
            "onnx": kq.export.compare(model, os.path.join(directory, "qat.onnx"), held_out).identical_fraction,
        }


def _training_call(strategy, calls):
    """One traced step that calls each ``(quantizer, variables)`` of ``calls`` in training on
    each replica's share of a batch (the variables are closed over: as arguments, tf.function
    would pass their values). One function for them all: one trace, and its collectives run
    in the order it gives them."""
    import tensorflow as tf

    def on_replica(share):
        return [quantizer(share, True, variables) for quantizer, variables in calls]

    @tf.function(autograph=False)
    def step(batch):
        return strategy.run(on_replica, args=(batch,))

    return step


def train_quantizers() -> dict[str, np.ndarray]:
    """Each quantizer kind called in training on three global batches, per tensor and per
    channel: the ranges (and steps) it keeps."""
    import keras
    import tensorflow as tf

    from keras_qat import learned, quantizers

    kinds = {
        "last_value": quantizers.LastValueQuantizer,
        "moving_average": quantizers.MovingAverageQuantizer,
        "all_values": quantizers.AllValuesQuantizer,
        "lsq": learned.LSQQuantizer,
        "pact": learned.PACTQuantizer,
    }
    strategy = _tf_strategy()
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(GLOBAL_BATCH, 5, 3)).astype("float32") * (step + 1) for step in range(3)]
    calls = {}
    for name, kind in kinds.items():
        for per_axis in (False, True):
            quantizer = kind(num_bits=4, per_axis=per_axis)
            with strategy.scope():
                host = keras.layers.Layer(name=f"{name}_{per_axis}")
                calls[f"{name}/{per_axis}"] = quantizer, quantizer.build((None, 5, 3), "output", host)
    step = _training_call(strategy, list(calls.values()))
    for batch in batches:
        for distributed in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch)):
            step(distributed)
    return {
        f"{label}/{key}": keras.ops.convert_to_numpy(variable)
        for label, (_, variables) in calls.items()
        for key, variable in variables.items()
    }


def main() -> None:
    states = train_quantizers() if ENGINE.startswith("quantizers") else train_models()
    if ENGINE == "multiworker":
        import json

        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] != 0:
            return
    temporary = OUT + ".partial.npz"
    np.savez(temporary, **states)
    os.replace(temporary, OUT)


if __name__ == "__main__":
    main()
