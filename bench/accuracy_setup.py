"""The data, models and training budget that bench/accuracy.py (keras-qat, Keras 3) and
bench/tfmot_accuracy.py (tfmot, tf-keras) share, so that both train the same networks on the
same examples with the same seeds.

Everything here takes the ``keras`` module to build with (Keras 3 or tf-keras: the layers used
exist in both) and imports only NumPy, scikit-learn and mnist1d itself; both environments have
them. The data is generated or read offline: scikit-learn's copy of the 8x8 digits, and
mnist1d's generator (``make_dataset``, never its download).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Float training (Adam at a constant rate), then QAT fine-tuning for as many epochs (the
#: budget's limit) with Adam from ``QAT_LEARNING_RATE`` decayed to 0 on a cosine: a 2-bit
#: network needs the larger steps first (at 1e-4 for 10 epochs W2A2 LSQ stayed near 80%).
FLOAT_EPOCHS = 30
QAT_EPOCHS = 30
FLOAT_LEARNING_RATE = 1e-3
QAT_LEARNING_RATE = 1e-3
BATCH_SIZE = 64

#: keras-qat freezes folded BatchNorm statistics for the second half of QAT (Jacob et al.
#: 2018): training then computes what inference does. tfmot has no such setting.
FREEZE_BN_AFTER = 0.5

#: ``(weight bits, activation bits)`` of the schemes measured; the first and last layers stay at 8.
SCHEMES = [(8, 8), (4, 8), (4, 4), (3, 3), (2, 8), (2, 2)]


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mnist1d() -> Dataset:
    """mnist1d's default 4000/1000 split, generated (seeded by mnist1d's own defaults)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    as_input = lambda x: np.asarray(x, np.float32)[..., None]  # noqa: E731
    return Dataset("mnist1d", as_input(data["x"]), np.asarray(data["y"]), as_input(data["x_test"]), np.asarray(data["y_test"]))


def digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits in [0, 1]; a fixed shuffle, 1400 for training."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order]
    return Dataset("digits", images[:1400], labels[:1400], images[1400:], labels[1400:])


DATASETS = {"mnist1d": mnist1d, "digits": digits}


def mnist1d_cnn(keras):
    """Three convolution+BN+ReLU blocks over the 40 samples and a Dense head. The
    convolutions are Conv2D with 1xk kernels on a 1x40 image, not Conv1D: tfmot 0.8.1 refuses
    Conv1D ("is not supported"), and both systems must train the same network."""
    L = keras.layers
    inputs = keras.Input((40, 1), name="signal")
    x = L.Reshape((1, 40, 1), name="as_image")(inputs)
    x = L.Conv2D(32, (1, 5), padding="same", name="conv_first")(x)
    x = L.ReLU(name="relu_first")(L.BatchNormalization(name="bn_first")(x))
    x = L.Conv2D(32, (1, 3), strides=(1, 2), padding="same", name="conv2")(x)
    x = L.ReLU(name="relu2")(L.BatchNormalization(name="bn2")(x))
    x = L.Conv2D(32, (1, 3), strides=(1, 2), padding="same", name="conv3")(x)
    x = L.ReLU(name="relu3")(L.BatchNormalization(name="bn3")(x))
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(10, name="dense_last")(x), name="mnist1d_cnn")


def digits_cnn(keras):
    """Conv+BN+ReLU, a depthwise block, a residual Add, pooling and a Dense head."""
    L = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, padding="same", name="conv_first")(inputs)
    x = L.ReLU(name="relu_first")(L.BatchNormalization(name="bn_first")(x))
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = L.ReLU(name="relu_dw")(L.BatchNormalization(name="bn_dw")(y))
    y = L.Conv2D(16, 1, name="pw")(y)
    y = L.BatchNormalization(name="bn_pw")(y)
    x = L.ReLU(name="relu_residual")(L.Add(name="residual")([x, y]))
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Conv2D(32, 3, padding="same", name="conv2")(x)
    x = L.ReLU(name="relu2")(L.BatchNormalization(name="bn2")(x))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, name="dense_last")(x), name="digits_cnn")


MODELS = {"mnist1d": mnist1d_cnn, "digits": digits_cnn}

#: The layers kept at 8 bits in every scheme (the first and the last).
EIGHT_BIT_LAYERS = ("conv_first", "dense_last")


def train_float(keras, dataset: Dataset, seed: int):
    """The float model of ``dataset``, trained :data:`FLOAT_EPOCHS` from ``seed``."""
    keras.utils.set_random_seed(seed)
    model = MODELS[dataset.name](keras)
    compile_for_training(keras, model, FLOAT_LEARNING_RATE)
    model.fit(dataset.x_train, dataset.y_train, epochs=FLOAT_EPOCHS, batch_size=BATCH_SIZE, verbose=0)
    return model


def steps_per_epoch(dataset: Dataset) -> int:
    return -(-len(dataset.x_train) // BATCH_SIZE)


def compile_for_training(keras, model, learning_rate: float, decay_steps: int | None = None) -> None:
    """Adam at ``learning_rate``, decayed to 0 on a cosine over ``decay_steps`` when given."""
    rate = learning_rate if decay_steps is None else keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def compile_for_qat(keras, model, dataset: Dataset) -> None:
    """The QAT fine-tuning's optimizer, the same for keras-qat and tfmot."""
    compile_for_training(keras, model, QAT_LEARNING_RATE, QAT_EPOCHS * steps_per_epoch(dataset))


def accuracy(outputs, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(np.asarray(outputs), axis=-1) == labels))
