"""keras_qat.export.targets: every layer deploys exactly to a target, or is refused up front.

Oracles: the LiteRT interpreter's reference kernels and ONNX Runtime (``compare``) and the NumPy integer runtime
against the QAT model's inference, element for element; the export itself for the verdicts
(``diagnose`` and ``quantize_model(target=...)`` must say what the export does).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import runtime
from keras_qat.errors import NotDeployableError
from keras_qat.export import compare, diagnose, save_artifact, to_onnx, to_tflite
from keras_qat.export.targets import refusals

L = keras.layers
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite conversion needs TensorFlow")


def _conv1d_bn_relu():
    inputs = keras.Input((16, 3))
    x = L.Conv1D(4, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Conv1D(4, 3, strides=2, name="strided")(x)
    return keras.Model(inputs, L.Dense(5, name="head")(L.Flatten()(x)))


def _separable_1d():
    inputs = keras.Input((16, 3))
    x = L.SeparableConv1D(4, 3, name="separable")(inputs)
    x = L.DepthwiseConv1D(3, depth_multiplier=2, name="depthwise")(L.ReLU()(x))
    return keras.Model(inputs, L.Dense(5, name="head")(L.GlobalAveragePooling1D()(x)))


def _mlp():
    inputs = keras.Input((12,))
    x = L.Dense(8, name="hidden")(inputs)
    x = L.ReLU()(L.BatchNormalization(name="bn")(x))
    return keras.Model(inputs, L.Dense(5, name="head")(x))


def _leaky():
    inputs = keras.Input((8, 8, 3))
    x = L.LeakyReLU(0.2, name="leaky")(L.Conv2D(4, 3, name="conv")(inputs))
    x = L.Conv2D(4, 3, name="conv2")(x)
    return keras.Model(inputs, L.Dense(5, name="head")(L.Flatten()(x)))


def _separable_bn_upsampled():
    inputs = keras.Input((6, 6, 3))
    x = L.SeparableConv2D(4, 3, depth_multiplier=2, padding="same", name="separable")(inputs)
    x = L.ReLU()(L.BatchNormalization(name="bn")(x))
    x = L.UpSampling2D((2, 3), name="upsample")(x)
    x = L.Conv2D(4, 3, name="conv")(x)
    return keras.Model(inputs, L.Dense(5, name="head")(L.Flatten()(x)))


def _trained(build, scheme, seed=0):
    keras.utils.set_random_seed(seed)
    model = build()
    q = kq.quantize_model(model, scheme)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32,) + tuple(model.input_shape[1:])).astype("float32")
    q.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, rng.integers(0, 5, 32), epochs=2, batch_size=16, verbose=0)
    return q, x


BUILDS = [_conv1d_bn_relu, _separable_1d, _mlp, _leaky, _separable_bn_upsampled]


@pytest.mark.parametrize("build", BUILDS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("per_axis", [True, False], ids=["per_channel", "per_tensor"])
def test_layers_beyond_2d_cnns_deploy_exactly_to_every_target(tmp_path, build, per_axis):
    q, x = _trained(build, kq.NBitScheme(8, 8, per_axis=per_axis))
    assert refusals(q, "tflite") == {}
    check = to_tflite(q, tmp_path / "m.tflite")
    assert check.ok, str(check)
    report = compare(q, check.path, x)
    assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)
    if build is _separable_bn_upsampled:  # the integer form has no upsampling op: refused, naming it
        assert set(refusals(q, "kqat")) == set(refusals(q, "onnx")) == {"quant_upsample"}
        return
    assert refusals(q, "kqat") == refusals(q, "onnx") == {}
    integer_model = runtime.load(save_artifact(q, tmp_path / "m.kqat"))
    want = keras.ops.convert_to_numpy(q(x, training=False))
    np.testing.assert_array_equal(integer_model.run(x), want)
    onnx_report = compare(q, to_onnx(q, tmp_path / "m.onnx"), x)  # ONNX Runtime, optimizations off
    assert onnx_report.identical_fraction == 1.0 and onnx_report.max_step_difference == 0, str(onnx_report)


def _unsupported_for_tflite():
    inputs = keras.Input((4, 4, 4, 2))
    x = L.Conv3D(3, 2, name="conv3d")(inputs)
    y = L.Reshape((3 * 3, 3 * 3))(x)
    y = L.ELU(name="elu")(L.Dense(6, name="dense")(y))
    return keras.Model(inputs, L.Dense(5, name="head")(L.Flatten()(y)))


def test_every_refused_layer_is_named_at_once_before_training(tmp_path):
    with pytest.raises(NotDeployableError) as error:
        kq.quantize_model(_unsupported_for_tflite(), target="tflite")
    assert set(error.value.reasons) == {"quant_conv3d", "quant_elu"}
    message = str(error.value)
    assert "2 layer(s)" in message and "CONV_3D" in message and "ELU" in message
    assert "overrides" in message  # the way out


def test_diagnose_and_the_export_give_the_same_verdict(tmp_path):
    q = kq.quantize_model(_unsupported_for_tflite())
    verdict = diagnose(q, target="tflite")
    assert not verdict.deployable and set(verdict.refused) == {"quant_conv3d", "quant_elu"}
    assert "target tflite: refuses 2 layer(s)" in str(verdict)
    with pytest.raises(NotDeployableError) as error:
        to_tflite(q, tmp_path / "m.tflite")
    assert error.value.reasons == verdict.refused
    assert list(tmp_path.iterdir()) == []
    # The .kqat runtime has no 3-D convolution either, and says so the same way.
    kqat = diagnose(q, target="kqat")
    with pytest.raises(NotDeployableError) as error:
        save_artifact(q, tmp_path / "m.kqat")
    assert error.value.reasons == kqat.refused and "quant_conv3d" in kqat.refused
    assert list(tmp_path.iterdir()) == []
    # ONNX is written from the same integer form: the same layers, with the target named.
    onnx = diagnose(q, target="onnx")
    with pytest.raises(NotDeployableError, match="^onnx: ") as error:
        to_onnx(q, tmp_path / "m.onnx")
    assert error.value.reasons == onnx.refused and set(onnx.refused) == set(kqat.refused)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained_mlp_weights() -> list[np.ndarray]:
    """The weights (ranges included) of ``_mlp`` trained at W8A8, trained once for the tests
    that spoil a copy."""
    q, _ = _trained(_mlp, kq.NBitScheme(8, 8))
    return q.get_weights()


@pytest.mark.parametrize("target", ["tflite", "kqat", "onnx"])
@pytest.mark.parametrize("variable", ["kernel", "activation_min"])
def test_non_finite_weights_and_ranges_are_refused_naming_layer_and_tensor(tmp_path, target, variable, trained_mlp_weights):
    q = kq.quantize_model(_mlp(), kq.NBitScheme(8, 8))
    q.set_weights(trained_mlp_weights)  # the trained model, before one of its tensors is spoilt
    layer = q.get_layer("quant_head")
    (found,) = [v for v in layer.weights if v.name == variable]
    found.assign(np.full(found.shape, np.inf if variable == "kernel" else np.nan, "float32"))
    path = tmp_path / f"m.{target}"
    with pytest.raises(NotDeployableError, match=rf"layer 'quant_head'.*'{variable}' holds NaN or Inf"):
        {"tflite": to_tflite, "kqat": save_artifact, "onnx": to_onnx}[target](q, path)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_target_is_refused():
    q = kq.quantize_model(_mlp())
    with pytest.raises(ValueError, match="target must be one of tflite, kqat, onnx"):
        diagnose(q, target="coreml")
    with pytest.raises(ValueError, match="unknown deployment target 'coreml'"):
        kq.quantize_model(_mlp(), target="coreml")
