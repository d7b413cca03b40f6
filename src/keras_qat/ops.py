"""Fake-quantization math: TensorFlow's FakeQuantWithMinMaxVars on every backend.

This module is the numeric heart of keras-qat and the only place (with ``export/``) that
touches TensorFlow. Everything else calls :func:`fake_quant` and the range helpers here.

The arithmetic is that of TensorFlow's kernels (``fake_quant_ops_functor.h``, TF >= 2.18),
in the same order of float32 operations, so that every backend produces the same bits::

    qmin = 1 if narrow_range else 0;  qmax = 2**num_bits - 1
    scale = (max - min) / (qmax - qmin);  inv_scale = (qmax - qmin) / (max - min)
    zero_point = clamp(std::round(qmin - min / scale), qmin, qmax)   # half away from zero
    nudged_min = (qmin - zero_point) * scale;  nudged_max = (qmax - zero_point) * scale
    quant_zero = floor(-nudged_min * inv_scale + 0.5)
    shifted = clamp(x, nudged_min, nudged_max) - nudged_min
    per-tensor:  fq(x) = floor(shifted / scale     - quant_zero + 0.5) * scale
    per-channel: fq(x) = floor(shifted * inv_scale - quant_zero + 0.5) * scale

The gradient is the straight-through estimator: ``d fq / dx = 1`` inside
``[nudged_min, nudged_max]`` and 0 outside; ``d fq / d min`` (``d max``) is the sum of the
upstream gradient over the elements below (above) the nudged range, as TF defines them. A
range of exactly ``[0, 0]`` outputs zeros and passes the gradient through unchanged.

keras-qat adds one rule to TF's: a *degenerate* range (``max - min`` below
:data:`MIN_RANGE_WIDTH`, e.g. ``min == max``) is treated as ``[0, 0]``, because TF's kernel
divides by a zero scale there and returns NaN. Every range that TF quantizes to finite
values is quantized bit-for-bit as TF does.

On the TensorFlow backend TF's own ops run, so that the TFLite converter recognises them.
On JAX and PyTorch the same arithmetic runs through ``keras.ops`` with a custom gradient.

One exception, for speed: TF's per-channel kernel walks the tensor one strided channel at a
time and costs about 20 times its per-tensor kernel (80 ms forward and backward for a
3x3x512x512 kernel on 2 cores). Training and inference graphs, which the converter never
sees (it traces inside :func:`exporting`), call :func:`fake_quant` with ``exportable=False`` and
get the same arithmetic as one fused XLA kernel per direction, bit-identical to TF's op
(tested against it). Their per-tensor fake quant of large tensors keeps TF's forward op but
keeps a byte per element for the backward pass (where the gradient passes, where the value
lies below or above the range) and computes the input's gradient and the range's apart, so
that an untrained range costs no pass over the tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, NamedTuple, Sequence, Union

import keras
import numpy as np
from keras import ops

from keras_qat.errors import NotDeployableError

# The integer range and the degenerate-range rule belong to the grid; re-exported here for callers of ops.
from keras_qat.grid import MAX_BITS, MIN_BITS, MIN_RANGE_WIDTH, quant_range, sanitized_range, validate_num_bits  # noqa: F401

Axis = Union[int, Sequence[int], None]

_EXPORTING = contextvars.ContextVar("keras_qat_exporting", default=None)


@contextlib.contextmanager
def exporting(**hooks) -> Iterator[None]:
    """While a model is traced for a converter: layers emit the plain fake-quant pattern the
    converter recognises, instead of the exact emulation of an integer kernel that they run
    in inference otherwise (see :class:`keras_qat.layers.QuantizeSameScale`).

    ``hooks`` are the exporter's ways of tracing a computation for its converter, which layers
    look up with :func:`export_hook` (``linear``: a kernel layer's linear map, see
    :func:`keras_qat.export.tflite.trace.linear_for_converter`); the layers need not import the
    exporter.
    """
    token = _EXPORTING.set(dict(hooks))
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def is_exporting() -> bool:
    """Whether the current trace is for a converter (inside :func:`exporting`)."""
    return _EXPORTING.get() is not None


_OBSERVER = contextvars.ContextVar("keras_qat_observer", default=None)


@contextlib.contextmanager
def observing(observer) -> Iterator[None]:
    """While a model is calibrated (:func:`keras_qat.calibrate`): every range quantizer hands
    its input to ``observer(quantizer, inputs, weights, axes)`` and returns what it returns
    (the float input), and layers run their plain float path in inference, so that each
    quantizer sees the tensor it quantizes."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def current_observer():
    """The observer of :func:`observing`, or None."""
    return _OBSERVER.get()


def plain_fake_quant() -> bool:
    """Whether layers compute plain fake quantization in inference instead of emulating the
    integer kernels: while exporting (:func:`exporting`) or calibrating (:func:`observing`)."""
    return _EXPORTING.get() is not None or _OBSERVER.get() is not None


def export_hook(name: str):
    """The exporter's hook ``name`` while exporting (see :func:`exporting`), else None."""
    hooks = _EXPORTING.get()
    return None if hooks is None else hooks.get(name)


def exact_integer_arithmetic() -> bool:
    """Whether the backend computes in int64 and float64 (JAX only with ``jax_enable_x64``).

    Inference that reproduces an integer kernel bit for bit needs both: float64 holds every
    int32 accumulator exactly, and the fixed-point requantization multiplies in int64.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return bool(jax.config.jax_enable_x64)
    return backend in ("tensorflow", "torch")


def compiled(fn, min_elements: int = 0):
    """``fn`` (keras.ops on tensors only) as one compiled kernel where the backend otherwise
    runs a graph op by op: an XLA function on TensorFlow graphs, whose elementwise chain becomes a
    single loop instead of one full-size temporary per op. Where the first argument has fewer
    than ``min_elements`` elements per example (its static shape after the batch axis), or in
    eager execution, on JAX (whose ``predict`` and ``fit`` compile the whole step) and on
    PyTorch, ``fn`` itself: XLA compiles once per shape, which only large tensors repay.

    Every step of ``fn`` must be exact (integers in float arithmetic), so that XLA's freedom
    to contract ``a * b + c`` into one FMA cannot change a result; a step that is not (the
    clipped requantization beyond its reach) must only decide values that a clamp saturates.

    ``fn`` is traced once per rank and dtype of its tensors, every size unknown
    (:func:`_any_size`), so it must not read its tensors' static sizes: XLA compiles one kernel
    per shape all the same, from the shapes a call brings. Traced per shape instead (until TF
    relaxed the shapes itself), MobileNetV2's inference traced its requantization five times,
    at 30-70 ms each; now twice.

    In a graph traced for one of Keras's steps, each kernel is compiled on a thread of its own
    while the trace goes on (:class:`_Precompiler`), instead of when the graph first reaches it.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    function = tf.function(fn, jit_compile=True, autograph=False)

    @functools.wraps(fn)
    def call(*args):
        concrete = function.get_concrete_function(*_any_size(args))
        outputs = concrete(*args)
        if not _precompiles_here(args):
            return outputs
        # The device the graph placed the call on, if any: the compiled kernel is kept per device.
        _PRECOMPILER.submit(concrete, args, tf.nest.flatten(outputs)[0].op.device)
        return outputs

    return _in_graphs_only(fn, call, lambda args: compiles(args[0], min_elements))


def _any_size(args: tuple) -> tuple:
    """``args`` with each tensor as a ``tf.TensorSpec`` of its rank and dtype, every size unknown."""
    import tensorflow as tf

    def any_size(value):
        if not tf.is_tensor(value):
            return value
        rank = value.shape.rank
        return tf.TensorSpec(None if rank is None else [None] * rank, value.dtype)

    return tf.nest.map_structure(any_size, args)


def _precompiles_here(args: tuple) -> bool:
    """Whether a :func:`compiled` call traced now has its XLA kernel compiled ahead
    (:class:`_Precompiler`): in the graphs where :func:`memoized` keeps its values (Keras's own
    steps, which run as soon as they are traced, where they were traced), for arguments of fully
    known shapes (XLA compiles one kernel per shape), where a second CPU can compile while the
    trace goes on."""
    import tensorflow as tf

    return _SPARE_CPU and _memoizes_here() and _all_shapes_known(tf.nest.flatten(args))


def _has_spare_cpu() -> bool:
    """Whether this process may run on more than one CPU."""
    import os

    try:
        return len(os.sched_getaffinity(0)) > 1
    except AttributeError:  # not on Linux
        return (os.cpu_count() or 1) > 1


_SPARE_CPU = _has_spare_cpu()


class _Precompiler:
    """Compiles the XLA kernels of the :func:`compiled` calls of a graph being traced, on a
    thread of its own, while the trace goes on.

    A graph compiles each XLA kernel when it first reaches it: MobileNetV2's inference step
    reaches 25, one after another, about 70 ms each, after a trace of about a second in which
    the second core idles. Here each new kernel (a concrete function and its arguments' shapes)
    is queued as it is traced; the thread calls the queued kernels on zeros of those shapes from
    a graph function of its own, on the device the traced graph placed the call on. That call
    site names the kernel as the traced graph's call site does, so TensorFlow's compilation
    cache hands the traced graph the compiled kernel (a kernel called eagerly is cached under
    other attributes and would not serve it). One graph function per batch of kernels queued
    meanwhile: its calls are independent, and TensorFlow's executor compiles them side by side.

    The saving needs a CPU that the trace leaves idle: on a machine busy with other work the
    thread competes with the trace instead (a reviewer measured MobileNetV2's first call 0.5-0.8 s
    slower with the load at twice the cores). With one CPU it is off (:func:`_precompiles_here`).

    Nothing here changes what the graph computes: a kernel that fails, has not finished
    compiling here, or would hold more memory than the budget (:data:`_PRECOMPILE_MAX_BYTES`) is
    compiled by the graph itself, as without this class. Once the main thread has finished (the
    interpreter exiting) the thread takes no more kernels.
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._seen: set = set()
        self._queue: list = []
        self._worker: threading.Thread | None = None
        #: The names of the concrete functions compiled ahead, in the order compiled.
        self.compiled_kernels: list[str] = []

    def submit(self, concrete, args: tuple, device: str = "") -> None:
        """Queue ``concrete`` (a :func:`compiled` function's concrete function) for ``args``'
        shapes and dtypes on ``device`` (empty: where TensorFlow places it), unless it was queued
        before or its memory (:func:`_kernel_bytes`) exceeds the budget."""
        import threading

        import tensorflow as tf

        specs = tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, a.dtype) if isinstance(a, tf.Tensor) else a, args)
        size = _kernel_bytes(specs)
        key = (concrete.name, repr(specs), device)
        with self._lock:
            if key in self._seen or size > _PRECOMPILE_MAX_BYTES:
                return
            self._seen.add(key)
            self._queue.append((concrete, specs, device, size))
            if self._worker is None or not self._worker.is_alive():  # none, or a forked parent's
                self._worker = threading.Thread(target=self._drain, name="keras_qat_precompile")
                self._worker.start()

    def wait(self) -> None:
        """Return once every queued kernel has been compiled (or has failed to)."""
        with self._lock:
            worker = self._worker
        if worker is not None:
            worker.join()

    def _drain(self) -> None:
        """The thread: compiles batches of queued kernels (one device each, within the budget)
        until the queue is empty or the interpreter exits."""
        import threading

        import tensorflow as tf

        while True:
            with self._lock:
                batch, total = [], 0
                while self._queue and (
                    not batch or (self._queue[0][2] == batch[0][2] and total + self._queue[0][3] <= _PRECOMPILE_MAX_BYTES)
                ):
                    concrete, specs, device, size = self._queue.pop(0)
                    batch.append((concrete, specs, device))
                    total += size
                if not batch or not threading.main_thread().is_alive():
                    self._queue.clear()
                    self._worker = None
                    return
            if _compile_kernels(batch):
                with self._lock:
                    self.compiled_kernels.extend(tf.compat.as_str(concrete.name) for concrete, _, _ in batch)


#: The most memory the precompiler's kernels take at a time (:func:`_kernel_bytes`): a kernel
#: that takes more is left to the graph, and a batch of kernels stops short of it, so that
#: compiling ahead costs an inference of a large batch (256 images of 224x224: a 112x112x96
#: accumulator is 1.2 GB) little memory.
_PRECOMPILE_MAX_BYTES = 128 * 2**20


def _kernel_bytes(specs) -> int:
    """The memory a kernel compiled ahead holds while it runs: the zeros of its arguments
    (``specs``' ``tf.TensorSpec`` leaves), and as much again for its outputs (a requantization's
    output is as large as its accumulator)."""
    import tensorflow as tf

    zeros = sum(spec.shape.num_elements() * spec.dtype.size for spec in tf.nest.flatten(specs) if isinstance(spec, tf.TensorSpec))
    return 2 * zeros


def _compile_kernels(batch: list) -> bool:
    """Run each ``(concrete, specs, device)`` of ``batch`` (one device) on zeros of its specs,
    in one graph function; whether that succeeded."""
    import tensorflow as tf

    try:
        device = batch[0][2]
        with tf.device(device) if device else contextlib.nullcontext():
            zeros = [_zeros_like_specs(specs) for _, specs, _ in batch]

            def call_each(*arguments):
                return [concrete(*args) for (concrete, _, _), args in zip(batch, arguments)]

            # The zeros enter as arguments: as constants, grappler would specialize each call to
            # them under a name of its own, which the traced graph's call would not find in the cache.
            tf.function(call_each, autograph=False)(*zeros)
        return True
    except Exception:  # noqa: BLE001 - the traced graph compiles the kernel itself and reports its errors
        return False


def _zeros_like_specs(specs):
    """``specs`` (a call's arguments, ``tf.TensorSpec`` for each tensor) with zeros for the specs."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype) if isinstance(s, tf.TensorSpec) else s, specs)


_PRECOMPILER = _Precompiler()


def compiles(x, min_elements: int = 0) -> bool:
    """Whether a :func:`compiled` function given ``x`` first runs as one compiled kernel: on
    TensorFlow, while a graph is traced, for at least ``min_elements`` elements per example."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.executing_eagerly() and _elements_per_example(x) >= min_elements


def static_size(shape) -> float:
    """The number of elements of a tensor of static ``shape`` (infinite where a size is unknown)."""
    count = 1
    for size in tuple(shape):
        if size is None:
            return float("inf")
        count *= int(size)
    return count


def _elements_per_example(x) -> float:
    """The static number of elements of ``x`` after its first axis (infinite where unknown)."""
    return static_size(tuple(x.shape)[1:])


def shared(fn):
    """``fn`` (keras.ops on tensors; other arguments static) traced once per signature and
    called as a single op wherever it is used, on TensorFlow: a tf.function that grappler
    leaves un-inlined. A computation that every quantized layer repeats on small tensors
    (its integer parameters from its ranges) then adds one op per layer to a traced model
    instead of hundreds, which cuts the model's first call (tracing, then grappler) from tens
    of seconds to a few. ``fn`` itself in eager execution and on other backends.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return _in_graphs_only(
        fn, tf.function(fn, autograph=False, reduce_retracing=True, experimental_attributes={"_noinline": True})
    )


def shared_update(fn):
    """:func:`shared` for a computation that assigns variables (a quantizer's range update): the
    Keras variables among its arguments reach ``fn`` as TensorFlow's own ``tf.Variable``, so
    that one trace serves every quantizer's variables. ``fn`` itself in eager execution, on
    other backends, under a distribution strategy (whose collectives, :func:`global_range`, and
    mirrored variables stay in the step's own graph), and where Keras gives its variables a
    meaning of their own (:func:`_keras_variable_scope_active`).

    Where the first argument has fewer than :data:`_LARGE_TENSOR_MIN_ELEMENTS` elements, the
    function is inlined when the graph runs: a call of its own costs a small model's step more
    than the memory of its ops saves (the digits CNN: 2.8 against 2.7 ms in one process).
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    def traced(variable_shapes, *args):
        # The variables' shapes key the trace: a trace relaxed to tensors of several shapes
        # still reads each variable with the static shape of the first it was traced with.
        return fn(*args)

    traced.__name__ = traced.__qualname__ = fn.__name__  # the traces' names say what they compute
    inlined = tf.function(traced, autograph=False, reduce_retracing=True)
    called = tf.function(traced, autograph=False, reduce_retracing=True, experimental_attributes={"_noinline": True})

    @functools.wraps(fn)
    def call(*args):
        if tf.executing_eagerly() or tf.distribute.has_strategy() or _keras_variable_scope_active():
            return fn(*args)
        function = inlined if _is_small(args[0], _LARGE_TENSOR_MIN_ELEMENTS) else called
        variable_shapes = tuple(tuple(a.shape) for a in args if isinstance(a, keras.Variable))
        return function(variable_shapes, *(_tf_variable(a) if isinstance(a, keras.Variable) else a for a in args))

    return call


def memoized(fn, in_numpy: bool = False):
    """:func:`shared` ``fn`` (a pure function of small tensors; other arguments static) whose
    outputs an inference graph reuses for as long as its inputs keep their values: a layer's
    integer parameters, which change only when its ranges, bias or folded statistics do (a
    training step, calibration, ``set_weights``).

    In a TensorFlow graph each call becomes one ``numpy_function`` op that keeps the bytes of the
    inputs it last saw and the outputs it computed from them. Where the inputs differ, it runs
    ``fn`` again, eagerly (the same TF ops that the shared function runs, so the same bits) or in
    NumPy (``in_numpy``, below). A graph
    then neither traces ``fn`` nor runs its ops while the model is unchanged: MobileNetV2's
    inference graph holds 3,014 ops plus 295 in shared functions instead of 2,888 plus 2,498.
    Measured in fresh processes against :func:`shared`, alternating: the first inference call of
    the digits CNN 0.85-0.97 s instead of 1.33-1.49, of MobileNetV2 3.1-4.4 s instead of 4.4-6.5
    (a noisy machine), 27-30 MiB less resident memory, the same time per call.

    Only in the graphs Keras traces for ``predict``, ``evaluate`` and their ``*_on_batch``
    forms (:func:`_in_keras_step`), which run where they were traced; :func:`shared` in any other
    graph, which may be handed to a converter (the TFLite converter crashes on a Python op),
    saved, or called from an XLA function; also under XLA (``jit_compile``), under a
    ``tf.distribute`` strategy, in a converter's trace (:func:`exporting`), in Keras's stateless
    or autocast scope, and where an input's shape is not fully known. ``fn`` itself eagerly and
    on other backends.

    With ``in_numpy``, ``fn`` takes ``xp=`` (``keras.ops`` by default) and computes the same bits
    given :mod:`keras_qat.numpy_ops`: the op runs it in NumPy, and so does the trace, which
    learns the outputs' shapes and dtypes from one run on zeros per signature. A layer's
    parameters take 0.2-0.3 ms so against 5 ms as eager ops: MobileNetV2's first inference
    call ran its 63 layers' parameters in 0.37 s and learned their shapes in 0.21 s, now 0.03 s
    each, and the call is 0.2-0.4 s shorter. The eager ops run instead where the NumPy run
    raises, where an input or output holds a subnormal float (TensorFlow's CPU kernels flush
    them to zero, NumPy keeps them), and with NumPy 1 (whose scalars promote float32 to
    float64 where TensorFlow keeps float32). That NumPy computes the eager ops' bits is
    asserted by ``tests/test_numpy_ops.py`` for each function that says so, not checked here.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    in_numpy = in_numpy and _NUMPY_PROMOTES_AS_TENSORFLOW
    fallback = shared(fn)

    @functools.wraps(fn)
    def call(*args):
        if tf.executing_eagerly() or not _memoizes_here() or not _all_shapes_known(args):
            return fallback(*args)
        return _memoized_call(fn, args, in_numpy)

    return call


#: NumPy 2's promotion (NEP 50): a Python float meets a float32 array as float32, as in
#: TensorFlow; NumPy 1 promotes a float32 scalar to float64.
_NUMPY_PROMOTES_AS_TENSORFLOW = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def _memoizes_here() -> bool:
    """Whether the graph being traced may hold a :func:`memoized` call's Python op."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util
    from tensorflow.python.saved_model import save_context

    graph = tf.compat.v1.get_default_graph()
    return _in_keras_step(graph) and not (
        control_flow_util.GraphOrParentsInXlaContext(graph)
        or save_context.in_save_context()
        or tf.distribute.has_strategy()
        or is_exporting()
        or _keras_variable_scope_active()
    )


def _in_keras_step(graph) -> bool:
    """Whether ``graph`` is the function that Keras's TensorFlow trainer traces around one step
    (``one_step_on_data``, ``one_step_on_data_distributed``, ...), the model called in it
    directly. A Keras that names them otherwise only loses :func:`memoized`'s saving."""
    return getattr(graph, "name", "").startswith("one_step_on_")


def _all_shapes_known(args: tuple) -> bool:
    """Whether every tensor among a :func:`memoized` call's arguments has a fully known shape."""
    import tensorflow as tf

    return all(tf.TensorShape(a.shape).is_fully_defined() for a in args if _is_tensor_argument(a))


class _LastRun:
    """One :func:`memoized` call site of a graph: the Python side of its op, which keeps the
    bytes of the inputs of its last run and the outputs computed from them."""

    def __init__(self, fn, is_tensor: tuple, static: tuple, groups: list["_OutputGroup"], specs: list, in_numpy: bool):
        self._fn, self._is_tensor, self._static, self._groups = fn, is_tensor, static, groups
        self._specs, self._in_numpy = specs, in_numpy
        self._last: tuple | None = None  # (the inputs' bytes, the outputs as NumPy arrays)

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """The outputs for ``inputs``: the last ones while the inputs are the same bytes, else
        ``fn``'s (:func:`_run_once`), stacked by :func:`_output_groups`."""
        import tensorflow as tf

        key = tuple(value.tobytes() for value in inputs)  # the shapes are static: fully known
        last = self._last
        if last is None or last[0] != key:
            outputs = _run_once(self._fn, self._is_tensor, self._static, list(inputs), self._specs, self._in_numpy)
            flat = tf.nest.flatten(outputs)
            outputs = [group.stacked(flat) for group in self._groups]
            last = self._last = (key, outputs)
        return last[1]


def _memoized_call(fn, args: tuple, in_numpy: bool = False):
    """``fn(*args)`` in the graph being traced, as one :class:`_LastRun` op (and the ops that
    take its stacked outputs apart, :meth:`_OutputGroup.members`)."""
    import tensorflow as tf

    is_tensor = tuple(_is_tensor_argument(a) for a in args)
    static = tuple(None if tensor else a for a, tensor in zip(args, is_tensor))
    inputs = [tf.convert_to_tensor(a) for a, tensor in zip(args, is_tensor) if tensor]
    structure = _output_structure(fn, inputs, static, is_tensor, in_numpy)
    flat = tf.nest.flatten(structure)
    groups = _output_groups(flat)
    last_run = _LastRun(fn, is_tensor, static, groups, flat, in_numpy)
    returned = tf.numpy_function(last_run, inputs, [group.dtype for group in groups], stateful=True)
    outputs = [None] * len(flat)
    for group, value in zip(groups, returned):
        for index, output in group.members(value, flat):
            output.set_shape(flat[index].shape)
            outputs[index] = output
    return tf.nest.pack_sequence_as(structure, outputs)


#: The dtypes that a :func:`memoized` op returns together when they share a shape, in the
#: widest of them: a bool as 0 and 1, a float32 in a float64 as its bit pattern (an integer
#: below 2**32, which float64 holds exactly), taken back by a cast and a bitcast (a float32
#: cast of a float64 would flush a subnormal to zero).
_CARRIED_AS_FLOAT = ("bool", "float32", "float64")


class _OutputGroup(NamedTuple):
    """Outputs of a :func:`memoized` function (indices into its flat outputs) of one shape,
    returned by its op as one array of ``dtype``, stacked where there are several."""

    dtype: Any  # a tf.DType
    indices: list

    def stacked(self, flat: list) -> np.ndarray:
        """The group's outputs among ``flat`` (NumPy arrays), as the op returns them."""
        carried = [self._carried(flat[i]) for i in self.indices]
        return carried[0] if len(carried) == 1 else np.stack(carried)

    def _carried(self, value: np.ndarray) -> np.ndarray:
        dtype = self.dtype.as_numpy_dtype
        if value.dtype == np.float32 and dtype == np.float64:
            return value.view(np.uint32).astype(np.float64)
        return np.asarray(value, dtype)

    def members(self, value, specs: list):
        """``(index, tensor)`` for each output of the group, taken from ``value`` (the op's
        output) in its own dtype (``specs``, by index): one conversion and one unstacking op per
        dtype the group holds."""
        import tensorflow as tf

        unstacked = {}
        for position, index in enumerate(self.indices):
            dtype = specs[index].dtype
            if dtype not in unstacked:
                if dtype == self.dtype:
                    converted = value
                elif dtype == tf.float32 and self.dtype == tf.float64:
                    converted = tf.bitcast(tf.cast(value, tf.uint32), tf.float32)
                else:
                    converted = tf.cast(value, dtype)
                unstacked[dtype] = [converted] if len(self.indices) == 1 else tf.unstack(converted, num=len(self.indices))
            yield index, unstacked[dtype][position]


def _output_groups(flat: list) -> list[_OutputGroup]:
    """``flat`` (``tf.TensorSpec`` leaves) in groups of one shape, each one output of a
    :func:`memoized` op: of one dtype, or of several of :data:`_CARRIED_AS_FLOAT`, in the
    widest among them. Each output of a Python op costs about 6 us a call (TF converts it
    with a NumPy version check), a cast op in the graph about 1 us."""
    import tensorflow as tf

    keys: dict = {}
    for i, spec in enumerate(flat):
        carried = spec.dtype.name in _CARRIED_AS_FLOAT
        keys.setdefault((tuple(spec.shape), "carried" if carried else spec.dtype.name), []).append(i)
    groups = []
    for indices in keys.values():
        dtypes = {flat[i].dtype for i in indices}
        dtype = tf.float64 if tf.float64 in dtypes else tf.float32 if tf.float32 in dtypes else flat[indices[0]].dtype
        groups.append(_OutputGroup(dtype, indices))
    return groups


def _is_tensor_argument(value) -> bool:
    """Whether a :func:`memoized` call's argument is an input of its op (else a static value)."""
    import tensorflow as tf

    return isinstance(value, (tf.Tensor, tf.Variable, keras.Variable, np.ndarray))


def _call_with(fn, is_tensor: tuple, static: tuple, tensors: list, **kwargs):
    """``fn`` called with ``tensors`` in the places ``is_tensor`` marks and the static values
    elsewhere (and ``kwargs``)."""
    values = iter(tensors)
    return fn(*[next(values) if tensor else value for tensor, value in zip(is_tensor, static)], **kwargs)


def _run_once(fn, is_tensor: tuple, static: tuple, inputs: list, specs: list | None, in_numpy: bool):
    """``fn``'s outputs for ``inputs`` (NumPy arrays), NumPy arrays in its nesting: computed in
    NumPy (:func:`_numpy_outputs`) where ``in_numpy`` and that succeeds, else by
    :func:`_eager_outputs`; of the shapes and dtypes of ``specs`` (flat) where given.

    Raises:
        TypeError: where the eager outputs are not of ``specs``' shapes and dtypes (a function
            whose outputs' types depend on its inputs' values).
    """
    import tensorflow as tf

    outputs = _numpy_outputs(fn, is_tensor, static, inputs) if in_numpy else None
    if outputs is not None and (specs is None or _matches(tf.nest.flatten(outputs), specs)):
        return outputs
    outputs = _eager_outputs(fn, is_tensor, static, inputs)
    if specs is not None and not _matches(tf.nest.flatten(outputs), specs):
        got = [(a.shape, a.dtype.name) for a in tf.nest.flatten(outputs)]
        raise TypeError(f"memoized {fn.__name__}: outputs {got} are not of the traced shapes and dtypes {specs}.")
    return outputs


def _numpy_outputs(fn, is_tensor: tuple, static: tuple, inputs: list):
    """``fn``'s outputs for ``inputs`` computed with :mod:`keras_qat.numpy_ops`, or None where
    that raises or an input or output holds a subnormal float (see :func:`memoized`)."""
    import tensorflow as tf

    from keras_qat import numpy_ops

    if any(_has_subnormal(a) for a in inputs):
        return None
    try:
        with np.errstate(all="ignore"):  # as TensorFlow: infinities and NaN, no warnings
            outputs = tf.nest.map_structure(np.asarray, _call_with(fn, is_tensor, static, inputs, xp=numpy_ops))
    except Exception:  # noqa: BLE001 - the eager ops decide instead, and raise what they raise
        return None
    return None if any(_has_subnormal(a) for a in tf.nest.flatten(outputs)) else outputs


def _eager_outputs(fn, is_tensor: tuple, static: tuple, inputs: list):
    """``fn``'s outputs for ``inputs`` computed eagerly on them as tensors (as eager inference
    computes them), as NumPy arrays."""
    import tensorflow as tf

    outputs = _call_with(fn, is_tensor, static, [tf.convert_to_tensor(v) for v in inputs])
    return tf.nest.map_structure(np.asarray, outputs)


def _has_subnormal(array: np.ndarray) -> bool:
    """Whether a float ``array`` holds a subnormal value."""
    if array.dtype.kind != "f":
        return False
    magnitude = np.abs(array)
    return bool(np.any((magnitude < np.finfo(array.dtype).tiny) & (magnitude > 0)))


def _matches(arrays: list, specs: list) -> bool:
    """Whether ``arrays`` have the shapes and dtypes of ``specs`` (``tf.TensorSpec``)."""
    return len(arrays) == len(specs) and all(
        a.shape == tuple(spec.shape) and a.dtype == spec.dtype.as_numpy_dtype for a, spec in zip(arrays, specs)
    )


#: The output structure (:class:`tf.TensorSpec` leaves) of each :func:`memoized` signature.
_OUTPUT_STRUCTURES: dict = {}


def _output_structure(fn, inputs: list, static: tuple, is_tensor: tuple, in_numpy: bool = False):
    """``fn``'s outputs for ``inputs`` of these (fully known) shapes and dtypes, as
    ``tf.TensorSpec`` leaves: from one run on zeros of those shapes (:func:`_run_once`), once per
    signature (a trace would cost what :func:`memoized` saves)."""
    import tensorflow as tf

    key = (fn, in_numpy, is_tensor, tuple((tuple(t.shape), t.dtype) for t in inputs), tuple(repr(s) for s in static))
    if key not in _OUTPUT_STRUCTURES:
        zeros = [np.zeros(t.shape, t.dtype.as_numpy_dtype) for t in inputs]
        with tf.init_scope():
            outputs = _run_once(fn, is_tensor, static, zeros, None, in_numpy)
        _OUTPUT_STRUCTURES[key] = tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, a.dtype), outputs)
    return _OUTPUT_STRUCTURES[key]


def _keras_variable_scope_active() -> bool:
    """Whether reading or assigning a Keras variable means more than its ``tf.Variable`` does: in a
    ``keras.StatelessScope`` (``stateless_call``: assignments are collected, not made) or an
    autocast scope (mixed precision: float variables read in the compute dtype). True where this
    Keras does not say."""
    try:
        from keras.src.backend.common.stateless_scope import in_stateless_scope
        from keras.src.backend.common.variables import get_autocast_scope
    except ImportError:  # pragma: no cover - a Keras that moved them
        return True
    return in_stateless_scope() or get_autocast_scope() is not None


def _tf_variable(variable):
    """The ``tf.Variable`` that holds a Keras variable's value on TensorFlow."""
    import tensorflow as tf

    value = getattr(variable, "_value", None)
    if not isinstance(value, tf.Variable):
        raise TypeError(f"keras_qat: no tf.Variable behind the Keras variable {variable.path!r}.")
    return value


def split_evenly(x, count: int, axis: int) -> list:
    """``x`` split along ``axis`` (of static size) into ``count`` parts whose sizes differ by
    at most one, the larger first: one op on TensorFlow, where slicing takes a strided slice
    and three constants per part (ResNet50's exact accumulations in channel groups took 20
    slices in a layer, about a sixth of its inference graph).

    Raises:
        ValueError: where ``count`` is not between 1 and the axis' size.
    """
    size = int(x.shape[axis])
    if not 1 <= count <= size:
        raise ValueError(f"split_evenly: count must be between 1 and the size of axis {axis} ({size}), got {count}.")
    base, extra = divmod(size, count)
    sizes = [base + 1] * extra + [base] * (count - extra)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.split(x, sizes, axis=axis)
    lead = (slice(None),) * (axis % len(x.shape))
    starts = np.cumsum([0] + sizes[:-1])
    return [x[lead + (slice(int(start), int(start) + part),)] for start, part in zip(starts, sizes)]


def with_static_shape(x, shape):
    """``x`` with its static shape set to ``shape`` in a TensorFlow graph, where the output of a
    :func:`compiled` or :func:`shared` function (traced for any shape) has lost it; ``x`` as it
    is elsewhere."""
    if keras.backend.backend() == "tensorflow" and not isinstance(x, np.ndarray):
        import tensorflow as tf

        if not tf.executing_eagerly():
            x.set_shape(shape)
    return x


def _in_graphs_only(fn, function, worth_it=lambda args: True):
    """``function`` while a graph is traced and ``worth_it(args)``, else ``fn``: eagerly, ops
    run one by one anyway, and each new signature would cost a trace (and an XLA compilation)."""
    import tensorflow as tf

    @functools.wraps(fn)
    def call(*args):
        if tf.executing_eagerly() or not worth_it(args):
            return fn(*args)
        # A Keras variable is read here: the function takes its value, not the variable.
        return function(*(tf.convert_to_tensor(a) if isinstance(a, keras.Variable) else a for a in args))

    return call


# --------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------


def normalize_axes(axis: Axis, rank: int, owner: str = "fake_quant") -> tuple[int, ...]:
    """Validate a channel axis (an int or a sequence of ints) against ``rank``.

    Returns the axes as sorted non-negative ints. Several axes form one channel axis,
    flattened in row-major order (a depthwise kernel's ``(in_channels, depth_multiplier)``).
    """
    if rank == 0:
        raise ValueError(
            f"{owner}: per-axis quantization needs a tensor of rank >= 1, got a scalar; "
            "use per-tensor quantization (axis=None / per_axis=False)."
        )
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in axes):
        raise ValueError(f"{owner}: axis must be an int or a tuple of ints, got {axis!r}.")
    normalized = []
    for a in axes:
        if not -rank <= int(a) < rank:
            raise ValueError(
                f"{owner}: axis={axis!r} is out of range for a tensor of rank {rank}; "
                f"allowed axes are {-rank}..{rank - 1}."
            )
        normalized.append(int(a) % rank)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{owner}: axis={axis!r} names the same axis twice.")
    return tuple(sorted(normalized))


def channel_count(shape: Sequence[int | None], axes: tuple[int, ...]) -> int | None:
    """Number of channels that ``axes`` span in ``shape`` (None if a dimension is unknown)."""
    count = 1
    for a in axes:
        if shape[a] is None:
            return None
        count *= int(shape[a])
    return count


def _check_float_input(x, owner: str) -> str:
    dtype = keras.backend.standardize_dtype(x.dtype)
    if "float" not in dtype:
        raise ValueError(
            f"{owner}: fake quantization takes floating-point inputs, got dtype {dtype}; "
            "cast the tensor to float32 first."
        )
    return dtype


def _is_concrete(value) -> bool:
    """Whether a range is given as a Python or NumPy number (not a tensor or a variable)."""
    return isinstance(value, (int, float, np.ndarray, np.generic))


def _check_concrete_range(min, max, owner: str) -> None:
    """Check ranges given as Python or NumPy numbers; tensors are checked by their producers."""
    if not (_is_concrete(min) and _is_concrete(max)):
        return
    lo, hi = np.asarray(min, np.float64), np.asarray(max, np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(
            f"{owner}: the range must be finite, got min={min!r}, max={max!r}."
        )
    if np.any(lo > hi):
        raise ValueError(f"{owner}: min must be <= max, got min={min!r}, max={max!r}.")


# --------------------------------------------------------------------------------------
# Ranges from statistics
# --------------------------------------------------------------------------------------


def reduce_range(x, axis: Axis = None, factor=None, activation: str | None = None, *, compiled: bool | None = None):
    """Min and max of ``x``: scalars when ``axis`` is None, else one per channel of ``axis``.

    Several axes are flattened row-major into one channel axis (see :func:`normalize_axes`).

    With ``factor`` (one value per channel of ``axis``) and ``activation`` (see
    :func:`fake_quant`), the min and max of ``activation(channel_product(x, factor, axis))``,
    without computing that tensor: rounding a product is monotonic in each operand and so are
    ReLU and ReLU6, so they are those ops applied to ``x``'s own min and max (swapped where
    the factor is negative), bit for bit (for finite values).

    ``compiled`` says whether a per-channel range is one XLA kernel (:func:`reduces_compiled`);
    None decides from ``x``'s static shape, which a function traced for several shapes has lost.
    """
    if factor is not None or activation is not None:
        if factor is not None and axis is None:
            raise ValueError("reduce_range: factor scales the channels of an axis; pass axis=... with it.")
        lo, hi = reduce_range(x, axis, compiled=compiled)
        if factor is not None:
            factor = ops.cast(factor, lo.dtype)
            lo, hi, positive = lo * factor, hi * factor, factor >= 0.0
            lo, hi = ops.where(positive, lo, hi), ops.where(positive, hi, lo)
        if activation is not None:
            lo, hi = _activate(lo, activation), _activate(hi, activation)
        return lo, hi
    if axis is None:
        return ops.min(x), ops.max(x)
    axes = normalize_axes(axis, len(x.shape), "reduce_range")
    others = tuple(a for a in range(len(x.shape)) if a not in axes)
    if reduces_compiled(x) if compiled is None else compiled:
        lo, hi = _tf_min_max()(x, others)
    else:
        lo, hi = ops.min(x, axis=others), ops.max(x, axis=others)
    if len(axes) > 1:
        lo, hi = ops.reshape(lo, (-1,)), ops.reshape(hi, (-1,))
    return lo, hi


def reduces_compiled(x) -> bool:
    """Whether :func:`reduce_range` takes a per-channel range as one XLA kernel: on TensorFlow,
    in a graph, for a tensor of at least :data:`_LARGE_TENSOR_MIN_ELEMENTS` elements.
    TF's Min and Max reduce across the channels of a weight in two passes that cost four times
    the compiled one's (1.06 against 0.27 ms on a 3x3x512x512 kernel): every weight's range,
    every step. Below that size the kernel's launch costs more than it saves."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.executing_eagerly() and not _is_small(x, _LARGE_TENSOR_MIN_ELEMENTS)


@functools.lru_cache(maxsize=None)
def _tf_min_max():
    """``x``'s min and max over the axes ``others`` (a static tuple), as one XLA kernel."""
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def min_max(x, others):
        return tf.reduce_min(x, axis=others), tf.reduce_max(x, axis=others)

    return min_max


def _replica_context():
    """The ``tf.distribute`` replica context of a step that runs on more than one replica
    (MirroredStrategy, MultiWorkerMirroredStrategy), else None. JAX's ``keras.distribution``
    needs none: its step computes on the whole global batch, sharded or not."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def global_range(batch_min, batch_max):
    """``(batch_min, batch_max)`` combined over every replica of a distributed step: the range
    of the global batch, so that every replica quantizes on it and stores it, as one device
    running that batch would (each replica otherwise observes only its own share). Unchanged
    outside a multi-replica step."""
    context = _replica_context()
    if context is None:
        return batch_min, batch_max
    gathered = context.all_gather(ops.expand_dims(ops.stack([-batch_min, batch_max]), 0), axis=0)
    widest = ops.max(gathered, axis=0)
    return -widest[0], widest[1]


def moments(x, axes: tuple[int, ...]):
    """``keras.ops.moments(x, axes)`` of the global batch in a multi-replica step (the sums are
    all-reduced, as Keras's synchronized BatchNormalization does), of ``x`` elsewhere."""
    return ops.moments(x, axes, synchronized=_replica_context() is not None)


#: Below this many elements per example the fused batch-norm kernel's fixed cost (oneDNN's,
#: about 0.35 ms forward and backward on 2 cores) exceeds the separate ops' (measured at batch
#: 32: 2,048 elements per example 0.36 ms fused against 0.27 ms, 4,096 0.39 against 0.53 ms).
_FUSED_BATCH_NORM_MIN_ELEMENTS = 3_072


def batch_normalize(x, scale, offset, epsilon: float):
    """Normalize ``x`` over every axis but the last with its own batch statistics, as a
    BatchNormalization layer does in training.

    Returns ``(normalized, mean, variance)``: ``(x - mean) * scale / sqrt(variance + epsilon)
    + offset``, with ``mean`` and the population ``variance`` (not Bessel-corrected) per
    channel, of the global batch in a multi-replica step.

    On TensorFlow, for a float tensor of rank 2 to 5 with at least
    :data:`_FUSED_BATCH_NORM_MIN_ELEMENTS` elements per example, outside a multi-replica step,
    this is one fused kernel forward and one backward (``FusedBatchNormV3``), where the same
    formula in separate ops (Keras 3's BatchNormalization) costs a reduction, a squared
    difference and their gradients each: on MobileNetV2 the folded layers' normalization in
    that form took about 40% of the QAT training step (107 ms a step, 63 ms without it).
    """
    fusable = (
        keras.backend.backend() == "tensorflow"
        and keras.backend.standardize_dtype(x.dtype) in ("float32", "float16", "bfloat16")
        and 2 <= len(x.shape) <= 5
        and _elements_per_example(x) >= _FUSED_BATCH_NORM_MIN_ELEMENTS
        and _replica_context() is None
    )
    if fusable:
        return _fused_batch_normalize_tf(x, scale, offset, epsilon)
    x, scale, offset = (ops.convert_to_tensor(v) for v in (x, scale, offset))
    mean, variance = moments(x, tuple(range(len(x.shape) - 1)))
    multiplier = scale * ops.rsqrt(variance + epsilon)
    return x * multiplier + (offset - mean * multiplier), mean, variance


def _fused_batch_normalize_tf(x, scale, offset, epsilon: float):
    import tensorflow as tf
    from tensorflow.python.ops import gen_nn_ops

    shape = tf.shape(x)
    rank = len(x.shape)
    # The kernel takes NHWC (rank 4) or NDHWC (rank 5); a Dense or Conv1D output gains axes of 1.
    if rank < 4:
        x = tf.reshape(x, tf.concat([shape[:1], tf.ones([4 - rank], tf.int32), shape[1:]], 0))
    channels = x.shape[-1]
    scale, offset = (_channel_vector_tf(v, channels) for v in (scale, offset))
    empty = tf.constant([], tf.float32)
    # The raw op: tf.nn.fused_batch_norm raises an epsilon below 1.001e-5 to that value, where
    # Keras's BatchNormalization keeps a user's 1e-6.
    normalized, mean, corrected_variance, *_ = gen_nn_ops.fused_batch_norm_v3(
        x, scale, offset, empty, empty, epsilon=float(epsilon),
        data_format="NHWC" if rank <= 4 else "NDHWC", is_training=True,
    )
    # The kernel returns the Bessel-corrected variance n / (n - 1) * population variance; the
    # inverse factor in float32, from the static shape where it is known (the same float32
    # arithmetic, no ops).
    static_count = static_size(x.shape) / int(channels)
    if static_count != float("inf"):
        count = np.float32(static_count)
        variance = corrected_variance * ((count - np.float32(1.0)) / np.maximum(count, np.float32(1.0)))
    else:
        count = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
        variance = corrected_variance * ((count - 1.0) / tf.maximum(count, 1.0))
    if rank < 4:
        normalized = tf.reshape(normalized, shape)
    return normalized, mean, variance


def _channel_vector_tf(value, channels: int):
    """``value`` (a scalar or one per channel) as a float32 vector of ``channels`` entries."""
    import tensorflow as tf

    value = tf.cast(value, tf.float32)
    return value if tuple(value.shape) == (channels,) else tf.broadcast_to(value, [channels])


def asymmetric_range(batch_min, batch_max):
    """The smallest range that holds the statistics and zero: ``[min(lo, 0), max(hi, 0)]``."""
    return ops.minimum(batch_min, 0.0), ops.maximum(batch_max, 0.0)


def symmetric_range(batch_min, batch_max, num_bits: int, narrow_range: bool):
    """tfmot's symmetric range around zero that holds ``[batch_min, batch_max]``.

    With ``m = max(|batch_min|, ...)``: narrow range gives ``[-m, m]``; full range gives
    ``[-m, m * (2**bits - 2) / 2**bits]``, so that the zero point lands exactly on the
    middle code (int8: -128..127 with zero point 0).
    """
    num_bits = validate_num_bits(num_bits, "symmetric_range")
    if narrow_range:  # dividing or multiplying by -1 is negating, exactly
        return ops.minimum(batch_min, ops.negative(batch_max)), ops.maximum(batch_max, ops.negative(batch_min))
    ratio = -((2**num_bits) - 2) / (2**num_bits)
    range_min = ops.minimum(batch_min, ops.divide(batch_max, ratio))
    range_max = ops.maximum(batch_max, ops.multiply(batch_min, ratio))
    return range_min, range_max


# --------------------------------------------------------------------------------------
# Nudging: the scale and zero point that TF derives from a range
# --------------------------------------------------------------------------------------


class NudgedRange(NamedTuple):
    """The quantization grid that a float range maps to (all float32 tensors)."""

    nudged_min: object
    nudged_max: object
    scale: object
    inv_scale: object
    zero_point: object  # an integer value held in float32


def exact_divide(numerator, denominator):
    """``numerator / denominator`` as an IEEE division (float32 or float64) on every backend.

    XLA rewrites a division by a constant, or by a broadcast scalar that it can see is
    constant, into a multiplication by the reciprocal, which differs from TF's division in
    the last bit; eager JAX embeds concrete scalars as constants, so this happens outside
    ``jit`` too. Dividing by a full-shape operand that an optimization barrier hides from the
    simplifier keeps the division a division. TensorFlow graphs have the same rewrite
    (Grappler) and get a division it does not touch; a zero denominator gives 0 there, which
    only degenerate ranges reach, and those are masked. PyTorch divides as written.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # Grappler rewrites a graph's division by a constant (the number of levels) into a
        # multiplication by its reciprocal; it leaves DivNoNan alone, which divides exactly
        # wherever the denominator is non-zero.
        return tf.math.divide_no_nan(numerator, denominator)
    if backend != "jax":
        return numerator / denominator
    import jax

    shape = np.broadcast_shapes(tuple(numerator.shape), tuple(denominator.shape))
    return numerator / jax.lax.optimization_barrier(ops.broadcast_to(denominator, shape))


def _rounded_product(a, b):
    """``a * b`` rounded to float32 before any later addition, as TF's kernels compute it.

    XLA on CPU lets LLVM contract a multiply followed by an add into one fused multiply-add,
    which rounds once instead of twice and moves values on a rounding boundary by one
    quantization step. XLA drops optimization barriers before fusion and simplifies float
    identities away, but it cannot see through integer arithmetic on a value it does not
    know: the product's bits are OR-ed with its own NaN flag (0 for every number; a NaN stays
    a NaN), which LLVM cannot fold into the addition that follows.
    """
    product = a * b
    if keras.backend.backend() != "jax":
        return product
    import jax
    import jax.numpy as jnp

    nan_flag = (product != product).astype(jnp.uint32)
    bits = jax.lax.bitcast_convert_type(product, jnp.uint32) | nan_flag
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def nudge(min, max, num_bits: int = 8, narrow_range: bool = False) -> NudgedRange:
    """TF's ``Nudge``: the grid (nudged range, scale, zero point) for a float range.

    ``min`` and ``max`` are float32 scalars or vectors; the result has their shape. Degenerate
    ranges are not handled here (see :func:`fake_quant`).
    """
    qmin, qmax = quant_range(num_bits, narrow_range)
    return _nudge(
        ops.cast(min, "float32"),
        ops.cast(max, "float32"),
        ops.convert_to_tensor(np.float32(qmin)),
        ops.convert_to_tensor(np.float32(qmax)),
    )


def _nudge(min, max, qmin_f, qmax_f) -> NudgedRange:
    """:func:`nudge` with the integer range given as float32 tensors (traceable)."""
    levels = qmax_f - qmin_f
    width = max - min
    scale = exact_divide(width, levels)
    inv_scale = exact_divide(levels, width)
    zero_from_min = qmin_f - exact_divide(min, scale)
    # std::round (half away from zero) of a value in [qmin, qmax], which is non-negative:
    # floor plus one where the exact fractional part reaches one half.
    floor = ops.floor(zero_from_min)
    rounded = floor + ops.cast(zero_from_min - floor >= 0.5, "float32")
    zero_point = ops.where(
        zero_from_min < qmin_f, qmin_f, ops.where(zero_from_min > qmax_f, qmax_f, rounded)
    )
    nudged_min = (qmin_f - zero_point) * scale
    nudged_max = (qmax_f - zero_point) * scale
    return NudgedRange(nudged_min, nudged_max, scale, inv_scale, zero_point)


def sanitize_range(min, max):
    """``(min, max)`` with degenerate ranges replaced by ``[0, 0]``, as :func:`fake_quant` does."""
    return _sanitize_range(min, max)


def _sanitize_range(min, max):
    """Replace degenerate ranges by ``[0, 0]``, whose output TF defines as zeros."""
    return sanitized_range(min, max, ops)


# --------------------------------------------------------------------------------------
# Channel layout: move the channel axes last, flattened, and back
# --------------------------------------------------------------------------------------


class _ChannelsLast(NamedTuple):
    perm: tuple[int, ...] | None  # transpose that moves the channel axes last, or None
    moved_shape: tuple | None  # shape after the transpose, for undoing a flatten
    flatten: bool  # several channel axes are flattened into one


def _to_channels_last(x, axes: tuple[int, ...], shape_fn, reshape, transpose):
    rank = len(x.shape)
    others = [a for a in range(rank) if a not in axes]
    perm = tuple(others) + axes
    identity = perm == tuple(range(rank))
    moved = x if identity else transpose(x, perm)
    flatten = len(axes) > 1
    moved_shape = shape_fn(moved) if flatten else None
    if flatten:
        lead = [moved_shape[i] for i in range(rank - len(axes))]
        count = 1
        for a in axes:
            count *= x.shape[a]
        moved = reshape(moved, lead + [count])
    return moved, _ChannelsLast(None if identity else perm, moved_shape, flatten)


def _from_channels_last(y, layout: _ChannelsLast, reshape, transpose):
    if layout.flatten:
        y = reshape(y, list(layout.moved_shape))
    if layout.perm is not None:
        inverse = tuple(int(i) for i in np.argsort(layout.perm))
        y = transpose(y, inverse)
    return y


#: The activations :func:`fake_quant` can apply itself: a clamp, exact and monotonic.
ACTIVATIONS = ("relu", "relu6")


def _activate(x, activation: str):
    """``keras.ops.relu`` or ``relu6`` of ``x`` (TensorFlow's Relu and Relu6 ops on TensorFlow,
    what Keras's ReLU layers run there)."""
    return ops.relu(x) if activation == "relu" else ops.relu6(x)


def fuses_activation(x) -> bool:
    """Whether :func:`fake_quant` given ``x`` and ``activation=`` (per tensor, in training, not
    while a converter traces) applies the activation inside its kernel, whose backward pass
    keeps a byte per element instead of the activation's output: on TensorFlow, from
    :data:`_LARGE_TENSOR_MIN_ELEMENTS` elements."""
    return keras.backend.backend() == "tensorflow" and not is_exporting() and not _is_small(x, _LARGE_TENSOR_MIN_ELEMENTS)


def before_quantization(x, axes: tuple[int, ...], factor=None, activation: str | None = None):
    """What :func:`fake_quant` quantizes given ``factor`` and ``activation``, computed:
    ``activation(channel_product(x, factor, axes))``, each op where given, the factor a
    constant (no gradient flows to it)."""
    if factor is not None:
        x = channel_product(x, without_gradient(factor, keras.backend.standardize_dtype(x.dtype)), axes)
    return x if activation is None else _activate(x, activation)


def without_gradient(x, dtype: str = "float32"):
    """``x`` as a ``dtype`` tensor through which no gradient flows: ``stop_gradient``, except
    where ``x`` already is one's output (a folded layer's BN factor, passed on to its quantizer
    and the quantizer's range), which a second would only add an op to every training graph."""
    x = ops.cast(ops.convert_to_tensor(x), dtype)
    return x if _is_stop_gradient_output(x) else ops.stop_gradient(x)


def _is_stop_gradient_output(x) -> bool:
    """Whether ``x`` is a TensorFlow graph tensor computed by StopGradient."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.is_symbolic_tensor(x) and x.op.type == "StopGradient"


def channel_product(x, factor, axis: Axis):
    """``x`` times one value of ``factor`` per channel of ``axis`` (several axes flattened
    row-major, as :func:`normalize_axes` describes): a folded kernel ``w * f``."""
    axes = normalize_axes(axis, len(x.shape), "channel_product")
    shape = [int(x.shape[a]) if a in axes else 1 for a in range(len(x.shape))]
    return x * ops.reshape(ops.cast(factor, x.dtype), shape)


# --------------------------------------------------------------------------------------
# fake_quant
# --------------------------------------------------------------------------------------


def fake_quant(
    x,
    min,
    max,
    num_bits: int = 8,
    narrow_range: bool = False,
    axis: Axis = None,
    *,
    exportable: bool = True,
    factor=None,
    activation: str | None = None,
):
    """Quantize ``x`` to ``num_bits`` on the grid of ``[min, max]`` and dequantize it.

    Args:
        x: a float tensor of any rank (float16/bfloat16/float64 are computed in float32
            and cast back).
        min, max: the range; scalars when ``axis`` is None, else vectors with one entry
            per channel of ``axis``.
        num_bits: 2..16.
        narrow_range: use codes ``1..2**bits - 1`` instead of ``0..2**bits - 1``.
        axis: None for one range for the whole tensor; an int (any axis of a rank 1..5
            tensor, negative allowed) or a tuple of ints (flattened row-major into one
            channel axis, e.g. a depthwise kernel's ``(-2, -1)``) for per-axis ranges.
        exportable: on TensorFlow, run TF's own fake-quant ops, which the TFLite converter
            turns into quantization. ``False`` allows a faster fused kernel for per-axis
            ranges with the same output and gradients; the quantizers use it everywhere but
            in a converter's trace (:func:`exporting`).
        factor: per-axis only: quantize ``channel_product(x, factor, axis)`` (one value per
            channel, a constant: no gradient flows to it), the same bits and the same
            gradient for ``x`` as quantizing the product. The fused kernel multiplies inside
            its forward and backward passes, so the product (a folded kernel ``w * f``) is
            neither materialized nor kept for the backward pass; other paths multiply first.
        activation: ``"relu"`` or ``"relu6"``: quantize that activation of ``x`` (after the
            factor), the same bits and gradients as ``keras.ops.relu``/``relu6`` before the
            fake quant. The per-tensor training kernel of large tensors
            (:func:`fuses_activation`) applies it inside and keeps one byte per element for the
            backward pass, instead of the activation's output (which the float network keeps
            once, as the next layer's input, and fake quantization would keep a second time).

    Returns:
        A tensor of ``x``'s shape and dtype whose values lie on the quantization grid.
        Bit-identical to ``tf.quantization.fake_quant_with_min_max_vars`` (per-tensor) or
        ``..._per_channel`` (per-axis) for every range that TF maps to finite values.
    """
    num_bits = validate_num_bits(num_bits)
    x = ops.convert_to_tensor(x)
    dtype = _check_float_input(x, "fake_quant")
    _check_concrete_range(min, max, "fake_quant")
    per_axis = axis is not None
    axes = normalize_axes(axis, len(x.shape)) if per_axis else ()
    _check_per_channel_shapes(x, {"min": min, "max": max}, axes, per_axis)
    if factor is not None:
        if not per_axis:
            raise ValueError(
                "fake_quant: factor scales each channel of a per-axis quantization; per-tensor "
                "quantization (axis=None) takes none. Multiply the tensor first."
            )
        _check_per_channel_shapes(x, {"factor": factor}, axes, per_axis)
        factor = without_gradient(factor)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"fake_quant: activation must be one of {ACTIVATIONS} or None, got {activation!r}.")
    if num_bits < 8 and is_exporting() and keras.backend.backend() == "tensorflow":
        return _low_bit_for_export(before_quantization(x, axes, factor, activation), min, max, num_bits, narrow_range, axes)
    if _is_concrete(min) and _is_concrete(max):
        # The same float32 arithmetic in NumPy: one conversion each instead of six eager ops.
        min, max = (ops.convert_to_tensor(v) for v in sanitized_range(min, max, np))
    else:
        min, max = _sanitize_range(min, max)
    compute = x if dtype == "float32" else ops.cast(x, "float32")
    if activation is not None and (per_axis or exportable or not fuses_activation(compute)):
        compute, factor, activation = before_quantization(compute, axes, factor, activation), None, None
    if keras.backend.backend() == "tensorflow":
        out = _fake_quant_tf(compute, min, max, num_bits, narrow_range, axes, exportable, factor, activation)
    else:
        out = _fake_quant_portable(before_quantization(compute, axes, factor, None), min, max, num_bits, narrow_range, axes)
    return out if dtype == "float32" else ops.cast(out, dtype)


def _check_per_channel_shapes(x, values: dict, axes, per_axis) -> None:
    """Each of ``values`` (by argument name) a scalar per tensor, or one entry per channel."""
    for name, value in values.items():
        shape = tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)
        if not per_axis:
            if shape not in ((),):
                raise ValueError(
                    f"fake_quant: per-tensor quantization (axis=None) takes a scalar {name}, "
                    f"got shape {shape}; pass axis=... for per-axis ranges."
                )
            continue
        expected = channel_count(x.shape, axes)
        if len(shape) != 1 or (expected is not None and shape[0] is not None and shape[0] != expected):
            raise ValueError(
                f"fake_quant: per-axis {name} must have shape ({expected},), one entry per "
                f"channel of axis {axes} of a tensor of shape {tuple(x.shape)}; got {shape}."
            )


def _fake_quant_tf(x, min, max, num_bits, narrow_range, axes, exportable, factor=None, activation=None):
    """TensorFlow backend: TF's own ops, which the TFLite converter folds into quantization
    (``factor`` multiplied first), or the training kernels (``factor`` multiplied inside;
    ``activation`` applied inside, per tensor: :func:`fake_quant` applies it first elsewhere)."""
    import tensorflow as tf

    if not axes:
        if exportable or _is_small(x, _LARGE_TENSOR_MIN_ELEMENTS):
            return tf.quantization.fake_quant_with_min_max_vars(
                x, min, max, num_bits=num_bits, narrow_range=narrow_range
            )
        return _per_tensor_keeping_classes_tf(x, min, max, num_bits, narrow_range, activation)
    moved, layout = _to_channels_last(
        x, axes, shape_fn=_tf_shape_list, reshape=tf.reshape, transpose=tf.transpose
    )
    # TF's per-channel gradient op takes rank <= 4; the fused kernel takes any rank.
    if exportable or (_is_small(moved) and len(moved.shape) <= 4):
        if factor is not None:
            moved = moved * factor  # channels last: the factor broadcasts along the last axis
        y = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            moved, min, max, num_bits=num_bits, narrow_range=narrow_range
        )
    else:
        y = _fused_per_channel_tf(moved, min, max, num_bits, narrow_range, factor)
    return _from_channels_last(y, layout, reshape=tf.reshape, transpose=tf.transpose)


def _concrete(value) -> np.ndarray:
    """The value of a range (a variable, or a constant) now, read eagerly even while a
    converter traces the model: exporting freezes the ranges anyway."""
    import tensorflow as tf

    if tf.is_tensor(value) and not isinstance(value, tf.Variable) and not hasattr(value, "numpy"):
        static = tf.get_static_value(value)
        if static is None:
            raise NotDeployableError(
                "tflite",
                {"?": "fake_quant: exporting a quantizer below 8 bits needs its range as a variable or a "
                 "constant, not a value computed in the graph."},
            )
        return np.asarray(static, np.float32)
    with tf.init_scope():
        return np.asarray(keras.ops.convert_to_numpy(value), np.float32)


def evaluated_now(compute):
    """``compute()``'s tensors as float32 NumPy arrays, computed eagerly even while a converter
    traces the model (as :func:`_concrete` reads a range): for a range derived from variables,
    which an exporter needs as a constant."""
    if keras.backend.backend() != "tensorflow":
        return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t), np.float32), compute())
    import tensorflow as tf

    with tf.init_scope():
        return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t), np.float32), compute())


def _low_bit_for_export(x, min, max, num_bits, narrow_range, axes):
    """What a converter traces for a quantizer below 8 bits: int8 tensors on the trained grid.

    TFLite's int8 kernels hold 2..7-bit values in int8 tensors. An 8-bit fake quantization
    on the range that has exactly the trained scale and signed zero point
    (:func:`keras_qat.grid.widened_range`) makes the converter emit such a tensor. A
    narrow-range quantizer (a weight's, constant) first runs its own low-bit op, so the values
    are the trained ones; any other (an activation) is clamped to the low-bit codes between two
    such 8-bit ops, which the converter turns into MAXIMUM/MINIMUM (or a fused RELU) on the same
    scale, so that a kernel's int8 output saturates where the trained low-bit grid ends.
    """
    import tensorflow as tf

    from keras_qat.grid import from_range, widened_range

    grid = from_range(_concrete(min), _concrete(max), num_bits, narrow_range, axes)
    wide_min, wide_max = widened_range(grid)
    axis = axes or None
    if narrow_range:
        on_grid = _fake_quant_tf(ops.cast(x, "float32"), *_sanitize_range(min, max), num_bits, narrow_range, axes, True)
        return _fake_quant_tf(on_grid, wide_min, wide_max, 8, True, axes, True)
    if axis is not None:
        raise NotDeployableError(
            "tflite",
            {"?": f"fake_quant: a per-axis {num_bits}-bit activation quantizer cannot be exported to TFLite; "
             "quantize activations per tensor below 8 bits."},
        )
    wide = _fake_quant_tf(ops.cast(x, "float32"), wide_min, wide_max, 8, False, axes, True)
    scale = np.asarray(grid.scale, np.float64)
    low = ((grid.qmin - grid.zero_point) * scale).astype(np.float32)
    high = ((grid.qmax - grid.zero_point) * scale).astype(np.float32)
    clamped = tf.minimum(tf.maximum(wide, low), high)
    return _fake_quant_tf(clamped, wide_min, wide_max, 8, False, axes, True)


#: Below this many elements TF's per-channel op is as fast as the fused kernel, whose launch
#: costs about 0.1 ms more (measured on 2 cores; 36,864 elements break even).
_FUSED_MIN_ELEMENTS = 32_768


#: From this many elements training graphs take XLA kernels where TF's ops make extra passes
#: (:func:`_per_tensor_keeping_classes_tf`, :func:`reduce_range` per channel); below it
#: their launch and the small ops around them cost more than they save (the digits CNN's
#: 32x8x8x16 activations trained 7% slower with the per-tensor gradients).
_LARGE_TENSOR_MIN_ELEMENTS = 131_072


def _is_small(x, min_elements: int | None = None) -> bool:
    """Whether ``x`` has fewer than ``min_elements`` (default :data:`_FUSED_MIN_ELEMENTS`)
    elements, all of its dimensions known."""
    return static_size(x.shape) < (_FUSED_MIN_ELEMENTS if min_elements is None else min_elements)


def _fused_per_channel_tf(x, min, max, num_bits, narrow_range, factor=None):
    """TF's per-channel fake quant (channels last) of ``x * factor`` (one constant per
    channel; 1 without) as fused XLA kernels, with TF's gradient.

    The grid is computed per channel with ordinary TF ops (:func:`nudge`); the per-element
    work, forward and backward, runs as one XLA kernel each. Products that TF rounds before
    adding are kept from being contracted into fused multiply-adds, as on JAX. The kernels
    multiply by the factor themselves: the backward pass keeps ``x`` (a variable's value, which
    costs nothing to keep) instead of the product, a tensor as large.
    """
    import tensorflow as tf

    forward, input_gradient, range_gradient = _tf_fused_kernels()
    x = tf.convert_to_tensor(x)  # a variable's value: the custom gradient below takes tensors
    factor = tf.ones_like(min) if factor is None else tf.convert_to_tensor(factor)
    qmin, qmax = quant_range(num_bits, narrow_range)
    qmin_f, qmax_f = tf.constant(np.float32(qmin)), tf.constant(np.float32(qmax))

    @tf.custom_gradient
    def kernel(x, min, max):
        out, nudged_min, nudged_max, zero_range = forward(x, factor, min, max, qmin_f, qmax_f)

        def grad(upstream):
            # Two kernels, so that a graph drops the range's sums where the range is not
            # trained (a weight's last-value range): they cost twice the input's gradient.
            d_x = input_gradient(x, factor, upstream, nudged_min, nudged_max, zero_range)
            return (d_x, *range_gradient(x, factor, upstream, nudged_min, nudged_max, zero_range))

        return out, grad

    return kernel(x, min, max)


def _per_tensor_keeping_classes_tf(x, min, max, num_bits, narrow_range, activation=None):
    """TF's per-tensor fake quant (of TF's Relu or Relu6 of ``x``, with ``activation``) as one op
    whose backward pass keeps one byte per element instead of a float: its class, where the
    gradient passes to ``x`` (the fake quant's straight-through mask, times the activation's
    own, TF's ``features > 0`` (``and < 6``) on its output) and where the value lies below or
    above the range (the range's gradients).

    TF's gradient op keeps the quantized tensor itself and computes all three gradients in one
    kernel, three passes: 25 ms of a 345 ms ResNet50 step at batch 32. Here the range's sums
    are a kernel of their own, which a graph drops where the range is not trained (the
    moving-average ranges of the default schemes); and neither ``x`` nor the activation's
    output waits for the backward pass (the float network keeps the activation's output once,
    as the next layer's input, and a second copy cost ResNet50 85 MiB).
    """
    import tensorflow as tf

    classify, input_gradient, range_gradient = _tf_class_kernels()
    x = tf.convert_to_tensor(x)
    qmin, qmax = quant_range(num_bits, narrow_range)
    cap = tf.constant(np.float32(6.0 if activation == "relu6" else np.inf))

    @tf.custom_gradient
    def kernel(x, min, max):
        activated = x if activation is None else tf.nn.relu6(x) if activation == "relu6" else tf.nn.relu(x)
        out = tf.quantization.fake_quant_with_min_max_vars(activated, min, max, num_bits=num_bits, narrow_range=narrow_range)
        nudged_min, nudged_max, zero_range = _nudged_bounds(min, max, tf.constant(np.float32(qmin)), tf.constant(np.float32(qmax)))
        where = classify(activated, nudged_min, nudged_max, zero_range, cap, activation is not None)

        def grad(upstream):
            return (input_gradient(upstream, where), *range_gradient(upstream, where))

        return out, grad

    return kernel(x, min, max)


def _nudged_bounds_fn(min, max, qmin_f, qmax_f):
    """The nudged range of ``[min, max]`` (:func:`nudge`) and whether the range is ``[0, 0]``."""
    import tensorflow as tf

    grid = _nudge(min, max, qmin_f, qmax_f)
    return grid.nudged_min, grid.nudged_max, tf.logical_and(tf.equal(min, 0.0), tf.equal(max, 0.0))


#: :func:`_nudged_bounds_fn` as one op of a training graph, the same TF ops traced once
#: (:func:`shared`) for every quantizer instead of two dozen scalar ops in each.
_nudged_bounds = shared(_nudged_bounds_fn)


#: The classes :func:`_per_tensor_keeping_classes_tf` keeps per element.
_BLOCKED, _PASSES, _BELOW, _ABOVE = 0, 1, 2, 3


@functools.lru_cache(maxsize=None)
def _tf_class_kernels():
    """The XLA kernels of :func:`_per_tensor_keeping_classes_tf`: the class of each element
    (uint8), and from it the input's gradient and the range's."""
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def classify(activated, nudged_min, nudged_max, zero_range, cap, clamped: bool):
        """The class of each element of the tensor quantized (``activated``; where ``clamped``,
        the output of an activation that passes gradients inside ``(0, cap)``)."""
        active = tf.logical_and(activated > 0.0, activated < cap) if clamped else tf.ones_like(activated, tf.bool)
        inside = tf.logical_and(activated >= nudged_min, activated <= nudged_max)
        passes = tf.logical_and(active, tf.logical_or(zero_range, inside))
        below = tf.logical_and(tf.logical_not(zero_range), activated < nudged_min)
        above = tf.logical_and(tf.logical_not(zero_range), activated > nudged_max)
        return tf.where(passes, np.uint8(_PASSES), tf.where(below, np.uint8(_BELOW), tf.where(above, np.uint8(_ABOVE), np.uint8(_BLOCKED))))

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def input_gradient(upstream, where):
        """The upstream gradient where it passes both the activation and the fake quant, else 0:
        the product of TF's two masks with it."""
        return upstream * tf.cast(tf.equal(where, np.uint8(_PASSES)), tf.float32)

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def range_gradient(upstream, where):
        """The upstream gradient summed below and above the range (0 for ``[0, 0]``)."""
        below = tf.cast(tf.equal(where, np.uint8(_BELOW)), tf.float32)
        above = tf.cast(tf.equal(where, np.uint8(_ABOVE)), tf.float32)
        return tf.reduce_sum(upstream * below), tf.reduce_sum(upstream * above)

    return classify, input_gradient, range_gradient


@functools.lru_cache(maxsize=None)
def _tf_fused_kernels():
    """The forward (the grid, then an XLA kernel) of :func:`_fused_per_channel_tf`, and the XLA
    kernels of its backward: the input's gradient and the range's, per channel."""
    import tensorflow as tf

    def uncontracted_product(a, b):
        # XLA lets LLVM fuse ``a * b - c`` into one FMA; an integer OR of the product with its
        # own NaN flag (0 for numbers) is opaque to it and keeps TF's two roundings.
        product = a * b
        nan_flag = tf.cast(tf.math.is_nan(product), tf.uint32)
        bits = tf.bitwise.bitwise_or(tf.bitcast(product, tf.uint32), nan_flag)
        return tf.bitcast(bits, tf.float32)

    # Each kernel takes ``x`` and its ``factor`` (per channel, the last axis; 1 where there is
    # none) and quantizes their product, rounded once as TF's Mul rounds it: a lone product
    # feeding a clamp or a comparison, which no multiply-add can absorb.

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def fused_forward(x, factor, nudged_min, nudged_max, scale, inv_scale, quant_zero, zero_range):
        shifted = tf.maximum(tf.minimum(x * factor, nudged_max), nudged_min) - nudged_min
        out = tf.floor(uncontracted_product(shifted, inv_scale) - quant_zero + 0.5) * scale
        return tf.where(zero_range, 0.0, out)

    @tf.function(autograph=False, reduce_retracing=True)
    def forward(x, factor, min, max, qmin_f, qmax_f):
        # The grid with TF's ops in a graph function (not XLA), then the XLA kernel: in eager
        # mode one call instead of ~25 eager ops; inside a graph the same ops, inlined. The
        # integer range comes in as tensors, so that one trace serves every bit width.
        grid = _nudge(min, max, qmin_f, qmax_f)
        zero_range = tf.logical_and(tf.equal(min, 0.0), tf.equal(max, 0.0))
        quant_zero = tf.floor(-grid.nudged_min * grid.inv_scale + 0.5)
        out = fused_forward(x, factor, grid.nudged_min, grid.nudged_max, grid.scale, grid.inv_scale, quant_zero, zero_range)
        return out, grid.nudged_min, grid.nudged_max, zero_range

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def input_gradient(x, factor, upstream, nudged_min, nudged_max, zero_range):
        """The upstream gradient inside the nudged range, 0 outside, all of it for ``[0, 0]``;
        times the factor, as TF's Mul passes a product's gradient to ``x``."""
        product = x * factor
        inside = tf.cast(tf.logical_and(product >= nudged_min, product <= nudged_max), tf.float32)
        return tf.where(zero_range, upstream, upstream * inside) * factor

    @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
    def range_gradient(x, factor, upstream, nudged_min, nudged_max, zero_range):
        """Per channel (the last axis), the upstream gradient summed below and above the range."""
        product = x * factor
        below = tf.cast(product < nudged_min, tf.float32)
        above = tf.cast(product > nudged_max, tf.float32)
        rows = tf.range(tf.rank(x) - 1)  # all but the channel axis; constant under XLA
        d_min = tf.where(zero_range, 0.0, tf.reduce_sum(upstream * below, axis=rows))
        d_max = tf.where(zero_range, 0.0, tf.reduce_sum(upstream * above, axis=rows))
        return d_min, d_max

    return forward, input_gradient, range_gradient


def _tf_shape_list(t):
    import tensorflow as tf

    dynamic = tf.shape(t)
    return [dim if dim is not None else dynamic[i] for i, dim in enumerate(t.shape.as_list())]


def _keras_shape_list(t):
    return list(ops.shape(t))


def _fake_quant_portable(x, min, max, num_bits, narrow_range, axes):
    """JAX / PyTorch backends: TF's arithmetic in keras.ops, with TF's gradient."""
    moved, layout = (x, None)
    if axes:
        moved, layout = _to_channels_last(
            x, axes, shape_fn=_keras_shape_list, reshape=ops.reshape, transpose=ops.transpose
        )
    qmin, qmax = quant_range(num_bits, narrow_range)
    kernel = _portable_kernel(per_channel=bool(axes))
    y = kernel(
        moved,
        min,
        max,
        ops.convert_to_tensor(np.float32(qmin)),
        ops.convert_to_tensor(np.float32(qmax)),
    )
    if axes:
        y = _from_channels_last(y, layout, reshape=ops.reshape, transpose=ops.transpose)
    return y


@functools.lru_cache(maxsize=None)
def _portable_kernel(per_channel: bool):
    """The fake-quant kernel for one layout, as a custom-gradient function.

    ``x`` has its channels last when ``per_channel``; ``min``/``max`` then broadcast against
    the last axis. The integer range comes in as tensors, so that one compiled kernel serves
    every bit width. On JAX the kernel is jitted once per layout (and inlined into an outer
    jit), instead of compiling each of its operations for every new shape in eager mode.
    """

    @ops.custom_gradient
    def kernel(x, min, max, qmin_f, qmax_f):
        grid = _nudge(min, max, qmin_f, qmax_f)
        zero_range = ops.logical_and(ops.equal(min, 0.0), ops.equal(max, 0.0))
        quant_zero = ops.floor(_rounded_product(-grid.nudged_min, grid.inv_scale) + 0.5)
        clamped = ops.maximum(ops.minimum(x, grid.nudged_max), grid.nudged_min)
        shifted = clamped - grid.nudged_min
        if per_channel:
            steps = _rounded_product(shifted, grid.inv_scale)
        else:
            steps = exact_divide(shifted, grid.scale)
        out = ops.floor(steps - quant_zero + 0.5) * grid.scale
        out = ops.where(zero_range, 0.0, out)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            inside = ops.logical_and(x >= grid.nudged_min, x <= grid.nudged_max)
            below = ops.cast(x < grid.nudged_min, "float32")
            above = ops.cast(x > grid.nudged_max, "float32")
            d_x = ops.where(zero_range, upstream, upstream * ops.cast(inside, "float32"))
            reduce_axes = tuple(range(len(x.shape) - 1)) if per_channel else None
            d_min = ops.where(zero_range, 0.0, ops.sum(upstream * below, axis=reduce_axes))
            d_max = ops.where(zero_range, 0.0, ops.sum(upstream * above, axis=reduce_axes))
            return d_x, d_min, d_max, ops.zeros_like(qmin_f), ops.zeros_like(qmax_f)

        return out, grad

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(kernel)
    return kernel
