"""keras_qat.export.to_onnx: a QDQ graph that ONNX Runtime runs to the QAT model's outputs.

Oracles: ONNX Runtime (CPU), with its graph optimizations off and on, against the QAT model's
inference (whose arithmetic the LiteRT tests check against the reference kernels); the
integers that ``quantized_weights`` reads out; ``onnx.checker``.
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import keras_qat as kq
from keras_qat import runtime
from keras_qat.errors import NotDeployableError
from keras_qat.export import compare, diagnose, quantized_weights, save_artifact, to_onnx
from tests.conftest import digits_cnn, digits_data, fit_briefly

L = keras.layers
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exactness is checked on the default backend")

SCHEMES = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}


@pytest.fixture(scope="module", params=list(SCHEMES))
def digits_onnx(request, tmp_path_factory):
    """The digits CNN (BN, residual Add, depthwise, pools, concat, softmax) at each scheme,
    fine-tuned one epoch, written to ONNX at the default opset."""
    weight_bits, activation_bits = SCHEMES[request.param]
    keras.utils.set_random_seed(0)
    images, labels = digits_data()
    model = kq.quantize_model(digits_cnn(), kq.NBitScheme(weight_bits, activation_bits))
    fit_briefly(model, images[:800], labels[:800])
    path = to_onnx(model, tmp_path_factory.mktemp(request.param) / "digits.onnx")
    return model, path, images[1400:], weight_bits


@pytest.mark.parametrize("kernels", ["reference", "default"])
def test_digits_cnn_computes_in_onnx_runtime_what_the_qat_model_computes(digits_onnx, kernels):
    model, path, held_out, _ = digits_onnx
    report = compare(model, path, held_out, kernels=kernels)
    assert report.deployed == "ONNX" and report.samples == len(held_out)
    assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)


def _graph(path):
    model = onnx.load(str(path))
    constants = {t.name: t for t in model.graph.initializer}
    return model, constants


def test_the_graph_passes_the_checker_and_quantizes_each_tensor_once(digits_onnx):
    model, path, _, _ = digits_onnx
    graph, _ = _graph(path)
    onnx.checker.check_model(graph, full_check=True)
    nodes = graph.graph.node
    quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
    consumers = {name: [n for n in nodes if name in n.input] for q in quantize for name in q.output}
    # Every QuantizeLinear feeds DequantizeLinear nodes only: a QDQ pair per quantized tensor.
    assert quantize and all(c and all(n.op_type == "DequantizeLinear" for n in c) for c in consumers.values())
    # One per tensor of the integer form: the model input and every op's output.
    from keras_qat.export.artifact import build

    manifest, _ = build(model)
    assert len(quantize) == len(manifest["ops"])


def test_kernels_are_stored_as_the_integers_quantized_weights_reads_out(digits_onnx):
    model, path, _, weight_bits = digits_onnx
    _, constants = _graph(path)
    expected = {name: tensor for name, tensor in quantized_weights(model).items() if name.endswith("/kernel")}
    conv1 = expected["quant_conv1/kernel"]
    stored = constants["quant_conv1/kernel"]
    assert stored.data_type == (TensorProto.INT4 if weight_bits <= 4 else TensorProto.INT8)
    # Keras (kh, kw, C_in, C_out) -> ONNX (C_out, C_in, kh, kw), one scale per output channel.
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int64), np.transpose(conv1.values, (3, 2, 0, 1)))
    np.testing.assert_array_equal(numpy_helper.to_array(constants["quant_conv1/kernel/scale"]), conv1.scale.reshape(-1))
    fc = expected["quant_classifier/kernel"]
    np.testing.assert_array_equal(numpy_helper.to_array(constants["quant_classifier/kernel"]).astype(np.int64), fc.values)


def test_opset_13_holds_four_bit_codes_in_int8_on_the_trained_grid(tmp_path):
    keras.utils.set_random_seed(1)
    images, labels = digits_data()
    model = kq.quantize_model(digits_cnn(), kq.NBitScheme(3, 4))
    fit_briefly(model, images[:400], labels[:400])
    path = to_onnx(model, tmp_path / "opset13.onnx", opset=13)
    graph, constants = _graph(path)
    assert graph.opset_import[0].version == 13
    kernels = [t for name, t in constants.items() if name.endswith("/kernel")]
    assert kernels and all(t.data_type == TensorProto.INT8 for t in kernels)
    assert all(np.abs(numpy_helper.to_array(t)).max() <= 3 for t in kernels)  # 3-bit narrow range: -3..3
    report = compare(model, path, images[1400:])
    assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)


def _small_cnn():
    inputs = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(x))
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def test_sixteen_bit_activations_are_int16_from_opset_21_and_refused_before(tmp_path):
    keras.utils.set_random_seed(2)
    model = kq.quantize_model(_small_cnn(), kq.NBitScheme(8, 16))
    rng = np.random.default_rng(2)
    x = rng.random((32, 8, 8, 1)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, rng.random((32, 3)), epochs=1, verbose=0)
    with pytest.raises(NotDeployableError, match=r"(?s)^onnx: .*layer 'quant_conv' holds 16-bit integers.*opset=21"):
        to_onnx(model, tmp_path / "old.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []
    path = to_onnx(model, tmp_path / "int16.onnx")
    graph, constants = _graph(path)
    types = {constants[n.input[2]].data_type for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    assert TensorProto.INT16 in types and types <= {TensorProto.INT8, TensorProto.INT16}  # the input stays 8-bit
    # At 16 bits the QAT model keeps fake quantization; the integer runtime is the oracle.
    integer_model = runtime.load(save_artifact(model, tmp_path / "int16.kqat"))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x})
    np.testing.assert_array_equal(got, integer_model.run(x))


def test_refusals_name_every_layer_and_leave_no_file(tmp_path):
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2DTranspose(3, 2, name="transpose")(inputs)
    x = L.UpSampling2D(name="upsample")(L.Conv2D(3, 3, name="conv")(x))
    model = kq.quantize_model(keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x))))
    verdict = diagnose(model, target="onnx")
    with pytest.raises(NotDeployableError, match="^onnx: 2 layer") as error:
        to_onnx(model, tmp_path / "m.onnx")
    assert set(error.value.reasons) == set(verdict.refused) == {"quant_transpose", "quant_upsample"}
    assert "layer 'quant_upsample'" in str(error.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotDeployableError, match="^onnx: "):
        kq.quantize_model(keras.Model(inputs, L.Dense(2)(L.Flatten()(x))), target="onnx")


def test_a_refused_export_keeps_the_previous_file(tmp_path):
    model = kq.quantize_model(_small_cnn())
    model(np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32"), training=True)
    path = to_onnx(model, tmp_path / "m.onnx")
    before = path.read_bytes()
    model.get_layer("quant_head").layer.kernel.assign(np.full((4, 3), np.nan, "float32"))
    with pytest.raises(NotDeployableError, match="layer 'quant_head'.*'kernel' holds NaN or Inf"):
        to_onnx(model, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("opset", [12, 99, "21", True])
def test_an_opset_out_of_range_is_refused_saying_which_are_taken(tmp_path, opset):
    model = kq.quantize_model(_small_cnn())
    with pytest.raises(ValueError, match=r"to_onnx: opset must be an integer from 13"):
        to_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_compare_names_the_formats_it_runs(tmp_path):
    model = kq.quantize_model(_small_cnn())
    with pytest.raises(ValueError, match="neither a .tflite nor an .onnx file"):
        compare(model, tmp_path / "m.pb", np.zeros((1, 8, 8, 1), "float32"))


def _dilated_same():
    inputs = keras.Input((9, 9, 2))
    x = L.Conv2D(3, 3, dilation_rate=2, padding="same", name="dilated")(inputs)
    y = L.Reshape((81, 3))(x)
    y = L.Conv1D(2, 3, dilation_rate=3, padding="same", name="dilated_1d")(y)
    return keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(y)))


def _pools_and_branches():
    """Two inputs, two outputs; an average pool whose `same` windows are cut at the border; an
    uneven zero padding; a concatenation of branches on different grids."""
    a, b = keras.Input((7, 7, 2), name="a"), keras.Input((7, 7, 2), name="b")
    x = L.AveragePooling2D(3, strides=2, padding="same", name="avg")(L.Conv2D(4, 3, padding="same", name="conv_a")(a))
    y = L.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(L.Conv2D(4, 3, strides=2, name="conv_b")(b))
    merged = L.Concatenate(name="concat")([x, y])
    return keras.Model([a, b], [L.Dense(3, name="head")(L.GlobalAveragePooling2D()(merged)), L.Dense(2, name="side")(L.Flatten()(y))])


@pytest.mark.parametrize("build", [_dilated_same, _pools_and_branches], ids=lambda f: f.__name__.strip("_"))
def test_layouts_beyond_the_digits_cnn_run_exactly(tmp_path, build):
    keras.utils.set_random_seed(3)
    model = kq.quantize_model(build())
    rng = np.random.default_rng(3)
    x = [rng.normal(size=(16,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]
    model.compile("adam", "mse")
    model.fit(x if len(x) > 1 else x[0], [rng.normal(size=(16,) + tuple(t.shape[1:])) for t in model.outputs], epochs=1, verbose=0)
    path = to_onnx(model, tmp_path / "m.onnx")
    for kernels in ("reference", "default"):
        report = compare(model, path, x if len(x) > 1 else x[0], kernels=kernels)
        assert report.identical_fraction == 1.0 and report.max_step_difference == 0, str(report)


def test_a_file_without_a_suffix_is_run_by_what_it_holds(tmp_path):
    model = kq.quantize_model(_small_cnn())
    x = np.random.default_rng(4).random((8, 8, 8, 1)).astype("float32")
    model(x, training=True)
    path = to_onnx(model, tmp_path / "model")
    assert compare(model, path, x).deployed == "ONNX"
