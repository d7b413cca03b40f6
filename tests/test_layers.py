"""QuantizeWrapper and the layer a QuantizeConfig sees.

A tfmot program written for Keras 2 reads and sets Keras 2 attribute names in its
QuantizeConfig (``layer.depthwise_kernel`` of a DepthwiseConv2D, which Keras 3 calls
``kernel``). Oracle: TF's fake-quant op on the float kernel with the trained range, run
through the float layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.compat import tfmot
from tests.conftest import same_bits, tf_fake_quant, to_numpy

pytestmark = pytest.mark.api
L = keras.layers


class Keras2DepthwiseConfig(tfmot.quantization.keras.QuantizeConfig):
    """A tfmot config as written for Keras 2's DepthwiseConv2D/1D."""

    def get_weights_and_quantizers(self, layer):
        assert isinstance(layer, (L.DepthwiseConv2D, L.DepthwiseConv1D)), "the view is still the layer's type"
        quantizer = kq.LastValueQuantizer(num_bits=4, per_axis=False, symmetric=True, narrow_range=True)
        return [(layer.depthwise_kernel, quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        layer.depthwise_kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


@pytest.mark.parametrize("layer_type,shape", [(L.DepthwiseConv2D, (2, 6, 6, 3)), (L.DepthwiseConv1D, (2, 7, 3))])
def test_a_keras2_config_reads_and_sets_depthwise_kernel(layer_type, shape):
    keras.utils.set_random_seed(0)
    layer = layer_type(3, depth_multiplier=2, name="dw")
    wrapper = kq.QuantizeWrapper(layer, Keras2DepthwiseConfig())
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    got = to_numpy(wrapper(x, training=True))
    ((weight, quantizer, variables),) = wrapper.quantized_weights()
    assert weight is layer.kernel
    kernel = to_numpy(layer.kernel)
    fake = tf_fake_quant(kernel, to_numpy(variables["min_var"]), to_numpy(variables["max_var"]), 4, True)
    reference = layer_type(3, depth_multiplier=2, name="reference")
    reference.build(shape)
    reference.set_weights([fake, to_numpy(layer.bias)])
    want = to_numpy(reference(x))
    assert same_bits(got, want)
    assert not np.allclose(got, to_numpy(layer(x))), "the quantized kernel is used, not the float one"
    assert not hasattr(layer, "depthwise_kernel") or layer.depthwise_kernel is layer.kernel


def test_keras2_names_are_offered_only_where_keras3_renamed_them():
    """A name that the layer has neither in Keras 3 nor under a Keras 2 alias is still an error."""

    class ReadsMissing(Keras2DepthwiseConfig):
        def get_weights_and_quantizers(self, layer):
            return [(layer.pointwise_kernel, kq.LastValueQuantizer())]

    wrapper = kq.QuantizeWrapper(L.DepthwiseConv2D(3, name="dw"), ReadsMissing())
    with pytest.raises(AttributeError, match="pointwise_kernel"):
        wrapper(np.zeros((1, 5, 5, 2), "float32"))
