"""The ``.kqat`` artifact (``keras_qat.export.save_artifact``) and the integer runtime.

Oracles: the QAT model's own inference (which reproduces TFLite's integer kernels, itself
tested against the LiteRT interpreter in test_export_tflite.py), the LiteRT interpreter's
reference kernels on the same 8-bit model, and the packed sizes computed from the model's
tensors. The digits CNN is issue 4's: Conv+BN+ReLU, DepthwiseConv+BN+ReLU6, a residual
Add+ReLU, MaxPool, Concatenate, AveragePool, GlobalAveragePool, Dense+BN+ReLU, softmax.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import ops as qops
from keras_qat import runtime
from keras_qat.export import ArtifactError, compare, save_artifact, to_tflite
from keras_qat.format import container
from tests.conftest import digits_cnn, digits_data, fit_briefly, qat_inference

pytestmark = pytest.mark.api

needs_exact_inference = pytest.mark.skipif(
    not qops.exact_integer_arithmetic(),
    reason="the QAT model reproduces integer kernels only with int64/float64 on the backend",
)

#: (weight bits, activation bits); the first convolution and the classifier stay at 8 bits.
#: W4A4 and W3A8 take NBitScheme's default method there (LSQ); W4A8 and W2A8 min/max ranges,
#: so that both are covered below 8 bits.
BIT_WIDTHS = [(8, 8), (4, 8), (4, 4), (3, 8), (2, 8)]
#: The widths that also run on JAX and PyTorch: the integer arithmetic is one code path for
#: every width, which these two (min/max at 8 bits, LSQ at 4) exercise on each backend.
EVERY_BACKEND = {(8, 8), (4, 4)}


def _width(weight_bits: int, activation_bits: int):
    skip = pytest.mark.skipif(
        (weight_bits, activation_bits) not in EVERY_BACKEND and keras.backend.backend() != "tensorflow",
        reason="this width runs on TensorFlow; W8A8 and W4A4 on every backend",
    )
    return pytest.param(weight_bits, activation_bits, id=f"W{weight_bits}A{activation_bits}", marks=skip)
METHODS = {(4, 8): "minmax", (2, 8): "minmax"}


def _scheme(weight_bits: int, activation_bits: int):
    eight = {"weight_bits": 8, "activation_bits": 8}
    method = METHODS.get((weight_bits, activation_bits), "auto")
    return kq.schemes.NBitScheme(weight_bits, activation_bits, overrides={"conv1": eight, "classifier": eight}, method=method)


@pytest.fixture(scope="module")
def digits():
    return digits_data()


def _trained(digits, weight_bits, activation_bits):
    images, labels = digits
    keras.utils.set_random_seed(1)
    model = kq.quantize_model(digits_cnn(), _scheme(weight_bits, activation_bits))
    fit_briefly(model, images[:1400], labels[:1400], epochs=2)
    return model


def _assert_identical(actual: np.ndarray, expected: np.ndarray, integer_model) -> None:
    """Every output element equal; on failure, how many differ and by how many output steps."""
    steps = np.rint(np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / float(integer_model.output_grids[0].scale))
    assert np.array_equal(actual, expected), f"{np.mean(steps == 0):.4%} identical, up to {steps.max():.0f} steps apart"


@needs_exact_inference
@pytest.mark.parametrize("weight_bits,activation_bits", [_width(w, a) for w, a in BIT_WIDTHS])
def test_runtime_computes_what_the_qat_model_computes(digits, tmp_path, weight_bits, activation_bits):
    images, labels = digits
    model = _trained(digits, weight_bits, activation_bits)
    path = save_artifact(model, tmp_path / "digits.kqat")
    integer_model = runtime.load(path)
    held_out, truth = images[1400:], labels[1400:]

    got = integer_model.run(held_out)
    want = qat_inference(model, held_out)
    _assert_identical(got, want, integer_model)
    runtime_accuracy = np.mean(np.argmax(got, -1) == truth)
    qat_accuracy = np.mean(np.argmax(want, -1) == truth)
    assert abs(runtime_accuracy - qat_accuracy) <= 0.005


@pytest.fixture(scope="module")
def eight_bit(request, tmp_path_factory):
    """The default 8-bit scheme (per-tensor Dense, which the TFLite converter requires), and
    its artifact. On TensorFlow only: the tests that take it check the artifact and the NumPy
    runtime (integer I/O, damaged files, bad inputs), the same on every backend; each backend's
    own export runs in test_runtime_computes_what_the_qat_model_computes."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("checks the artifact and the NumPy runtime, which no backend changes; runs on TensorFlow")
    model = request.getfixturevalue("digits_qat_8bit")
    directory = tmp_path_factory.mktemp("artifact")
    return model, save_artifact(model, directory / "digits.kqat"), directory


def _litert_reference(path, x: np.ndarray) -> np.ndarray:
    """The output of the LiteRT model at ``path`` on ``x``, from its reference kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite conversion needs TensorFlow")
def test_runtime_computes_what_litert_computes_at_8_bits(digits, eight_bit):
    """Exactly up to the softmax (the model cut at its logits, exported both ways); with the
    softmax, at most one step apart: LiteRT's int8 SOFTMAX approximates the exponential its
    own way, and a probability within those approximations' error of a half step rounds to the
    other neighbour (README, "What inference computes")."""
    model, path, directory = eight_bit
    held_out = digits[0][1400:]
    logits = keras.Model(model.inputs, model.get_layer("quant_classifier").output)
    logits_model = runtime.load(save_artifact(logits, directory / "logits.kqat"))
    logits_check = to_tflite(logits, directory / "logits.tflite")
    _assert_identical(logits_model.run(held_out), _litert_reference(logits_check.path, held_out), logits_model)
    # The LiteRT interpreter's and the QAT model's own agreement, for the same inputs:
    assert compare(logits, logits_check.path, held_out).identical_fraction == 1.0

    integer_model = runtime.load(path)
    litert = _litert_reference(to_tflite(model, directory / "digits.tflite").path, held_out)
    steps = np.rint(np.abs(integer_model.run(held_out) - litert) / float(integer_model.output_grids[0].scale))
    assert steps.max() <= 1


def test_integer_mode_takes_and_returns_codes(digits, eight_bit):
    _, path, _ = eight_bit
    integer_model = runtime.load(path)
    held_out = digits[0][1400:1432]
    (grid,) = integer_model.input_grids
    codes = runtime.kernels.quantize(held_out, grid)
    out_codes = integer_model.run(codes, integer_io=True)
    assert np.issubdtype(out_codes.dtype, np.integer)
    (out_grid,) = integer_model.output_grids
    np.testing.assert_array_equal(runtime.kernels.dequantize(out_codes, out_grid), integer_model.run(held_out))
    with pytest.raises(ValueError, match="integer codes"):
        integer_model.run(held_out, integer_io=True)


def test_loading_and_running_an_artifact_imports_neither_keras_nor_tensorflow(digits, eight_bit, tmp_path):
    model, path, _ = eight_bit
    held_out = digits[0][1400:1416]
    np.save(tmp_path / "x.npy", held_out)
    script = (
        "import sys, numpy as np\n"
        "import keras_qat.runtime\n"
        f"out = keras_qat.runtime.load({str(path)!r}).run(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        "loaded = sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules)\n"
        "print('loaded:', ','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded:", result.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), runtime.load(path).run(held_out))


@pytest.mark.parametrize("weight_bits,activation_bits", [(4, 8), (3, 8), (2, 8)])
def test_tensors_take_their_bit_width_in_the_file(digits, tmp_path, weight_bits, activation_bits):
    keras.utils.set_random_seed(0)
    model = kq.quantize_model(digits_cnn(), _scheme(weight_bits, activation_bits))
    model(digits[0][:64], training=True)
    path = save_artifact(model, tmp_path / "m.kqat")
    manifest, payload = container.read(path)
    manifest_bytes = len(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    parameter_bits = 0
    per_channel = 0
    for op in manifest["ops"]:
        for name, weight in op["weights"].items():
            count = int(np.prod(weight["shape"]))
            parameter_bits += count * weight["bits"]
            assert weight["nbytes"] == (count * weight["bits"] + 7) // 8, (op["layer"], name)
            per_channel += 8 * len(weight.get("scale", []))  # a float32 scale and an int32 zero point
        if op["layer"] == "quant_dw":
            assert op["weights"]["kernel"]["bits"] == weight_bits
    bound = 1.02 * (parameter_bits / 8 + per_channel) + manifest_bytes
    file_size = path.stat().st_size
    assert file_size <= bound, (file_size, bound)
    assert len(payload) <= parameter_bits / 8 + len(manifest["ops"])  # at most a padding byte per tensor


# ---- bad input -------------------------------------------------------------------------------


def test_truncated_corrupted_and_unknown_version_artifacts_are_refused(eight_bit, tmp_path):
    _, path, _ = eight_bit
    data = path.read_bytes()
    truncated = tmp_path / "truncated.kqat"
    truncated.write_bytes(data[:-40])
    with pytest.raises(ArtifactError, match="truncated"):
        runtime.load(truncated)
    corrupted = tmp_path / "corrupted.kqat"
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="checksum"):
        runtime.load(corrupted)
    future = tmp_path / "future.kqat"
    future.write_bytes(data[:8] + struct.pack("<I", container.FORMAT_VERSION + 1) + data[12:])
    with pytest.raises(ArtifactError, match="version"):
        runtime.load(future)


def test_an_op_the_runtime_lacks_is_named_with_its_layer(eight_bit, tmp_path):
    _, path, _ = eight_bit
    manifest, payload = container.read(path)
    manifest["ops"][3]["op"] = "fft"
    layer = manifest["ops"][3]["layer"]
    edited = tmp_path / "edited.kqat"
    edited.write_bytes(container.encode(manifest, payload))
    with pytest.raises(runtime.UnsupportedOpError, match=rf"layer '{layer}' needs op 'fft'"):
        runtime.load(edited)


def test_a_nan_weight_is_refused_naming_the_layer(digits, tmp_path):
    keras.utils.set_random_seed(0)
    model = kq.quantize_model(digits_cnn())
    model(digits[0][:32], training=True)
    dense = model.get_layer("quant_classifier").layer
    kernel = keras.ops.convert_to_numpy(dense.kernel).copy()
    kernel[0, 0] = np.nan
    dense.kernel.assign(kernel)
    with pytest.raises(ValueError, match="quant_classifier.*NaN"):
        save_artifact(model, tmp_path / "nan.kqat")
    assert not (tmp_path / "nan.kqat").exists()


def test_a_layer_without_an_integer_op_is_refused_naming_it(tmp_path):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(4, name="fc")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    base = keras.Model(inputs, x)
    annotated = keras.models.clone_model(
        base, clone_function=lambda layer: kq.quantize_annotate_layer(layer) if layer.name == "fc" else layer
    )
    model = kq.quantize_apply(annotated)
    with pytest.raises(ValueError, match="'norm'"):
        save_artifact(model, tmp_path / "float.kqat")


@needs_exact_inference
def test_one_dimensional_ops_and_tabulated_activations_run_as_in_the_qat_model(tmp_path):
    """Conv1D with SAME padding and dilation, ZeroPadding1D, max and average pooling with
    SAME padding (partial windows), sigmoid, tanh and hard-swish as tables, a global mean."""
    L = keras.layers
    inputs = keras.Input((20, 3))
    x = L.Conv1D(6, 3, padding="same", dilation_rate=2, activation="relu", name="conv")(inputs)
    x = L.ZeroPadding1D((1, 2), name="pad")(x)
    x = L.MaxPooling1D(3, strides=2, padding="same", name="max")(x)
    a = L.Activation("sigmoid", name="sigmoid")(L.Conv1D(4, 1, name="to_sigmoid")(x))
    b = L.Activation("tanh", name="tanh")(L.Conv1D(4, 1, name="to_tanh")(x))
    c = L.Activation("hard_swish", name="hard_swish")(L.Conv1D(4, 1, name="to_hard_swish")(x))
    x = L.Concatenate(name="concat")([a, b, c])
    x = L.AveragePooling1D(3, strides=2, padding="same", name="avg")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    outputs = L.Dense(3, name="fc")(x)
    keras.utils.set_random_seed(2)
    model = kq.quantize_model(keras.Model(inputs, outputs))
    data = np.random.default_rng(2).normal(size=(128, 20, 3)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(data, np.zeros((128, 3), "float32"), epochs=1, batch_size=32, verbose=0)

    integer_model = runtime.load(save_artifact(model, tmp_path / "seq.kqat"))
    ops_used = {op["op"] for op in integer_model.manifest["ops"]}
    assert {"conv", "pad", "max_pool", "lookup", "concatenate", "average_pool", "mean", "dense"} <= ops_used
    want = qat_inference(model, data)
    _assert_identical(integer_model.run(data), want, integer_model)


@needs_exact_inference
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="runs on TensorFlow: the artifact's int64 biases and their arithmetic are NumPy's on every backend, "
    "and 16-bit fake quantization is the numerics subset's (test_ops, 2..16 bits) on each",
)
def test_sixteen_bit_models_run_with_int64_biases(digits, tmp_path):
    """At 16 bits the biases need int64 and the accumulators leave int32. Those layers keep
    fake quantization in the QAT model (its graph has no wider integers), which rounds once
    where the integer kernel rounds twice, so outputs may differ by a few 2**-16 steps; the
    predictions agree."""
    images, labels = digits
    keras.utils.set_random_seed(4)
    model = kq.quantize_model(digits_cnn(), kq.schemes.NBitScheme(16, 16))
    fit_briefly(model, images[:1400], labels[:1400], epochs=1)
    path = save_artifact(model, tmp_path / "wide.kqat")
    manifest, _ = container.read(path)
    assert any(w["encoding"] == "int64" for op in manifest["ops"] for w in op["weights"].values())
    held_out = images[1400:]
    got = runtime.load(path).run(held_out)
    want = qat_inference(model, held_out)
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.99


def test_an_add_of_three_inputs_and_a_collapsed_range_are_refused_naming_the_layer(tmp_path):
    L = keras.layers
    inputs = keras.Input((4,))
    a, b, c = (L.Dense(3, name=f"fc_{i}")(inputs) for i in range(3))
    model = kq.quantize_model(keras.Model(inputs, L.Add(name="sum3")([a, b, c])))
    data = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"'quant_sum3'.*ADD of 3 inputs"):
        model(data, training=True)
        save_artifact(model, tmp_path / "sum3.kqat")
    collapsed = kq.quantize_model(keras.Model(inputs, L.ReLU(name="dead")(L.Dense(2, name="fc")(inputs))))
    collapsed(data, training=True)
    (quantizer, variables), = collapsed.get_layer("quant_dead").output_quantizers()
    variables["min_var"].assign(0.0)  # a ReLU that never fired: its range is [0, 0]
    variables["max_var"].assign(0.0)
    with pytest.raises(ValueError, match=r"range of layer 'quant_fc' is empty.*calibrate"):
        save_artifact(collapsed, tmp_path / "empty.kqat")
    assert not list(tmp_path.iterdir())


def _input_range(grid) -> tuple[float, float]:
    """The real values an input grid covers: its lowest and highest codes, dequantized."""
    return tuple(float((q - grid.zero_point) * grid.scale) for q in (grid.qmin, grid.qmax))


def test_run_refuses_inputs_that_are_not_what_the_model_takes_and_says_what_it_takes(digits, eight_bit):
    _, path, _ = eight_bit
    integer_model = runtime.load(path)
    images = digits[0][1400:1432]
    low, high = _input_range(integer_model.input_grids[0])
    expected = rf"input 'image'.*float values of shape \(batch, 8, 8, 1\).*\[{low:.4g}, {high:.4g}\]"
    with_nan = images.copy()
    with_nan[3, 2, 2, 0] = np.nan
    cases = [
        ((images * 255).astype(np.uint8), r"uint8.*integer_io=True"),
        (np.clip(np.rint(images * 127), -128, 127).astype(np.int8), r"int8.*integer_io=True"),
        (with_nan, r"1 NaN or infinite value"),
        (images[0], r"got shape \(8, 8, 1\).*batch axis"),
        (images[..., 0], r"got shape \(32, 8, 8\).*channel axis"),
        (images[:, :4], r"got shape \(32, 4, 8, 1\)"),
    ]
    for bad, why in cases:
        with pytest.raises(ValueError, match=expected + ".*" + why):
            integer_model.run(bad)
    codes = runtime.kernels.quantize(images, integer_model.input_grids[0])
    with pytest.raises(ValueError, match=r"input 'image'.*shape \(batch, 8, 8, 1\).*got shape \(8, 8, 1\)"):
        integer_model.run(codes[0], integer_io=True)
    # What the messages ask for runs, and agrees with the QAT model's integer inference.
    assert integer_model.run(images.astype(np.float64)).shape == (32, 10)
    np.testing.assert_array_equal(integer_model.run(images[:1]), integer_model.run(images)[:1])
