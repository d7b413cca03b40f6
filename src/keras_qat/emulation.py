"""Inference that computes exactly what the deployed integer kernels compute.

Fake quantization rounds ``conv(x, w) + b`` once, in float. The deployed int8 kernel adds an
int32 bias (``b`` rounded at ``input_scale * weight_scale``) to an exact int32 accumulator
and requantizes with TFLite's fixed-point multiplier, which rounds twice
(:mod:`keras_qat.fixed_point`). The two differ by one step on a fraction of a percent of
the outputs of every layer, and deep or trained networks amplify those steps. So in
inference (``training=False``, and not while a converter traces the model, see
:func:`keras_qat.ops.exporting`) the quantized Conv/Dense/DepthwiseConv and Add layers
compute the integer pipeline itself; training keeps fake quantization and its gradients.

A layer needs three grids for that: its input's, its weights' and its output's. The input
grid belongs to the layer that produced the input (its output quantizer), possibly through
layers that only move values (max pooling, reshape, padding). The output grid is the
layer's own output quantizer, or, where a fused ReLU or a Concatenate quantizes the output
(:mod:`keras_qat.transforms`), that consumer's. :mod:`keras_qat.linking` reads both from the
functional graph. A layer without complete links keeps fake quantization in inference.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import keras
import numpy as np
from keras import ops

from keras_qat import integer
from keras_qat.integer.lowering import sum_of
from keras_qat import ops as qops
from keras_qat import fixed_point as fp
from keras_qat.errors import InexactInferenceWarning
from keras_qat.format.manifest import SOFTMAX_BITS
from keras_qat.grid import IntegerGrid, along_axes, codes_at_reciprocal, codes_at_scale, from_range, reciprocal_scale
from keras_qat.registry import CLAMP_ACTIVATIONS, activation_name, kind_of
from keras_qat.spec import TensorSpec
from keras_qat.quantizers import Quantizer

L = keras.layers

#: The kinds (:mod:`keras_qat.registry`) whose integer kernel this module reproduces.
KERNEL_OPS = ("dense", "conv", "depthwise_conv")


class Source(NamedTuple):
    """The quantizer (and its variables) that puts a tensor on its grid, and the tensor's
    description (:class:`~keras_qat.spec.TensorSpec`, resolved when the layer was built; None
    for a per-tensor activation or a quantizer that keeps none)."""

    quantizer: Quantizer
    variables: dict
    spec: TensorSpec | None = None


class OutputTarget(NamedTuple):
    """Where a layer's output is quantized when a consumer does it: that consumer's
    quantizer, and the activation (a clamp) the consumer applies first."""

    source: Source
    activation: str


def spec_of(source: Source) -> TensorSpec:
    """The description of ``source``'s tensor, resolved when its layer was built (otherwise, an
    activation's: one from its quantizer's settings, per tensor)."""
    if source.spec is not None:
        return source.spec
    quantizer = source.quantizer
    return TensorSpec(quantizer.num_bits, quantizer.narrow_range, getattr(quantizer, "symmetric", False))


def grid(source: Source) -> IntegerGrid:
    """The deployed grid of ``source``'s tensor from its range now (:func:`keras_qat.grid.from_range`,
    the converter's arithmetic), as tensors of the inference graph."""
    return spec_of(source).grid(*source.quantizer.range_of(source.variables), ops)


def exported_grid(source: Source) -> IntegerGrid:
    """:func:`grid` in NumPy (float32 scales, int64 zero points), as exporters write it."""
    lo, hi = (ops.convert_to_numpy(end) for end in source.quantizer.range_of(source.variables))
    return spec_of(source).grid(lo, hi, np)


#: Whether :func:`enabled` has warned that inference cannot be exact here.
_inexact_said = False


def enabled(training: bool) -> bool:
    """Whether inference reproduces the integer kernels in this call. Where the backend cannot
    (JAX without 64-bit types), says so once (:class:`keras_qat.errors.InexactInferenceWarning`)."""
    if training or qops.plain_fake_quant():
        return False
    if qops.exact_integer_arithmetic():
        return True
    global _inexact_said
    if _inexact_said:
        return False
    _inexact_said = True  # once per process, whatever the warning filters say
    warnings.warn(
        "keras_qat: on JAX without 64-bit types the QAT model's inference computes fake "
        "quantization instead of the deployed integer kernels, and can differ from the exported "
        "model by a step in some outputs. Enable them before JAX creates any array: "
        "jax.config.update('jax_enable_x64', True), or JAX_ENABLE_X64=1 in the environment.",
        InexactInferenceWarning,
    )
    return False


# ---- the arithmetic (lowered and executed by keras_qat.integer) ------------------------------


def centered_codes(x, g: IntegerGrid):
    """``q - zero_point`` of values on grid ``g``, as float64 (exact integers)."""
    return g.centered_codes(x, ops)


def _real(codes, out: IntegerGrid):
    """Codes on ``out`` (float32 tensors holding integers) as the real values they stand for;
    0 on an empty grid (scale 0)."""
    return (codes - out.zero_point) * out.scale


def linear_map(layer, x, w):
    """The layer's linear map (no bias, no activation) on ``x`` with kernel ``w``: what its
    integer kernel accumulates (:data:`KERNEL_OPS` kinds)."""
    op = kind_of(layer).integer_op
    if op == "dense":
        return ops.matmul(x, w)
    if op == "depthwise_conv":
        return ops.depthwise_conv(
            x, w, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate, data_format="channels_last"
        )
    return ops.conv(
        x, w, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate, data_format="channels_last"
    )


#: float32 sums integers exactly while every partial sum stays below 2**24.
_FLOAT32_EXACT = 2**24


def _accumulate(layer, x, w, terms: int, input_bits: int, weight_bits: int):
    """The exact integer accumulator of ``layer`` on centered codes ``x`` and ``w``: float32 where
    that holds it exactly, else float64.

    float32 convolutions are fast but exact only below 2**24. When the accumulator's bound
    (``terms`` products of at most ``2**input_bits`` by ``2**(weight_bits - 1)``) is too large,
    the reduction is split over the input channels into groups whose sums stay below it, each
    accumulated exactly in float32 and the partial sums added in float64: the same
    multiply-adds as one convolution. A depthwise convolution (no sum over channels) splits
    the input codes into high and low halves instead, ``x = hi * 2**p + lo``; float64
    convolutions (slow on CPU) are the last resort.
    """
    product_bound = 2 ** (input_bits + weight_bits - 1)
    if terms * product_bound < _FLOAT32_EXACT:
        return linear_map(layer, x, w)  # exact in float32; widened where the bias joins it
    channels = x.shape[-1]
    if not kind_of(layer).depthwise and channels is not None:
        per_channel = terms // int(channels)  # products per input channel: the kernel's window
        group = (_FLOAT32_EXACT - 1) // (product_bound * per_channel)
        if group >= 1:
            count = -(-int(channels) // group)  # balanced groups, none larger than ``group``
            parts = zip(qops.split_evenly(x, count, -1), qops.split_evenly(w, count, -2))
            return sum_of(ops.cast(linear_map(layer, x_part, w_part), "float64") for x_part, w_part in parts)
    low_bits = (input_bits + 1) // 2
    weight_bound = terms * 2 ** (weight_bits - 1)
    if weight_bound * 2 ** max(low_bits, input_bits - low_bits) < _FLOAT32_EXACT:
        base = float(2**low_bits)
        high = ops.floor(x / base)
        low = x - high * base
        return ops.cast(linear_map(layer, high, w), "float64") * base + ops.cast(linear_map(layer, low, w), "float64")
    return linear_map(layer, ops.cast(x, "float64"), ops.cast(w, "float64"))


def has_linear_map(layer) -> bool:
    """Whether :func:`linear_map` computes ``layer``'s linear map (its call without bias and
    activation, bit for bit): a Dense, Conv or DepthwiseConv, channels last, valid or same
    padding, one group."""
    return (
        kind_of(layer) is not None
        and kind_of(layer).integer_op in KERNEL_OPS
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and getattr(layer, "padding", "valid") in ("valid", "same")
        and getattr(layer, "groups", 1) == 1
    )


def supports_kernel(layer, weight_quantizer: Quantizer) -> bool:
    """Whether :func:`kernel_inference` reproduces ``layer``'s integer kernel."""
    return (
        has_linear_map(layer)
        and activation_name(getattr(layer, "activation", "linear")) in CLAMP_ACTIVATIONS
        and getattr(weight_quantizer, "symmetric", False)
    )


def accumulator_bound(layer, in_source: Source, kernel_source: Source) -> int:
    """The largest magnitude the layer's accumulator can reach, from its bit widths and its
    reduction size. Above 2**31 the kernel needs int64 accumulators and a product wider
    than 64 bits; :func:`kernel_inference` then leaves the layer to fake quantization, and
    the runtime computes it with exact integers."""
    return _reduction_terms(layer) * (2**in_source.quantizer.num_bits - 1) * 2 ** (kernel_source.quantizer.num_bits - 1)


def _reduction_terms(layer) -> int:
    """How many products each output of ``layer`` sums."""
    shape = tuple(layer.kernel.shape)
    depthwise = kind_of(layer).depthwise
    terms = 1
    for size in shape[:-2] if depthwise else shape[:-1]:
        terms *= int(size)
    return terms


def rounds_once(layer, weight_quantizer: Quantizer) -> bool:
    """Whether ``layer``'s deployed kernel requantizes with one rounding: TFLite's reference
    FULLY_CONNECTED does; its convolutions round twice, and so does a per-channel Dense, which
    deploys as a 1x1 CONV_2D (:mod:`keras_qat.export.tflite.trace`)."""
    return kind_of(layer).integer_op == "dense" and not weight_quantizer.per_axis


def kernel_inference(layer, inputs, kernel, bias, in_source: Source, kernel_source: Source, out: OutputTarget):
    """``layer``'s output as its deployed integer kernel computes it.

    Args:
        layer: the Conv/Dense/DepthwiseConv (its strides, padding, activation are read).
        inputs: values on ``in_source``'s grid.
        kernel: the fake-quantized kernel (on ``kernel_source``'s grid, symmetric).
        bias: the float bias per output channel, or None.
        out: the output's quantizer and the activation clamped in the output codes.

    Returns None where the accumulator could leave the int32 range (see
    :func:`accumulator_bound`).
    """
    arguments = kernel_parameter_arguments(layer, in_source, kernel_source, out)
    if arguments is None:
        return None
    parameters = _kernel_parameters(*arguments.ranges, bias, *arguments.static)
    return kernel_output(layer, inputs, kernel, in_source, arguments.kernel_source, parameters)


class KernelParameterArguments(NamedTuple):
    """What a kernel's integer parameters (:func:`kernel_parameters_fn`) are computed from, but its
    bias: ``kernel_parameters_fn(*ranges, bias, *static)``; and the kernel's source, its spec
    resolved."""

    ranges: tuple
    static: tuple
    kernel_source: Source


def kernel_parameter_arguments(layer, in_source: Source, kernel_source: Source, out: OutputTarget) -> KernelParameterArguments | None:
    """The arguments of ``layer``'s integer parameters (:class:`KernelParameterArguments`), or
    None where the accumulator could leave the int32 range (see :func:`accumulator_bound`)."""
    if accumulator_bound(layer, in_source, kernel_source) >= 2**31:
        return None
    if kernel_source.spec is None and callable(getattr(kernel_source.quantizer, "spec", None)):
        # A source built without its spec (a caller's own): resolved here from the layer's kernel.
        spec = kernel_source.quantizer.spec(tuple(layer.kernel.shape), "kernel", layer)
        kernel_source = kernel_source._replace(spec=spec)
    activation = activation_name(getattr(layer, "activation", "linear"))
    if activation == "linear":
        activation = out.activation
    return KernelParameterArguments(
        (*_range_tensors(in_source), *_range_tensors(kernel_source), *_range_tensors(out.source)),
        (
            _static(spec_of(in_source)), _static(spec_of(kernel_source)), _static(spec_of(out.source)), activation,
            rounds_once(layer, kernel_source.quantizer),
        ),
        kernel_source,
    )


def kernel_output(layer, inputs, kernel, in_source: Source, kernel_source: Source, parameters: tuple):
    """``layer``'s integer kernel on ``inputs`` and ``kernel`` (see :func:`kernel_inference`), given
    its integer parameters (:func:`kernel_parameters_fn`; ``kernel_source`` with its spec)."""
    in_reciprocal, w_reciprocal, bias_codes, multiplier, zero_point, low, high, out_scale, clipped_fits = parameters
    w_spec = spec_of(kernel_source)
    # A shared function traced for several shapes returns its outputs without static shapes;
    # the convolution needs its operands' channels known (Keras compiles a convolution of
    # unknown channels with XLA).
    if tuple(in_reciprocal.shape) != ():
        in_reciprocal = ops.reshape(in_reciprocal, ())
    w_reciprocal = qops.with_static_shape(w_reciprocal, (qops.channel_count(tuple(kernel.shape), w_spec.axes),) if w_spec.axes else ())
    x = codes_at_reciprocal(inputs, in_reciprocal, ops)
    w = codes_at_reciprocal(kernel, along_axes(w_reciprocal, w_spec.axes, tuple(kernel.shape), ops), ops)
    accumulator = _accumulate(
        layer, x, w, _reduction_terms(layer), in_source.quantizer.num_bits, kernel_source.quantizer.num_bits
    )
    tail = (accumulator, bias_codes, multiplier, zero_point, low, high, out_scale)
    output = _in_cheapest_form(_kernel_output, tail, clipped_fits)
    return qops.with_static_shape(output, accumulator.shape)


def _in_cheapest_form(tail, arguments: tuple, clipped_fits):
    """``tail.op_by_op(*arguments, form)`` (a requantization made by :func:`_requantization`,
    its first argument the largest tensor) in the cheaper ``"clipped"`` form where that is
    exact (``clipped_fits``), else in the ``"split"`` form, exact everywhere.

    A compiled tail takes ``clipped_fits`` and branches inside its one XLA kernel. A branch in
    the graph instead (a ``cond`` between two compiled calls) cost MobileNetV2 62 branch
    graphs: 13-20% of its first inference call and 12-44 MiB, measured in separate processes,
    against XLA compiling both forms. A tail that runs op by op takes the split form alone,
    with no branch to trace.
    """
    if qops.compiles(arguments[0], COMPILE_MIN_ELEMENTS):
        return tail.compiled(*arguments, clipped_fits)
    return tail.op_by_op(*arguments, "split")


class _Requantization(NamedTuple):
    """A requantization tail ``fn(*arguments, form)`` run op by op, and compiled as one XLA
    kernel that takes ``clipped_fits`` in place of the form and picks the form itself."""

    op_by_op: Callable
    compiled: Callable


def _requantization(fn) -> _Requantization:
    """``fn`` (``fn(*arguments, form)``) as a :class:`_Requantization`."""

    def in_either_form(*arguments):
        *arguments, clipped_fits = arguments
        return ops.cond(clipped_fits, lambda: fn(*arguments, "clipped"), lambda: fn(*arguments, "split"))

    return _Requantization(fn, qops.compiled(functools.wraps(fn)(in_either_form)))


def _static(spec: TensorSpec) -> tuple:
    """What a grid's arithmetic reads of ``spec``, as plain values: a shared function
    (:func:`keras_qat.ops.shared`) is traced once per distinct value of its non-tensor arguments,
    and TensorFlow compares other objects by identity. The ranges arrive as vectors (one entry
    per channel) whatever the channel axes are, so only whether there are any matters: a
    convolution's kernel and a depthwise one's share a trace."""
    return (int(spec.bits), bool(spec.narrow_range), bool(spec.symmetric), (0,) if spec.axes else ())


def _range_tensors(source: Source) -> tuple:
    """``source``'s range now (variables or tensors)."""
    return tuple(source.quantizer.range_of(source.variables))


def kernel_parameters_fn(
    in_min, in_max, w_min, w_max, out_min, out_max, bias, in_spec: tuple, w_spec: tuple, out_spec: tuple,
    activation: str, single_rounding: bool, *, xp=ops,
):
    """A kernel's integer parameters from its three ranges (:meth:`keras_qat.integer.KernelOp.lower`;
    the specs as :func:`_static` gives them): the reciprocals of the input and weight scales
    (:func:`keras_qat.grid.reciprocal_scale`, what their codes are computed with), the output scale, the bias
    codes (0 without a bias), the multiplier as its float64 constants
    (:meth:`keras_qat.integer.Requantize.float64_multiplier`), the output zero point, the
    clamp, and whether the requantization's clipped form is exact
    (:meth:`keras_qat.integer.Requantize.clipped_fits`). ``xp``: ``keras.ops``, or
    :mod:`keras_qat.numpy_ops` for the same bits in NumPy."""
    in_grid = TensorSpec(*in_spec).grid(in_min, in_max, xp)
    w_grid = TensorSpec(*w_spec).grid(w_min, w_max, xp)
    out_grid = TensorSpec(*out_spec).grid(out_min, out_max, xp)
    op = integer.KernelOp.lower(in_grid, w_grid, out_grid, bias, activation, single_rounding, xp=xp)
    requantize = op.requantize
    bias_codes = op.bias if op.bias is not None else xp.zeros((), "float64")
    return (
        reciprocal_scale(in_grid.scale, xp), reciprocal_scale(w_grid.scale, xp), bias_codes, requantize.float64_multiplier(xp),
        xp.cast(requantize.zero_point, "float32"), requantize.low, requantize.high, out_grid.scale,
        requantize.clipped_fits(xp),
    )


_kernel_parameters = qops.memoized(kernel_parameters_fn, in_numpy=True)


def _kernel_output_fn(accumulator, bias_codes, multiplier, zero_point, low, high, scale, form):
    """The real output of a kernel from its exact accumulator: bias, requantization (in
    ``form``, by ``multiplier``'s float64 constants), clamp, scale
    (:func:`keras_qat.integer.centered_output`, the bias as its offset), as one compiled kernel."""
    return integer.centered_output(
        accumulator, fp.Float64Multiplier(*multiplier), zero_point, low, high, ops, offset=bias_codes, scale=scale, form=form
    )


#: Outputs with fewer elements per example run op by op: there one XLA call (and one
#: compilation per shape) costs more than the dozen small ops of the split form. Above it the
#: compiled tail wins by far: measured with ``predict_on_batch`` at batch 32 in separate
#: processes, a threshold of 4096 instead of 256 made the digits CNN's inference 3.4 ms instead
#: of 1.4 and MobileNetV2's 38 ms instead of 30 (their first calls 1.0 s instead of 1.3 and 4.6
#: instead of 5.5); 0 made both slower again (1.7 and 34 ms).
COMPILE_MIN_ELEMENTS = 2**8

_kernel_output = _requantization(_kernel_output_fn)


def onto_consumer_grid(outputs, consumer):
    """The inference output of a layer whose integer kernel cannot run (fake quantization
    instead) and whose ``consumer`` (:func:`keras_qat.linking.output_consumer`, or None) leaves
    its inputs on their grid (a fused ReLU, a Concatenate:
    :meth:`keras_qat.layers.QuantizeWrapper.passes_requantized_input_through`): clamped and
    quantized as that consumer would have; ``outputs`` as they are for any other consumer."""
    passes_through = getattr(consumer, "passes_requantized_input_through", None)
    if passes_through is None or not passes_through():
        return outputs
    target = consumer.quantizes_inputs_as()
    if target is None:
        return outputs
    clamped = keras.activations.get(target.activation)(outputs)
    return target.source.quantizer(clamped, False, target.source.variables)


def add_inference(a, b, source_a: Source, source_b: Source, out: OutputTarget):
    """TFLite's ADD of ``a`` and ``b`` (each on its source's grid): :class:`keras_qat.integer.AddOp`."""
    spec_a, spec_b = spec_of(source_a), spec_of(source_b)
    parameters = _add_parameters(
        *_range_tensors(source_a), *_range_tensors(source_b), *_range_tensors(out.source),
        _static(spec_a), _static(spec_b), _static(spec_of(out.source)), out.activation,
    )
    *parameters, clipped_fits = parameters
    output = _in_cheapest_form(_add_output, (a, b, *parameters), clipped_fits)
    return qops.with_static_shape(output, _broadcast_shape(a.shape, b.shape))


def _broadcast_shape(a, b) -> tuple:
    """The static shape of ``a + b`` (None where a dimension is unknown)."""
    a, b = tuple(a), tuple(b)
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    return tuple(y if x == 1 else x if y == 1 or x == y else None for x, y in zip(a, b))


def _add_parameters_fn(
    a_min, a_max, b_min, b_max, out_min, out_max, spec_a: tuple, spec_b: tuple, out_spec: tuple, activation: str, *, xp=ops
):
    """An ADD's integer parameters from its three ranges (:meth:`keras_qat.integer.AddOp.lower`;
    the specs as :func:`_static` gives them), and whether its clipped form is exact
    (:meth:`keras_qat.integer.AddOp.clipped_fits`). ``xp`` as for :func:`kernel_parameters_fn`."""
    grid_a = TensorSpec(*spec_a).grid(a_min, a_max, xp)
    grid_b = TensorSpec(*spec_b).grid(b_min, b_max, xp)
    out_grid = TensorSpec(*out_spec).grid(out_min, out_max, xp)
    op = integer.AddOp.lower(grid_a, grid_b, out_grid, activation, xp=xp)
    requantize = op.requantize
    return (
        grid_a.scale, grid_b.scale, op.float64_multipliers(xp),
        xp.cast(requantize.zero_point, "float32"), requantize.low, requantize.high, out_grid.scale,
        op.clipped_fits(xp),
    )


_add_parameters = qops.memoized(_add_parameters_fn, in_numpy=True)


def _add_output_fn(a, b, scale_a, scale_b, multipliers, zero_point, low, high, scale, form):
    """The real output of TFLite's ADD from its real inputs (:meth:`keras_qat.integer.AddOp.centered`
    on their codes, in ``form``, by ``multipliers``' float64 constants), as one compiled kernel."""
    multipliers = tuple(fp.Float64Multiplier(*multiplier) for multiplier in multipliers)
    codes = (codes_at_scale(a, scale_a, ops), codes_at_scale(b, scale_b, ops))
    return integer.add_centered_output(*codes, multipliers, zero_point, low, high, ops, scale, form)


_add_output = _requantization(_add_output_fn)


def multiply_inference(a, b, source_a: Source, source_b: Source, out: OutputTarget):
    """TFLite's int8 MUL of ``a`` and ``b`` (:class:`keras_qat.integer.MultiplyOp`), rounding
    twice where fake quantization of the float product rounds once."""
    grid_a, grid_b, out_grid = grid(source_a), grid(source_b), grid(out.source)
    op = integer.MultiplyOp.lower(grid_a, grid_b, out_grid, out.activation, xp=ops)
    return _real(op(centered_codes(a, grid_a), centered_codes(b, grid_b), ops), out_grid)


def quantize_inference(inputs, source: Source):
    """TFLite's QUANTIZE of a float model input: ``round(x / scale)`` half away from zero
    (float32 division), plus the zero point, clamped. TF's fake-quant op rounds
    ``(x - nudged_min) / scale`` half up, which differs on ties below the zero point and on
    values a rounding error from a half step."""
    g = grid(source)
    return g.dequantize(g.quantize(inputs, ops), ops)


def leaky_relu_inference(inputs, alpha: float, source: Source, out: OutputTarget):
    """TFLite's int8 LEAKY_RELU (:class:`keras_qat.integer.LeakyReluOp`), where fake
    quantization of the float op rounds once."""
    in_grid, out_grid = grid(source), grid(out.source)
    op = integer.LeakyReluOp.lower(in_grid, out_grid, alpha, out.activation, xp=ops)
    return _real(op(in_grid.centered_codes(inputs, ops), ops), out_grid)


def writes_integer_softmax(quantizer: Quantizer) -> bool:
    """Whether the integer softmax can write onto ``quantizer``'s grid, as the runtime's
    ``SoftmaxOutput`` does: below 8 bits always (the int8 kernel's codes, requantized); at 8
    bits and more only onto a fixed range whose scale is 1/integer (``levels = 1 / scale``
    codes), known when the model is traced. Elsewhere inference fake-quantizes the float
    softmax, and the writer refuses the layer."""
    if quantizer.num_bits < 8:
        return True
    config = quantizer.get_config()
    fixed_range = (config.get("init_min"), config.get("init_max"))
    if getattr(quantizer, "observer", None) != "fixed" or config.get("symmetric") or quantizer.per_axis:
        return False
    if any(end is None or np.ndim(end) for end in fixed_range):
        return False  # a fixed quantizer of the user's own, whose range its config does not say
    fixed = from_range(np.float32(fixed_range[0]), np.float32(fixed_range[1]), quantizer.num_bits, quantizer.narrow_range)
    return integer.softmax_levels(fixed.scale) is not None


def softmax_inference(inputs, source: Source, out: OutputTarget):
    """The integer softmax over the last axis (:func:`keras_qat.integer.softmax_codes`) of
    ``inputs`` on ``source``'s grid, as the ``.kqat`` runtime computes it: exponentials from a
    fixed-point table, normalized in integers and rounded once, where fake quantization of
    the float softmax rounds a value within float32 error of a half step either way.

    At 8 bits and more the codes are the output grid's (``levels = 1 / scale``); below, the
    int8 SOFTMAX's, requantized to the output grid as a converted model does. Needs int64.
    """
    in_grid, out_grid = grid(source), grid(out.source)
    codes = ops.cast(in_grid.centered_codes(inputs, ops), "int64")
    table = ops.cast(integer.softmax_exp_table(in_grid.scale, SOFTMAX_BITS, in_grid.qmax - in_grid.qmin + 1, ops), "int64")
    if out_grid.bits >= 8:
        levels = ops.cast(ops.round(1.0 / ops.cast(out_grid.scale, "float64")), "int64")
        result = integer.softmax_codes(codes, table, levels, ops)
        zero_point = ops.cast(out_grid.zero_point, "int64")
        signed = ops.clip(result + zero_point, out_grid.qmin, out_grid.qmax)
        return ops.cast(signed - zero_point, "float32") * out_grid.scale
    eight_bit = integer.int8_softmax_grid()
    zero_point = int(eight_bit.zero_point)
    int8 = ops.clip(integer.softmax_codes(codes, table, integer.INT8_SOFTMAX_LEVELS, ops) + zero_point, eight_bit.qmin, eight_bit.qmax)
    requantize = integer.Requantize.between(eight_bit, out_grid, out.activation, xp=ops)
    return _real(requantize(ops.cast(int8 - zero_point, "float32"), ops), out_grid)


def fixed_range_inference(values, fixed_range: tuple[float, float], out: OutputTarget):
    """An activation whose int8 kernel fixes its output grid (sigmoid, tanh; a softmax not over
    the last axis, see :func:`softmax_inference`), quantized below 8 bits: the kernel's 8-bit
    output on that fixed grid, requantized to ``out``'s grid with the fixed-point multiplier (the QUANTIZE a converter adds between the two), rounding
    twice where fake quantization of the float activation would round once."""
    low, high = fixed_range
    eight_bit = from_range(np.float32(low), np.float32(high), 8)
    codes = eight_bit.centered_codes(qops.fake_quant(values, low, high, 8), ops)
    out_grid = grid(out.source)
    requantize = integer.Requantize.between(eight_bit, out_grid, out.activation, xp=ops)
    return _real(requantize(codes, ops), out_grid)


def average_pool_inference(layer, inputs, source: Source):
    """TFLite's int8 AVERAGE_POOL_2D: the average of the signed codes, rounded half away from
    zero, on the input's grid (fake quantization rounds ties half up).

    The codes are exact integers in float32, so the pooled sum is exact; its division by the
    count can land a hair off an exact tie, which ``tie`` (a quarter of the smallest step
    between averages) absorbs.
    """
    g = grid(source)
    zero_point = g.as_signed().zero_point
    signed = ops.cast(g.centered_codes(inputs, ops), "float32") + zero_point
    averaged = _window_average(layer, signed)
    area = 1
    for size in layer.pool_size:
        area *= int(size)
    tie = 0.25 / area
    rounded = ops.sign(averaged) * ops.floor(ops.abs(averaged) + 0.5 + tie)
    return (rounded - zero_point) * g.scale


def _window_average(layer, x):
    """``layer``'s average pooling of ``x`` over each window's real inputs, as TensorFlow and
    TFLite take it. Keras on PyTorch averages some SAME windows otherwise (pool 4, stride 2
    over the values 1..7: 1.75 for the first window, against TensorFlow's 2.0), so SAME
    windows are padded here explicitly, TF's way (an odd pad's extra element after), and
    pooled VALID, divided by the count of real inputs pooled alike."""
    spatial = tuple(x.shape[1:-1])
    if layer.padding != "same" or layer.data_format != "channels_last" or None in spatial:
        return layer(x)
    pads = [(0, 0)]
    for size, pool, stride in zip(spatial, layer.pool_size, layer.strides):
        total = max((-(-size // stride) - 1) * stride + pool - size, 0)
        pads.append((total // 2, total - total // 2))
    pads.append((0, 0))
    real = ops.ones((1,) + spatial + (1,), x.dtype)
    pooled, counted = (ops.average_pool(ops.pad(v, pads), layer.pool_size, layer.strides, "valid") for v in (x, real))
    return pooled / counted


def mean_inference(layer, inputs, source: Source, out: OutputTarget):
    """TFLite's int8 MEAN over the spatial axes (None when a spatial size is unknown, which
    the multiplier depends on): the sum of the centered codes, requantized
    with the multiplier of ``input_scale / output_scale`` divided by the count in integer
    arithmetic (``m0 * 2**k // count`` with ``k = floor(log2(count))``, at most 32 and
    ``31 + shift``), rounding twice as the convolutions do."""
    in_grid, out_grid = grid(source), grid(out.source)
    codes = centered_codes(inputs, in_grid)
    axes = tuple(range(1, len(inputs.shape) - 1))
    if any(inputs.shape[axis] is None for axis in axes):
        return None  # the count fixes the multiplier; unknown here, fake quantization instead
    count = 1
    for axis in axes:
        count *= int(inputs.shape[axis])
    total = ops.sum(codes, axis=axes, keepdims=bool(getattr(layer, "keepdims", False)))
    op = integer.MeanOp.lower(in_grid, out_grid, out.activation, xp=ops)
    return _real(op(total, count, ops), out_grid)


__all__ = [
    "quantize_inference",
    "average_pool_inference",
    "mean_inference",
    "Source",
    "OutputTarget",
    "spec_of",
    "exported_grid",
    "grid",
    "enabled",
    "kernel_inference",
    "kernel_parameter_arguments",
    "kernel_parameters_fn",
    "kernel_output",
    "KernelParameterArguments",
    "fixed_range_inference",
    "softmax_inference",
    "writes_integer_softmax",
    "leaky_relu_inference",
    "add_inference",
    "onto_consumer_grid",
    "multiply_inference",
    "supports_kernel",
    "rounds_once",
    "centered_codes",
]
