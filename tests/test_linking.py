"""Links between layers and the grids of their tensors, read from the functional graph."""

import keras
import numpy as np
import pytest

import keras_qat
from keras_qat import linking
from keras_qat.layers import QuantizeLayer

L = keras.layers


def _quantized(model):
    """Links are read from the functional graph alone: the model need not have run (on JAX a
    first eager call compiles each op, most of these tests' time there)."""
    return keras_qat.quantize_model(model)


def _conv_relu_concat():
    inputs = keras.Input((6, 6, 2))
    a = L.Conv2D(4, 3, padding="same", name="conv_a")(inputs)
    a = L.ReLU(name="relu_a")(a)
    b = L.Conv2D(4, 1, name="conv_b")(a)
    x = L.Concatenate(name="concat")([a, b])
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(3, name="fc")(x)
    return keras.Model(inputs, outputs)


def _layer(model, name):
    for layer in model.layers:
        if layer.name.endswith(name):
            return layer
    raise KeyError(name)


def _same_grid(a, b) -> bool:
    return a is not None and b is not None and a.variables["min_var"] is b.variables["min_var"]


@pytest.mark.api
def test_a_fused_relu_quantizes_the_convolution_before_it():
    qat = _quantized(_conv_relu_concat())
    conv_a, relu_a = _layer(qat, "conv_a"), _layer(qat, "relu_a")
    assert linking.output_consumer(conv_a) is relu_a
    relu_grid = relu_a.output_quantizers()[0][1]
    assert linking.output_target(conv_a).source.variables is relu_grid


@pytest.mark.api
def test_a_concatenate_shares_the_grid_its_input_already_has():
    qat = _quantized(_conv_relu_concat())
    concat, relu_a, conv_b = _layer(qat, "concat"), _layer(qat, "relu_a"), _layer(qat, "conv_b")
    inherited = linking.inherited_source(concat)
    assert inherited is not None and inherited.variables is relu_a.output_quantizers()[0][1]
    # conv_b has no output quantizer of its own: the Concatenate quantizes it, onto that grid.
    assert _same_grid(linking.output_target(conv_b).source, inherited)


@pytest.mark.api
def test_grids_pass_through_layers_that_only_move_values():
    qat = _quantized(_conv_relu_concat())
    links = linking.link_model(qat)
    fc = _layer(qat, "fc")
    (source,) = links[fc.name].input_sources
    assert _same_grid(source, linking.inherited_source(_layer(qat, "concat")))
    assert all(not isinstance(layer, keras.layers.InputLayer) for layer in qat.layers if layer.name in links)


@pytest.mark.api
def test_links_are_read_from_the_graph_and_never_stored_on_layers():
    qat = _quantized(_conv_relu_concat())
    linking.link_model(qat)
    for layer in qat.layers:
        assert not any("link" in name for name in vars(layer)), layer.name


@pytest.mark.api
def test_a_loaded_model_is_linked_as_the_saved_one(tmp_path):
    qat = _quantized(_conv_relu_concat())
    path = tmp_path / "model.keras"
    qat.save(path)
    loaded = keras.models.load_model(path)
    saved_links = linking.link_model(qat)
    loaded_links = linking.link_model(loaded)
    assert saved_links.keys() == loaded_links.keys()
    for name, links in saved_links.items():
        other = loaded_links[name]
        assert [s is None for s in links.input_sources] == [s is None for s in other.input_sources], name
        assert (links.output_consumer is None) == (other.output_consumer is None), name
        assert (links.inherited is None) == (other.inherited is None), name
        # Each loaded link points at the loaded model's own variables.
        loaded_variables = {id(v) for v in loaded.variables}
        for source in other.input_sources:
            if source is not None:
                assert id(source.variables["min_var"]) in loaded_variables, name
    x = np.random.default_rng(0).uniform(-1, 1, (4, 6, 6, 2)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x, training=False)), keras.ops.convert_to_numpy(qat(x, training=False))
    )


@pytest.mark.api
def test_only_the_model_input_quantizer_is_a_model_input():
    qat = _quantized(_conv_relu_concat())
    quantize_layers = [layer for layer in qat.layers if isinstance(layer, QuantizeLayer)]
    assert quantize_layers and all(linking.quantizes_model_input(layer) for layer in quantize_layers)
    assert not linking.quantizes_model_input(_layer(qat, "fc"))


@pytest.mark.api
def test_densely_concatenated_graphs_link_in_one_walk():
    """Every Concatenate's grid depends on its inputs' grids, which depend on earlier ones: the
    lookups share one memo per query, so a 24-deep dense block links at once (a walk without
    it revisits the graph exponentially and would not finish)."""
    inputs = keras.Input((4, 4, 2))
    features = L.Conv2D(2, 1, activation="relu")(inputs)
    for depth in range(24):
        grown = L.Conv2D(2, 1, activation="relu", name=f"grow_{depth}")(features)
        features = L.Concatenate(name=f"concat_{depth}")([features, grown])
    outputs = L.Dense(2)(L.Flatten()(L.MaxPooling2D(4)(features)))
    qat = _quantized(keras.Model(inputs, outputs))
    links = linking.link_model(qat)
    last = _layer(qat, "concat_23")
    assert links[last.name].inherited is not None
