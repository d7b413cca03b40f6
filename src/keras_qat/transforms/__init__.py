"""Graph rewrites that make the QAT model compute what the deployed integer model computes.

A :class:`~keras_qat.transforms.plan.FusionPlan` is read off an annotated functional model
before ``quantize_apply`` rebuilds it:

* BatchNormalization folding: a Conv1D/Conv2D/DepthwiseConv2D/Dense whose only consumer is a
  BatchNormalization becomes one :class:`~keras_qat.folding.QuantizeFoldedBatchNorm`, with
  the BN scale folded into the weights before they are quantized;
* activation fusion: a layer whose only consumer is a ReLU or ReLU6 leaves its output
  unquantized, and the activation quantizes once, as TFLite fuses the two;
* Concatenate: inputs that feed only a concatenation leave quantization to it, so that all
  of them share its range, as TFLite's CONCATENATION requires.

Layers that only move values (max pooling, padding, reshapes) keep their input's range:
the schemes give them no quantizer.
"""

from keras_qat.transforms.plan import FusionPlan, plan_fusions

__all__ = ["FusionPlan", "plan_fusions"]
