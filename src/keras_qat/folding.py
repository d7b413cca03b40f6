"""A Conv/Dense/DepthwiseConv followed by BatchNormalization, trained as it is deployed.

A deployed integer model has no BatchNormalization: its scale is folded into the weights and
its shift into the bias, and the folded weights are what gets quantized. Quantizing the
layer's own weights and normalizing afterwards (tfmot's default for a separate BN) trains
on a grid that the deployed model does not have.

:class:`QuantizeFoldedBatchNorm` quantizes the folded weights ``w * gamma / sigma`` with
``sigma = sqrt(moving_variance + epsilon)`` and runs one convolution with them. In training
(until the statistics are frozen) it normalizes the output divided by the same per-channel
factor, which is the convolution with the float weights up to their quantization, with the
batch statistics, and updates the moving ones, as torch.ao's fused ConvBn modules do
(Krishnamoorthi 2018, section 3.2); the division is applied to the quantized kernel before
the convolution or to its output, whichever is smaller. In inference, and in training once
frozen, the output
is ``conv(x, quantized folded weights) + folded bias``: exactly the deployed computation.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_qat import emulation, linking
from keras_qat import ops as qops
from keras_qat.layers import resolved_spec, kernel_quantize, run_with_substitutes
from keras_qat.quantizers import Quantizer

_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

#: The batch size that decides where training divides by the BN factor when a model is traced
#: without a static batch size (:meth:`QuantizeFoldedBatchNorm._divides_kernel`).
ASSUMED_BATCH_SIZE = 32


def _deserialize_quantizer(value):
    if value is None or isinstance(value, Quantizer):
        return value
    return keras.saving.deserialize_keras_object(value)


#: The smallest normal float32.
_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def _batch_norm_factor(gamma, moving_variance, epsilon: float, xp=ops):
    """``gamma / sqrt(moving_variance + epsilon)`` per channel (gamma 1 where None); 1 where it is
    0 or subnormal. ``xp``: ``keras.ops``, or :mod:`keras_qat.numpy_ops`."""
    gamma = xp.ones_like(moving_variance) if gamma is None else gamma
    # gamma * rsqrt(...), not gamma / sqrt(...): graph optimizers (Grappler, the TFLite
    # converter's) rewrite the latter into the former, and the two differ in the last bit,
    # which moves the rare folded weight within an ulp of a half step to the next integer.
    factor = gamma * xp.rsqrt(moving_variance + epsilon)
    # A zero factor zeroes the folded channel; dividing by 1 instead keeps it finite, and
    # the normalized output there is beta either way. A subnormal one counts as zero: the
    # CPU kernels flush it to zero, NumPy (keras_qat.numpy_ops) would keep it.
    return xp.where(xp.abs(factor) < _SMALLEST_NORMAL, xp.ones_like(factor), factor)


def _folded_bias(factor, moving_mean, beta, bias):
    """The deployed bias ``beta + (bias - moving_mean) * factor`` (beta and bias 0 where None)."""
    return (0.0 if beta is None else beta) + ((0.0 if bias is None else bias) - moving_mean) * factor


def _deployed_parameters_fn(
    gamma, moving_variance, moving_mean, beta, bias, epsilon: float, range_count: int, *kernel_arguments, xp=ops
):
    """The BN factor and the integer parameters of the folded kernel, whose bias is the folded
    one, as the QAT model's inference computes them (``kernel_arguments``: the ``range_count``
    ranges, then the static values, of :class:`keras_qat.emulation.KernelParameterArguments`;
    ``xp`` as for :func:`keras_qat.emulation.kernel_parameters_fn`)."""
    factor = _batch_norm_factor(gamma, moving_variance, epsilon, xp)
    ranges, static = kernel_arguments[:range_count], kernel_arguments[range_count:]
    return factor, emulation.kernel_parameters_fn(*ranges, _folded_bias(factor, moving_mean, beta, bias), *static, xp=xp)


#: :func:`_deployed_parameters_fn` as one op per layer of an inference graph
#: (:func:`keras_qat.ops.memoized`): the fold and the parameters it feeds, recomputed only when
#: a range, the bias or a BN statistic changed (one op instead of two: each costs a call).
_deployed_parameters = qops.memoized(_deployed_parameters_fn, in_numpy=True)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantizeFoldedBatchNorm(keras.layers.Layer):
    """``layer`` (Conv1D, Conv2D, DepthwiseConv2D or Dense, linear, channels last) with the
    ``batch_norm`` that follows it folded in, weights quantized after folding.

    Args:
        layer: the convolution or Dense layer; its activation must be linear.
        batch_norm: the BatchNormalization on its output's last axis.
        weight_quantizer: quantizes the folded kernel (variables ``kernel_min``/``kernel_max``).
        output_quantizer: quantizes the normalized output; None when a following ReLU or
            Concatenate quantizes it instead.
        freeze_bn_after_steps: after this many training steps, stop using and updating batch
            statistics (Jacob et al. 2018): training then computes exactly what inference
            does. None never freezes.
    """

    def __init__(
        self,
        layer,
        batch_norm,
        weight_quantizer: Quantizer,
        output_quantizer: Quantizer | None = None,
        freeze_bn_after_steps: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", f"quant_{layer.name}")
        super().__init__(**kwargs)
        owner = f"QuantizeFoldedBatchNorm('{layer.name}' + '{batch_norm.name}')"
        weight_quantizer = _deserialize_quantizer(weight_quantizer)
        output_quantizer = _deserialize_quantizer(output_quantizer)
        if not isinstance(weight_quantizer, Quantizer):
            raise ValueError(f"{owner}: weight_quantizer must be a keras_qat Quantizer, got {weight_quantizer!r}.")
        if output_quantizer is not None and not isinstance(output_quantizer, Quantizer):
            raise ValueError(f"{owner}: output_quantizer must be a keras_qat Quantizer or None, got {output_quantizer!r}.")
        if freeze_bn_after_steps is not None and (
            isinstance(freeze_bn_after_steps, bool)
            or not isinstance(freeze_bn_after_steps, int)
            or freeze_bn_after_steps < 0
        ):
            raise ValueError(
                f"{owner}: freeze_bn_after_steps must be None or a non-negative int, got {freeze_bn_after_steps!r}."
            )
        self.layer = layer
        self.batch_norm = batch_norm
        self.weight_quantizer = weight_quantizer
        self.output_quantizer = output_quantizer
        self.freeze_bn_after_steps = freeze_bn_after_steps

    # ---- build ------------------------------------------------------------------------

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        output_shape = self.layer.compute_output_shape(input_shape)
        if not self.batch_norm.built:
            self.batch_norm.build(output_shape)
        self.kernel_vars = self.weight_quantizer.build(self.layer.kernel.shape, "kernel", self)
        self.kernel_spec = resolved_spec(self.weight_quantizer, self.layer.kernel.shape, "kernel", self)
        self.output_vars = (
            self.output_quantizer.build(output_shape, "output", self) if self.output_quantizer else None
        )
        self.bn_steps = None
        if self.freeze_bn_after_steps is not None:
            self.bn_steps = self.add_weight(name="bn_steps", shape=(), initializer="zeros", trainable=False)
        self.built = True

    # ---- the folded weights -------------------------------------------------------------

    def _factor(self):
        """``gamma / sqrt(moving_variance + epsilon)`` per output channel; 1 where it is 0."""
        bn = self.batch_norm
        return _batch_norm_factor(bn.gamma, bn.moving_variance, bn.epsilon)

    def _fold_kernel(self, factor):
        return self._per_output_channel(self.layer.kernel, factor)

    def _per_output_channel(self, kernel, vector):
        """``kernel`` (shaped as the layer's) times one value per output channel."""
        if isinstance(self.layer, _DEPTHWISE):
            vector = ops.reshape(vector, tuple(kernel.shape[-2:]))
        return kernel * vector

    def folded_bias(self, factor=None):
        """The deployed bias: ``beta + (bias - moving_mean) * factor``."""
        bn = self.batch_norm
        factor = self._factor() if factor is None else factor
        return _folded_bias(factor, bn.moving_mean, bn.beta, self._bias())

    def _bias(self):
        """The layer's bias variable, or None."""
        return self.layer.bias if getattr(self.layer, "use_bias", False) else None

    def unquantized_kernel(self):
        """The folded kernel before weight quantization: the real values its quantizer rounds."""
        return self._fold_kernel(self._factor())

    def folded_kernel(self, training: bool = False):
        """The deployed (quantized, folded) kernel, as inference computes it."""
        factor = self._factor()
        return self.weight_quantizer(self._fold_kernel(factor), training, self.kernel_vars)

    # ---- links to the grids of inputs and outputs (see keras_qat.linking) ----------------

    def accepts_output_target(self) -> bool:
        return self.output_quantizer is None and emulation.supports_kernel(self.layer, self.weight_quantizer)

    def _integer_inference(self, inputs):
        """The deployed integer kernel's output, or None where a grid is unknown."""
        if not emulation.supports_kernel(self.layer, self.weight_quantizer):
            return None
        sources = linking.input_sources(self)
        if self.output_quantizer is not None:
            target = emulation.OutputTarget(emulation.Source(self.output_quantizer, self.output_vars), "linear")
        else:
            target = linking.output_target(self)
        if target is None or len(sources) != 1 or sources[0] is None:
            return None
        arguments = emulation.kernel_parameter_arguments(self.layer, sources[0], self.kernel_source(), target)
        if arguments is None:
            return None
        bn = self.batch_norm
        factor, parameters = _deployed_parameters(
            bn.gamma, bn.moving_variance, bn.moving_mean, bn.beta, self._bias(), bn.epsilon,
            len(arguments.ranges), *arguments.ranges, *arguments.static,
        )
        factor = qops.with_static_shape(factor, tuple(bn.moving_variance.shape))
        kernel = self.weight_quantizer(self._fold_kernel(factor), False, self.kernel_vars)
        return emulation.kernel_output(self.layer, inputs, kernel, sources[0], arguments.kernel_source, parameters)

    # ---- call -------------------------------------------------------------------------

    def call(self, inputs, training=None):
        training = bool(training)
        exported = self._exported_linear(inputs, training)
        if exported is not None:
            return exported
        if emulation.enabled(training):
            outputs = self._integer_inference(inputs)
            if outputs is not None:
                return outputs
        factor = self._factor()
        if training:
            outputs = self._train(inputs, factor)
        else:
            quantized = self.weight_quantizer(self._fold_kernel(factor), False, self.kernel_vars)
            outputs = self._convolve(inputs, quantized) + self.folded_bias(factor)
        if self.output_quantizer is not None:
            outputs = self.output_quantizer(outputs, training, self.output_vars)
        elif emulation.enabled(training):
            outputs = emulation.onto_consumer_grid(outputs, linking.output_consumer(self))
        return outputs

    def _exported_linear(self, inputs, training: bool):
        """While an exporter traces the model: the folded layer traced the exporter's way (its
        ``linear`` hook, see :func:`keras_qat.ops.exporting`); None where ``call`` serves."""
        linear = qops.export_hook("linear")
        if linear is None or training:
            return None
        factor = self._factor()
        quantize = kernel_quantize(self.weight_quantizer, self.kernel_vars)
        outputs = linear(self.layer, inputs, self._fold_kernel(factor), quantize, self.weight_quantizer.per_axis)
        if outputs is None:
            return None
        outputs = outputs + self.folded_bias(factor)
        if self.output_quantizer is not None:
            outputs = self.output_quantizer(outputs, False, self.output_vars)
        return outputs

    def _frozen(self):
        """Whether training has stopped using batch statistics (a boolean tensor)."""
        return self.bn_steps >= float(self.freeze_bn_after_steps)

    def _convolve(self, inputs, kernel):
        """The wrapped layer's output for ``kernel`` in place of its own, without its bias.

        Its linear map itself where :func:`keras_qat.emulation.linear_map` has it: calling the
        layer with a zero bias would add that bias, and sum the output's gradient for it, on
        every step. Otherwise the layer's own call, its variables substituted.
        """
        if emulation.has_linear_map(self.layer):
            return emulation.linear_map(self.layer, inputs, kernel)
        substitutes = {id(self.layer.kernel): kernel}
        if getattr(self.layer, "use_bias", False):
            substitutes[id(self.layer.bias)] = ops.zeros(self.layer.bias.shape, self.layer.bias.dtype)
        return run_with_substitutes(lambda: self.layer(inputs), self.layer.variables, substitutes)

    def _train(self, inputs, factor):
        """The training output: the convolution with the quantized folded kernel divided by
        ``factor`` (which is the convolution with the float kernel up to its quantization),
        normalized with its batch statistics; once frozen, the deployed output.

        The division by ``factor`` is done on the kernel or on the output, whichever is
        smaller (:meth:`_divides_kernel`): conv(x, q(w f) / f) is conv(x, q(w f)) / f up to
        rounding, and the product and its gradient each cost a pass over the tensor divided.
        """
        frozen = None if self.bn_steps is None else self._frozen()
        folding = self._factor_for_batch_statistics(factor, frozen)
        quantized = self._quantized_in_training(folding, constant=frozen is None)
        if self._divides_kernel(inputs):
            unfolded_kernel = self._per_output_channel(quantized, 1.0 / folding)
            if frozen is not None:
                unfolded_kernel = ops.where(frozen, quantized, unfolded_kernel)
            unfolded = deployed = self._convolve(inputs, unfolded_kernel)
        else:
            deployed = self._convolve(inputs, quantized)
            unfolded = deployed * (1.0 / folding)
        outputs = self._normalize_with_batch_statistics(unfolded, frozen)
        if frozen is None:
            return outputs
        return ops.where(frozen, deployed + self.folded_bias(factor), outputs)

    def _quantized_in_training(self, folding, constant: bool):
        """``q(kernel * folding)``, updating the kernel's range.

        Where ``folding`` is a constant (statistics that never freeze) and the quantizer scales
        its channels itself (:attr:`~keras_qat.quantizers.Quantizer.takes_channel_factor`, per
        output channel), it gets the kernel and the factor: its fused kernels multiply inside,
        so the backward pass keeps the kernel variable instead of a folded copy as large
        (ResNet50 at batch 32: peak resident memory 1655 against 1736 MiB, three runs each).
        """
        quantizer = self.weight_quantizer
        if constant and getattr(quantizer, "takes_channel_factor", False) and self._quantized_per_output_channel():
            return quantizer(self.layer.kernel, True, self.kernel_vars, factor=folding)
        return quantizer(self._fold_kernel(folding), True, self.kernel_vars)

    def _quantized_per_output_channel(self) -> bool:
        """Whether the kernel's ranges are one per output channel, the BN factor's layout."""
        rank = len(self.layer.kernel.shape)
        output_axes = (rank - 2, rank - 1) if isinstance(self.layer, _DEPTHWISE) else (rank - 1,)
        return self.kernel_spec is not None and tuple(self.kernel_spec.axes) == output_axes

    def _divides_kernel(self, inputs) -> bool:
        """Whether the kernel has no more elements than the output (of a batch of
        :data:`ASSUMED_BATCH_SIZE` where the batch size is not known when traced)."""
        output_shape = tuple(self.layer.compute_output_shape(tuple(inputs.shape)))
        batch = output_shape[0] if output_shape[0] is not None else ASSUMED_BATCH_SIZE
        return qops.static_size(self.layer.kernel.shape) <= batch * qops.static_size(output_shape[1:])

    def _factor_for_batch_statistics(self, factor, frozen):
        """The factor that folds and unfolds the kernel while batch statistics normalize the
        output: without a gradient there (with one once frozen).

        Under the straight-through estimator ``q(w f) / f`` is ``w``: the two gradients with
        respect to ``f``, through the fold and through the division, cancel up to the
        quantization error, and each costs passes over the kernel as large as the
        convolutions' on a late ResNet50 layer. Gamma's gradient then comes, as in the float
        network, from the normalization's scale.
        """
        constant = ops.stop_gradient(factor)
        if frozen is None:
            return constant
        return ops.where(frozen, factor, constant)

    def _normalize_with_batch_statistics(self, unfolded, frozen):
        """Normalize ``unfolded + bias`` with its batch statistics and move the moving ones
        (unless ``frozen``, a boolean tensor, or None where statistics never freeze).

        The bias shifts the mean and is removed by the normalization, so the normalized
        tensor is that of ``unfolded``: one fused kernel each way on TensorFlow
        (:func:`keras_qat.ops.batch_normalize`), cheaper than Keras 3's own BatchNormalization.
        """
        bn = self.batch_norm
        gamma = bn.gamma if bn.gamma is not None else 1.0
        beta = bn.beta if bn.beta is not None else 0.0
        batch_bias = None
        if getattr(self.layer, "use_bias", False):
            batch_bias = self.layer.bias
            # Normalization removes the bias: its gradient is exactly zero. Saying so (on the
            # offset, a vector, not on the output) keeps optimizers from warning that the
            # variable has no gradient.
            beta = beta + 0.0 * self.layer.bias
        normalized, mean, variance = qops.batch_normalize(unfolded, gamma, beta, bn.epsilon)
        momentum = bn.momentum
        # The moving statistics are assigned, never differentiated: no stop_gradient needed.
        if batch_bias is not None:
            mean = mean + batch_bias
        new_mean = bn.moving_mean * momentum + mean * (1.0 - momentum)
        new_variance = bn.moving_variance * momentum + variance * (1.0 - momentum)
        if frozen is None:
            bn.moving_mean.assign(new_mean)
            bn.moving_variance.assign(new_variance)
            return normalized
        bn.moving_mean.assign(ops.where(frozen, bn.moving_mean.value, new_mean))
        bn.moving_variance.assign(ops.where(frozen, bn.moving_variance.value, new_variance))
        self.bn_steps.assign(self.bn_steps + 1.0)
        return normalized

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    # ---- introspection (as QuantizeWrapper) ----------------------------------------------

    def quantized_weights(self) -> list[tuple[Any, Quantizer, dict]]:
        """``(kernel variable, quantizer, quantizer variables)``; the quantizer sees the folded
        kernel, see :meth:`folded_kernel`."""
        return [(self.layer.kernel, self.weight_quantizer, self.kernel_vars)]

    def output_quantizers(self) -> list[tuple[Quantizer, dict]]:
        return [] if self.output_quantizer is None else [(self.output_quantizer, self.output_vars)]

    def kernel_source(self) -> emulation.Source:
        """The folded kernel's quantizer, variables and resolved spec."""
        return emulation.Source(self.weight_quantizer, self.kernel_vars, self.kernel_spec)

    # ---- serialization ----------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "layer": keras.saving.serialize_keras_object(self.layer),
                "batch_norm": keras.saving.serialize_keras_object(self.batch_norm),
                "weight_quantizer": keras.saving.serialize_keras_object(self.weight_quantizer),
                "output_quantizer": None
                if self.output_quantizer is None
                else keras.saving.serialize_keras_object(self.output_quantizer),
                "freeze_bn_after_steps": self.freeze_bn_after_steps,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        batch_norm = keras.saving.deserialize_keras_object(config.pop("batch_norm"), custom_objects=custom_objects)
        return cls(layer, batch_norm, **config)


__all__ = ["QuantizeFoldedBatchNorm"]
