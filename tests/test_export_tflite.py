"""TFLite export: ``keras_qat.export.to_tflite`` and ``compare``.

Oracles: the LiteRT interpreter (``ai_edge_litert``) run directly on the flatbuffer, its op
and tensor tables, and exact integer arithmetic on the int8 codes; the QAT model's own range
variables for the expected scales. No expected number is hard-coded.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export import AgreementReport, TFLiteCheck, compare, to_tflite
from keras_qat.export.tflite import layer_of_tensor
from tests.conftest import digits_cnn, digits_data, fit_briefly

L = keras.layers

needs_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TFLite conversion traces the model with TensorFlow"
)


def _interpreter(path, **kwargs):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), **kwargs)


def _run_interpreter(path, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], list[dict]]:
    """Raw outputs and output details of the flatbuffer at ``path`` on ``inputs``."""
    interpreter = _interpreter(path)
    for detail, array in zip(interpreter.get_input_details(), inputs):
        interpreter.resize_tensor_input(detail["index"], array.shape)
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    details = interpreter.get_output_details()
    return [interpreter.get_tensor(d["index"]) for d in details], details


def _quantize_int8(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """TFLite's QUANTIZE: round half away from zero, then clamp to int8."""
    scaled = x.astype(np.float32) / np.float32(scale)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + zero_point
    return np.clip(rounded, -128, 127).astype(np.int8)


# --------------------------------------------------------------------------------------
# The digits CNN
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory, digits_qat_8bit):
    """The digits CNN, quantized and fine-tuned 2 epochs, converted with float and int8 I/O."""
    images, _ = digits_data()
    model = digits_qat_8bit
    directory = tmp_path_factory.mktemp("digits")
    float_check = to_tflite(model, directory / "digits.tflite")
    int8_check = to_tflite(model, str(directory / "digits_int8.tflite"), int8_io=True)
    return model, images[1400:], float_check, int8_check


@pytest.fixture(scope="module")
def digits_logits_export(tmp_path_factory, digits_qat_8bit):
    """The same QAT model up to its logits (the quantized Dense before the softmax), converted."""
    model = digits_qat_8bit
    logits = keras.Model(model.inputs, model.get_layer("quant_classifier").output)
    check = to_tflite(logits, tmp_path_factory.mktemp("digits_logits") / "logits.tflite")
    return logits, digits_data()[0][1400:], check


def _assert_agrees(report: AgreementReport, check: TFLiteCheck):
    message = f"{report}\n{check}"
    assert report.identical_fraction == 1.0, message
    assert report.max_step_difference == 0, message
    assert report.argmax_agreement == 1.0, message


def _assert_agrees_up_to_softmax_ties(report: AgreementReport, check: TFLiteCheck):
    """A model that ends in a softmax: LiteRT's int8 SOFTMAX approximates the exponential its
    own way, and keras-qat's integer softmax (the ``.kqat`` one: a fixed-point table normalized
    in integers) can round a probability that lies within those approximations' error of a
    half step to the other neighbour: one step on that output (measured: 1 of 3970 outputs of
    this model, a probability of 207.4997/256). Everything before the softmax is exact
    (:func:`test_digits_cnn_tflite_agrees_with_the_qat_model_exactly_up_to_the_softmax`)."""
    message = f"{report}\n{check}"
    assert report.max_step_difference <= 1, message
    assert report.argmax_agreement == 1.0, message


@needs_tensorflow
def test_digits_cnn_converts_to_integer_only_ops_each_quantized_once(digits_export):
    _, _, check, _ = digits_export
    assert check.path.is_file()
    assert check.float_ops == [], str(check)
    assert check.redundant_quantize_pairs == [], str(check)
    assert check.ok


@needs_tensorflow
def test_digits_cnn_tflite_agrees_with_the_qat_model_exactly_up_to_the_softmax(digits_logits_export, digits_export):
    logits, held_out, logits_check = digits_logits_export
    report = compare(logits, logits_check.path, held_out)
    assert report.samples == len(held_out)
    _assert_agrees(report, logits_check)
    model, held_out, check, _ = digits_export
    _assert_agrees_up_to_softmax_ties(compare(model, check.path, held_out), check)


@needs_tensorflow
def test_int8_io_has_int8_inputs_and_outputs_and_agrees(digits_export):
    model, held_out, _, check = digits_export
    interpreter = _interpreter(check.path)
    assert [d["dtype"] for d in interpreter.get_input_details()] == [np.int8]
    assert [d["dtype"] for d in interpreter.get_output_details()] == [np.int8]
    _assert_agrees_up_to_softmax_ties(compare(model, check.path, held_out), check)


@needs_tensorflow
def test_int8_io_computes_the_same_integers_as_float_io(digits_export):
    """Only the boundary conversions differ: the int8 model's output codes, dequantized, are
    the float model's outputs, on inputs quantized as the float model's QUANTIZE does."""
    _, held_out, float_check, int8_check = digits_export
    int8_detail = _interpreter(int8_check.path).get_input_details()[0]
    codes = _quantize_int8(held_out, *int8_detail["quantization"])
    (int8_out,), (out_detail,) = _run_interpreter(int8_check.path, [codes])
    (float_out,), _ = _run_interpreter(float_check.path, [held_out])
    scale, zero_point = out_detail["quantization"]
    np.testing.assert_array_equal((int8_out.astype(np.float32) - zero_point) * np.float32(scale), float_out)


# --------------------------------------------------------------------------------------
# Per-channel depthwise scales
# --------------------------------------------------------------------------------------


def _kernel_range(layer) -> tuple[np.ndarray, np.ndarray]:
    """The QAT kernel range variables of a folded or wrapped layer."""
    if isinstance(layer, kq.QuantizeFoldedBatchNorm):
        variables = layer.kernel_vars
    else:
        (_, _, variables), = layer.quantized_weights()
    return np.asarray(variables["min_var"]), np.asarray(variables["max_var"])


@needs_tensorflow
def test_depthwise_multiplier_2_weight_scales_are_the_qat_scales_per_channel(tmp_path):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 6, 3), name="x")
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw_folded")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw_plain")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(4, activation="softmax", name="out")(x)
    model = kq.quantize_model(keras.Model(inputs, outputs))
    data = np.random.default_rng(2).normal(size=(128, 6, 6, 3)).astype("float32")
    fit_briefly(model, data, np.arange(128) % 4)
    path = tmp_path / "dw.tflite"
    to_tflite(model, path)

    expected = {}  # channel count -> (layer, QAT scale per channel)
    for name, channels in (("quant_dw_folded", 6), ("quant_dw_plain", 12)):
        layer = model.get_layer(name)
        assert isinstance(layer, kq.QuantizeFoldedBatchNorm) == (name == "quant_dw_folded")
        low, high = _kernel_range(layer)
        assert low.shape == (channels,)  # in_channels * depth_multiplier
        expected[channels] = (name, (high.astype(np.float64) - low) / (2**8 - 2))

    interpreter = _interpreter(path)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    seen = set()
    for op in interpreter._get_ops_details():
        if op["op_name"] != "DEPTHWISE_CONV_2D":
            continue
        weights = tensors[op["inputs"][1]]
        params = weights["quantization_parameters"]
        channels = weights["shape"][-1]
        name, scales = expected[channels]
        assert weights["dtype"] == np.int8
        assert params["quantized_dimension"] == 3
        assert len(params["scales"]) == channels
        np.testing.assert_allclose(params["scales"], scales.astype(np.float32), rtol=2**-22, err_msg=name)
        seen.add(name)
    assert seen == {"quant_dw_folded", "quant_dw_plain"}


# --------------------------------------------------------------------------------------
# What cannot be exported
# --------------------------------------------------------------------------------------


def _small_model() -> keras.Model:
    inputs = keras.Input((6,), name="x")
    x = L.Dense(8, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


@needs_tensorflow
@pytest.mark.parametrize("weight_bits,activation_bits", [(8, 16), (16, 8)])
def test_more_than_8_bits_is_refused_naming_the_layer_and_the_way_out(tmp_path, weight_bits, activation_bits):
    scheme = kq.NBitScheme(weight_bits=weight_bits, activation_bits=activation_bits)
    model = kq.quantize_model(_small_model(), scheme)
    path = tmp_path / "wide.tflite"
    with pytest.raises(ValueError, match="quant_hidden") as error:
        to_tflite(model, path)
    assert "16 bits" in str(error.value)
    assert "save_artifact" in str(error.value) and "to_onnx" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_other_backends_are_refused_naming_the_backend(tmp_path, monkeypatch):
    model = kq.quantize_model(_small_model())
    if keras.backend.backend() == "tensorflow":
        monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="'jax'.*KERAS_BACKEND=tensorflow|KERAS_BACKEND=tensorflow"):
        to_tflite(model, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# Atomic write
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_qat_model():
    keras.utils.set_random_seed(3)
    model = kq.quantize_model(_small_model())
    model(np.random.default_rng(3).normal(size=(32, 6)).astype("float32"), training=True)
    return model


@needs_tensorflow
def test_a_failed_conversion_leaves_no_file_and_no_temporary(tmp_path, monkeypatch, small_qat_model):
    import tensorflow as tf

    def fail(self):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "convert", fail)
    with pytest.raises(RuntimeError, match="conversion failed"):
        to_tflite(small_qat_model, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


@needs_tensorflow
def test_a_failed_write_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch, small_qat_model):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous")

    def fail(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        to_tflite(small_qat_model, str(path))
    assert list(tmp_path.iterdir()) == [path]
    assert path.read_bytes() == b"previous"


@needs_tensorflow
def test_a_successful_conversion_replaces_the_file_with_a_loadable_model(tmp_path, small_qat_model):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous")
    check = to_tflite(small_qat_model, str(path))
    assert check.path == path
    assert list(tmp_path.iterdir()) == [path]
    assert [op["op_name"] for op in _interpreter(path)._get_ops_details()]  # parses


# --------------------------------------------------------------------------------------
# The check: float ops and requantizations, named by layer
# --------------------------------------------------------------------------------------


def _names(entries) -> set[tuple[str, str]]:
    return {(entry.op, entry.layer) for entry in entries}


@needs_tensorflow
def test_a_layer_kept_in_float_inside_a_nested_model_is_reported_by_its_name(tmp_path):
    keras.utils.set_random_seed(4)
    inner_inputs = keras.Input((6, 6, 4))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_quantized")(inner_inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    block = keras.Model(inner_inputs, L.Dense(3, name="dense_float")(x), name="block")
    inputs = keras.Input((6, 6, 4), name="x")
    scheme = kq.Default8BitScheme(overrides={"dense_float": None})
    model = kq.quantize_model(keras.Model(inputs, block(inputs)), scheme)
    model(np.random.default_rng(4).normal(size=(16, 6, 6, 4)).astype("float32"), training=True)

    check = to_tflite(model, tmp_path / "float_layer.tflite")
    assert not check.ok
    assert check.redundant_quantize_pairs == []
    # Oracle: the interpreter's op table. Every op that touches a float tensor, apart from
    # the boundary QUANTIZE/DEQUANTIZE, is reported, and no other.
    interpreter = _interpreter(check.path)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    graph_outputs = {d["index"] for d in interpreter.get_output_details()}
    expected = set()
    for op in interpreter._get_ops_details():
        touched = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if not any(np.issubdtype(tensors[i]["dtype"], np.floating) for i in touched):
            continue
        if op["op_name"] == "QUANTIZE" and op["inputs"][0] in graph_inputs:
            continue
        if op["op_name"] == "DEQUANTIZE" and op["outputs"][0] in graph_outputs:
            continue
        expected.add(op["index"])
    assert {entry.index for entry in check.float_ops} == expected
    assert ("FULLY_CONNECTED", "dense_float") in _names(check.float_ops)
    assert "dense_float" in str(check)


@needs_tensorflow
def test_a_second_quantizer_on_a_quantized_tensor_is_reported_as_redundant(tmp_path):
    inputs = keras.Input((5,), name="x")
    once = kq.QuantizeLayer(kq.FixedQuantizer(init_min=0.0, init_max=1.0), name="first_range")(inputs)
    twice = kq.QuantizeLayer(kq.FixedQuantizer(init_min=0.0, init_max=3.0), name="second_range")(once)
    check = to_tflite(keras.Model(inputs, twice), tmp_path / "twice.tflite")
    assert check.float_ops == []
    (entry,) = check.redundant_quantize_pairs
    # Oracle: the interpreter's op table. The converter either requantizes int8 -> int8, or
    # dequantizes and quantizes again; the entry is that op.
    interpreter = _interpreter(check.path)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    op = ops[entry.index]
    assert op["op_name"] == entry.op
    if entry.op == "QUANTIZE":
        assert tensors[op["inputs"][0]]["dtype"] == np.int8
        assert entry.layer == "second_range"
    else:
        assert entry.op == "DEQUANTIZE"
        consumers = [c["op_name"] for c in ops if op["outputs"][0] in list(c["inputs"])]
        assert consumers == ["QUANTIZE"]
        assert entry.layer == "first_range" and "second_range" in entry.detail


def test_tensor_names_are_attributed_to_the_innermost_longest_layer_name():
    names = ["block", "quant_conv", "quant_conv_2", "conv"]
    nested = "functional_1/block_1/quant_conv_1/conv_1/convolution"
    assert layer_of_tensor(nested, ["block", "quant_conv"]) == "quant_conv"
    assert layer_of_tensor("functional_1/quant_conv_2/BiasAdd", names) == "quant_conv_2"
    assert layer_of_tensor("functional_1/quant_conv_2_1/BiasAdd", names) == "quant_conv_2"
    assert layer_of_tensor("a/b/Relu;functional_1/quant_conv_1/add", ["quant_conv"]) == "quant_conv"
    assert layer_of_tensor("functional_1/unrelated_1/Relu", names) is None


# --------------------------------------------------------------------------------------
# compare, against exact integer arithmetic
# --------------------------------------------------------------------------------------


def _two_in_two_out() -> keras.Model:
    a = keras.Input((6,), name="a")
    b = keras.Input((4,), name="b")
    x = L.Add(name="sum")([L.Dense(8, activation="relu", name="da")(a), L.Dense(8, activation="relu", name="db")(b)])
    return keras.Model([a, b], [L.Dense(3, name="head_3")(x), L.Dense(5, name="head_5")(x)])


@needs_tensorflow
def test_compare_counts_steps_as_the_int8_codes_differ(tmp_path):
    keras.utils.set_random_seed(5)
    model = kq.quantize_model(_two_in_two_out())
    rng = np.random.default_rng(5)
    a, b = (rng.normal(size=(200, n)).astype("float32") for n in (6, 4))
    model([a, b], training=True)
    path = tmp_path / "two.tflite"
    to_tflite(model, path, int8_io=True)

    by_list = compare(model, path, [a, b])
    by_dict = compare(model, path, {"b": b, "a": a})
    assert by_list == by_dict
    assert [o.name for o in by_list.per_output] == list(model.output_names)

    # Oracle: the interpreter's int8 codes against the QAT outputs' codes on the same grid.
    interpreter = _interpreter(path)
    codes = [_quantize_int8(x, *d["quantization"]) for x, d in zip((a, b), interpreter.get_input_details())]
    raw, details = _run_interpreter(path, codes)
    qat = [np.asarray(t) for t in model([a, b], training=False)]
    differences, agreeing_rows = [], []
    for name, expected_out, report in zip(model.output_names, qat, by_list.per_output):
        index = [i for i, r in enumerate(raw) if r.shape == expected_out.shape]
        assert len(index) == 1, name
        scale, zero_point = details[index[0]]["quantization"]
        qat_codes = expected_out / scale + zero_point
        assert np.max(np.abs(qat_codes - np.rint(qat_codes))) < 1e-3  # the same grid
        difference = np.abs(raw[index[0]].astype(np.int64) - np.rint(qat_codes).astype(np.int64))
        rows = np.argmax(raw[index[0]], -1) == np.argmax(expected_out, -1)
        assert report.scale == pytest.approx(scale)
        assert report.identical_fraction == np.mean(difference == 0)
        assert report.max_step_difference == difference.max()
        assert report.argmax_agreement == np.mean(rows)
        differences.append(difference.ravel())
        agreeing_rows.append(rows)
    assert by_list.identical_fraction == np.mean(np.concatenate(differences) == 0)
    assert by_list.max_step_difference == max(d.max() for d in differences)
    assert by_list.argmax_agreement == np.mean(np.concatenate(agreeing_rows))
    assert "head_5" in str(by_list)


@needs_tensorflow
def test_compare_rejects_inputs_that_do_not_fit_the_model(tmp_path, small_qat_model):
    path = tmp_path / "m.tflite"
    to_tflite(small_qat_model, path)
    x = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="1 inputs"):
        compare(small_qat_model, path, [x, x])
    with pytest.raises(ValueError, match="no value for the model inputs"):
        compare(small_qat_model, path, {"other": x})
    with pytest.raises(ValueError, match="kernels must be one of"):
        compare(small_qat_model, path, x, kernels="fast")


@needs_tensorflow
def test_average_pooling_exports_without_a_requantization(tmp_path):
    """AveragePooling shares its input's range, as TFLite's int8 AVERAGE_POOL_2D requires."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = L.AveragePooling2D(2, name="avgpool")(x)
    outputs = L.Dense(3, name="dense")(L.Flatten()(x))
    model = kq.quantize_model(keras.Model(inputs, outputs))
    model(np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32"), training=True)
    check = to_tflite(model, tmp_path / "avgpool.tflite")
    assert check.float_ops == [] and check.redundant_quantize_pairs == [], str(check)


# --------------------------------------------------------------------------------------
# Inference reproduces the integer kernels (keras_qat.emulation)
# --------------------------------------------------------------------------------------


def _signed_model() -> keras.Model:
    """Kernels whose outputs are negative too (no ReLU), where rounding ties differ most:
    linear Conv2D, strided valid DepthwiseConv2D, a bare Add, a Concatenate of a tensor that
    also feeds a convolution, a mean, and a Dense. (Per-channel Conv1D and Dense are left
    out: the TFLite converter fails on their reshaped or transposed kernels.)"""
    inputs = keras.Input((12, 12, 3), name="x")
    a = L.Conv2D(6, 3, padding="same", name="conv")(inputs)
    b = L.DepthwiseConv2D(3, strides=2, padding="valid", name="dw")(a)
    c = L.Conv2D(6, 1, name="pointwise")(b)
    s = L.Add(name="add")([b, c])
    branch = L.Conv2D(4, 1, activation="relu", name="branch")(s)
    joined = L.Concatenate(name="concat")([s, branch])
    pooled = L.GlobalAveragePooling2D(name="gap")(joined)
    outputs = L.Dense(5, name="dense")(pooled)
    return keras.Model(inputs, outputs, name="signed")


@pytest.fixture(scope="module")
def signed_export(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = kq.quantize_model(_signed_model())
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 5, size=256)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("signed") / "signed.tflite"
    return model, rng.normal(size=(128, 12, 12, 3)).astype("float32"), to_tflite(model, path)


@needs_tensorflow
def test_inference_computes_what_the_reference_integer_kernels_compute(signed_export):
    model, x, check = signed_export
    assert check.ok, str(check)
    report = compare(model, check.path, x, kernels="reference")
    assert report.identical_fraction == 1.0, str(report)


@needs_tensorflow
def test_the_integer_inference_survives_saving_and_loading(signed_export, tmp_path):
    model, x, check = signed_export
    path = tmp_path / "signed.keras"
    model.save(path)
    with kq.quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x, training=False)), keras.ops.convert_to_numpy(model(x, training=False))
    )
    assert compare(loaded, check.path, x, kernels="reference").identical_fraction == 1.0


@needs_tensorflow
def test_while_exporting_inference_is_plain_fake_quantization(signed_export):
    """The converter must see TF's fake-quant ops: inside ``exporting()`` a quantized Dense
    computes ``fq(x @ fq(w) + b)`` with TF's own ops."""
    import tensorflow as tf

    from keras_qat import ops as qops

    model, x, _ = signed_export
    dense = model.get_layer("quant_dense")
    features = keras.Model(model.inputs, dense.input)(x, training=False)
    (weight, quantizer, qvars) = dense.quantized_weights()[0]
    (activation,) = dense.activation_quantizers()
    out_vars = activation.quantizer_vars
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        weight, qvars["min_var"], qvars["max_var"], num_bits=8, narrow_range=True
    )
    linear = tf.matmul(features, kernel) + dense.layer.bias
    expected = tf.quantization.fake_quant_with_min_max_vars(linear, out_vars["min_var"], out_vars["max_var"], num_bits=8)
    with qops.exporting():
        got = dense(features, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), expected.numpy())


def _bias_between_roundings(rng, input_scale: np.float64, weight_scale: np.float64, code: int):
    """A float32 bias within a few ulps of ``(code + 0.5) * input_scale * weight_scale`` that
    rounds to one code at the product of the float64 scales and to the other at the product
    of the float32 scales, or None where no such float32 lies between the two ties."""
    exact = input_scale * weight_scale
    stored = np.float64(np.float32(input_scale)) * np.float64(np.float32(weight_scale))
    tie = np.float32((code + 0.5) * exact)
    for step in rng.permutation(np.arange(-4, 5)):
        bias = tie
        for _ in range(abs(int(step))):
            bias = np.nextafter(bias, np.float32(np.sign(step) * np.inf), dtype=np.float32)
        at_exact, at_stored = (np.floor(np.float64(bias) / p + 0.5) for p in (exact, stored))
        if at_exact != at_stored:
            return bias
    return None


@needs_tensorflow
def test_biases_are_quantized_at_the_converters_float64_scales(tmp_path):
    """The converter quantizes a bias at ``input_scale * weight_scale`` in the float64 scales
    it derives from the ranges, not in the float32 scales the flatbuffer stores. A bias
    between the two ties (a folded BatchNorm of an eagerly trained ResNet50 had two) lands on
    different int32 codes; with the output step equal to the bias step, one output step."""
    rng = np.random.default_rng(11)
    inputs = keras.Input((1, 1, 3), name="x")
    model = kq.quantize_model(keras.Model(inputs, L.Conv2D(16, 1, name="conv")(inputs)))
    in_min, in_max = np.float32(-2.1), np.float32(3.7)
    input_scale = (np.float64(in_max) - np.float64(in_min)) / 255
    target = np.float64(np.float32(0.05))  # output step and weight scale times input scale
    kernel_max, bias = np.zeros(16, np.float32), np.zeros(16, np.float32)
    for channel in range(16):
        found = None
        while found is None:
            kernel_max[channel] = np.float32(target / input_scale * 127 * rng.uniform(0.999, 1.001))
            weight_scale = 2 * np.float64(kernel_max[channel]) / 254
            found = _bias_between_roundings(rng, input_scale, weight_scale, int(rng.integers(-100, 100)))
        bias[channel] = found
    quantize, conv = model.get_layer("quantize_x"), model.get_layer("quant_conv")
    (_, _, kernel_vars), = conv.quantized_weights()
    (activation,) = conv.activation_quantizers()
    quantize.quantizer_vars["min_var"].assign(in_min)
    quantize.quantizer_vars["max_var"].assign(in_max)
    kernel_vars["min_var"].assign(-kernel_max)
    kernel_vars["max_var"].assign(kernel_max)
    activation.quantizer_vars["min_var"].assign(np.float32(-128 * target))
    activation.quantizer_vars["max_var"].assign(np.float32(127 * target))
    conv.layer.kernel.assign(rng.uniform(-1, 1, (1, 1, 3, 16)).astype(np.float32) * kernel_max)
    conv.layer.bias.assign(bias)
    check = to_tflite(model, tmp_path / "bias.tflite")
    assert check.ok, str(check)

    x = rng.uniform(in_min, in_max, (64, 1, 1, 3)).astype(np.float32)
    x[:8] = 0.0  # the accumulator is 0: the outputs are the requantized bias codes
    report = compare(model, check.path, x, kernels="reference")
    assert report.identical_fraction == 1.0, str(report)


# --------------------------------------------------------------------------------------
# Below 8 bits: int8 tensors holding the trained low-bit values on the trained scales
# --------------------------------------------------------------------------------------


def _weight_tensors(path) -> list[tuple[str, np.ndarray, int]]:
    """``(name, int8 values, channel axis)`` of every per-channel or per-tensor int8 constant
    that an op reads as its filter (the interpreter's tensor table is the oracle)."""
    interpreter = _interpreter(path)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    found = []
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        detail = tensors[int(op["inputs"][1])]
        assert detail["dtype"] == np.int8, detail
        axis = detail["quantization_parameters"]["quantized_dimension"]
        found.append((detail["name"], interpreter.get_tensor(detail["index"]), axis))
    return found


def _filter_types(path) -> dict[str, set[str]]:
    """The storage type of each kernel op's filter, from the flatbuffer (the interpreter shows
    INT4 tensors unpacked, as int8)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(open(path, "rb").read()), 0)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    found: dict[str, set[str]] = {}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = op_names[max(code.builtinCode, code.deprecatedBuiltinCode)]
            if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                found.setdefault(name, set()).add(type_names[subgraph.tensors[op.inputs[1]].type])
    return found


@needs_tensorflow
@pytest.mark.parametrize("weight_bits", [2, 3, 4, 8])
def test_dense_kernels_below_five_bits_deploy_as_int4(tmp_path, weight_bits):
    """Per-tensor Dense deploys as FULLY_CONNECTED, which takes INT4 filters from version 10;
    the reference kernels unpack them to the trained values, so the outputs do not move. An
    8-bit kernel stays INT8 even where its values would fit in four bits."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs))
    model = kq.quantize_model(keras.Model(inputs, outputs), kq.NBitScheme(weight_bits, 8, per_axis=False), target="tflite")
    x = np.random.default_rng(0).normal(size=(256, 12)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.zeros((256, 3)), epochs=1, verbose=0)
    check = to_tflite(model, tmp_path / "dense.tflite")
    report = compare(model, check.path, x)
    assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)
    assert _filter_types(check.path) == {"FULLY_CONNECTED": {"INT4" if weight_bits <= 4 else "INT8"}}


@needs_tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("weight_bits,activation_bits", [(4, 8), (4, 4)], ids=["W4A8", "W4A4"])
def test_low_bit_digits_cnn_deploys_exactly_on_its_trained_grid(tmp_path, weight_bits, activation_bits):
    keras.utils.set_random_seed(1)
    images, labels = digits_data()
    model = kq.quantize_model(digits_cnn(), kq.NBitScheme(weight_bits, activation_bits), target="tflite")
    fit_briefly(model, images[:1400], labels[:1400], epochs=1)
    check = to_tflite(model, tmp_path / "low_bit.tflite")
    assert check.float_ops == [] and check.redundant_quantize_pairs == [], str(check)
    report = compare(model, check.path, images[1400:])
    assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)
    weights = _weight_tensors(check.path)
    assert len(weights) == 5  # conv1, dw, conv_branch, fc and classifier (per-channel Dense as 1x1 CONV_2D)
    # INT4 storage where LiteRT's reference kernels take it; DEPTHWISE_CONV_2D's INT4 (v7) they lack.
    assert _filter_types(check.path) == {"CONV_2D": {"INT4"}, "DEPTHWISE_CONV_2D": {"INT8"}}
    limit = 2 ** (weight_bits - 1) - 1  # narrow range, symmetric
    for name, values, axis in weights:
        assert values.min() >= -limit and values.max() <= limit, name
        per_channel = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        assert max(len(np.unique(row)) for row in per_channel) <= 2**weight_bits, name


@needs_tensorflow
def test_compare_says_what_input_the_model_takes(tmp_path, small_qat_model):
    """Integer arrays taken as real values, NaNs, and a missing batch or feature axis are
    refused before anything runs, naming the input and what it takes."""
    path = tmp_path / "m.tflite"
    to_tflite(small_qat_model, path)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    with_nan = x.copy()
    with_nan[1, 2] = np.inf
    expected = r"compare: input 'x' of model '.*' takes float values of shape \(batch, 6\)"
    cases = [
        (np.clip(x * 40, -128, 127).astype(np.int8), r"got int8"),
        (np.clip(x * 40 + 128, 0, 255).astype(np.uint8), r"got uint8"),
        (with_nan, r"1 NaN or infinite value"),
        (x[0], r"got shape \(6,\).*batch axis"),
        (x[:, :5], r"got shape \(4, 5\)"),
    ]
    for bad, why in cases:
        with pytest.raises(ValueError, match=expected + ".*" + why):
            compare(small_qat_model, path, bad)
    assert compare(small_qat_model, path, x.astype(np.float64)).samples == 4
