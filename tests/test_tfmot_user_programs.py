"""The programs keras-qat exists for, written as a tfmot user writes them.

Everything below is tfmot's documented workflow (custom QuantizeConfig, clone_model with
quantize_annotate_layer, quantize_scope, quantize_apply, compile, fit), with one change: the
import line. The oracle for the quantized kernels is TF's fake-quant op applied to the
trained float kernel with the trained range.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

from keras_qat.compat import tfmot  # was: import tensorflow_model_optimization as tfmot
from tests.conftest import same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.api

quantize_annotate_layer = tfmot.quantization.keras.quantize_annotate_layer
quantize_apply = tfmot.quantization.keras.quantize_apply
quantize_scope = tfmot.quantization.keras.quantize_scope
LastValueQuantizer = tfmot.quantization.keras.quantizers.LastValueQuantizer
MovingAverageQuantizer = tfmot.quantization.keras.quantizers.MovingAverageQuantizer
AllValuesQuantizer = tfmot.quantization.keras.quantizers.AllValuesQuantizer


def make_config_class(weight_quantizer_cls):
    """tfmot's documented custom config, parameterised by the quantizer class."""

    class CustomQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
        def __init__(self, num_bits, per_axis, symmetric, narrow_range):
            self.num_bits = num_bits
            self.per_axis = per_axis
            self.symmetric = symmetric
            self.narrow_range = narrow_range

        def get_weights_and_quantizers(self, layer):
            quantizer = weight_quantizer_cls(
                num_bits=self.num_bits,
                per_axis=self.per_axis,
                symmetric=self.symmetric,
                narrow_range=self.narrow_range,
            )
            return [(layer.kernel, quantizer)]

        def get_activations_and_quantizers(self, layer):
            return [
                (
                    layer.activation,
                    MovingAverageQuantizer(num_bits=self.num_bits, per_axis=False, symmetric=False, narrow_range=False),
                )
            ]

        def set_quantize_weights(self, layer, quantize_weights):
            layer.kernel = quantize_weights[0]

        def set_quantize_activations(self, layer, quantize_activations):
            layer.activation = quantize_activations[0]

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {
                "num_bits": self.num_bits,
                "per_axis": self.per_axis,
                "symmetric": self.symmetric,
                "narrow_range": self.narrow_range,
            }

    CustomQuantizeConfig.__name__ = f"{weight_quantizer_cls.__name__}Config"
    return CustomQuantizeConfig


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    return x[:1500], y[:1500], x[1500:], y[1500:]


def conv_bn_relu_dense_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(10, name="dense"),
        ]
    )


def conv_depthwise_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="depthwise")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="dense")(x)
    return keras.Model(inputs, outputs)


QUANTIZED = ("conv", "depthwise", "dense")


def output_channels(name, kernel):
    """A kernel's output channels: depthwise kernels have in_channels x depth_multiplier."""
    return kernel.shape[-2] * kernel.shape[-1] if name == "depthwise" else kernel.shape[-1]

# Each quantizer class, per_axis on and off, symmetric and not, narrow range and not, 2..8 bits.
CASES = [
    (LastValueQuantizer, True, True, True, 8),
    (LastValueQuantizer, False, False, False, 4),
    (MovingAverageQuantizer, True, False, True, 2),
    (MovingAverageQuantizer, False, True, False, 6),
    (AllValuesQuantizer, True, True, False, 3),
    (AllValuesQuantizer, False, False, True, 5),
    (LastValueQuantizer, True, False, False, 7),
]
#: The cases that also run on JAX and PyTorch: each class once, per axis and per tensor,
#: symmetric and not, narrow and full (the quantizers' arithmetic at every setting is
#: test_quantizers.py's, on every backend; this program's path is the same Python for all).
EVERY_BACKEND = {CASES[0], CASES[3], CASES[5]}


def _case_id(case):
    cls, per_axis, symmetric, narrow, bits = case
    return f"{cls.__name__}-{'axis' if per_axis else 'tensor'}-{'sym' if symmetric else 'asym'}-{'narrow' if narrow else 'full'}-{bits}b"


def _case(case):
    skip = pytest.mark.skipif(
        case not in EVERY_BACKEND and keras.backend.backend() != "tensorflow",
        reason="this case runs on TensorFlow; one case per quantizer class on every backend",
    )
    return pytest.param(case, id=_case_id(case), marks=skip)


@pytest.mark.parametrize(
    "build_model",
    [
        # The configs' handling is the backend's own only in the layers they reach: the
        # depthwise model (Conv, DepthwiseConv, Dense) runs on every backend.
        pytest.param(
            conv_bn_relu_dense_model,
            marks=pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="runs on TensorFlow; its depthwise twin everywhere"),
        ),
        conv_depthwise_model,
    ],
)
@pytest.mark.parametrize("case", [_case(case) for case in CASES])
def test_custom_configs_through_clone_model_quantize_scope_apply_and_fit(digits, build_model, case, tmp_path):
    quantizer_cls, per_axis, symmetric, narrow_range, num_bits = case
    x_train, y_train, x_test, y_test = digits
    config_cls = make_config_class(quantizer_cls)
    config_args = dict(num_bits=num_bits, per_axis=per_axis, symmetric=symmetric, narrow_range=narrow_range)

    # --- the tfmot user program ---
    model = build_model()

    def apply_quantization(layer):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            return quantize_annotate_layer(layer, config_cls(**config_args))
        return layer

    annotated_model = keras.models.clone_model(model, clone_function=apply_quantization)
    with quantize_scope({config_cls.__name__: config_cls}):
        quant_aware_model = quantize_apply(annotated_model)
    quant_aware_model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = quant_aware_model.fit(x_train, y_train, batch_size=128, epochs=1, verbose=0)
    # --- end of the user program ---

    assert np.isfinite(history.history["loss"][-1])
    wrappers = {w.layer.name: w for w in quant_aware_model.layers if isinstance(w, tfmot.quantization.keras.QuantizeWrapper)}
    assert set(wrappers) == {name for name in QUANTIZED if any(l.name == name for l in model.layers)}
    for name, wrapper in wrappers.items():
        (kernel, quantizer, variables), = wrapper.quantized_weights()
        assert type(quantizer) is quantizer_cls and quantizer.num_bits == num_bits
        lo, hi = to_numpy(variables["min_var"]), to_numpy(variables["max_var"])
        channels = output_channels(name, kernel)
        assert lo.shape == ((channels,) if per_axis else ()), name
        # The deployed kernel: TF's fake quant of the float kernel on the stored range.
        axis = ((-2, -1) if name == "depthwise" else -1) if per_axis else None
        want = tf_fake_quant(to_numpy(kernel), lo, hi, num_bits, narrow_range, axis)
        got = to_numpy(quantizer(kernel, False, variables))
        assert same_bits(got, want)
        assert len(np.unique(got)) <= 2**num_bits * (channels if per_axis else 1)
    predictions = quant_aware_model.predict(x_test, verbose=0)
    assert predictions.shape == (len(x_test), 10) and np.all(np.isfinite(predictions))

    # tfmot's documented save and load: the same bits come back.
    path = tmp_path / "quant_aware.keras"
    quant_aware_model.save(path)
    with quantize_scope({config_cls.__name__: config_cls}):
        restored = keras.models.load_model(path)
    assert np.array_equal(restored.predict(x_test, verbose=0), predictions)


def test_documented_8bit_program_learns_as_well_as_float(digits):
    """tfmot's 'quantize the whole model' example: 8-bit QAT reaches the accuracy of the same
    float model trained the same way (seeded), within 3 points, on held-out digits."""
    x_train, y_train, x_test, y_test = digits
    accuracies = {}
    for name, transform in (("float", lambda m: m), ("qat", tfmot.quantization.keras.quantize_model)):
        keras.utils.set_random_seed(0)
        model = transform(conv_bn_relu_dense_model())
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=64, epochs=8, verbose=0)
        accuracies[name] = model.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracies["float"] > 0.85, accuracies
    assert accuracies["qat"] >= accuracies["float"] - 0.03, accuracies
