"""The two layers that make SegNet SegNet: pooling that remembers, unpooling that puts back.

SegNet's decoder does not learn to upsample: it places each value back at the position its
encoder's max pooling took it from, and lets the following convolutions fill the zeros.
Both layers are written the Keras way (``__init__``/``build``/``call``/``get_config``,
registered serializable), so a model using them saves to ``.keras`` and loads with
``safe_mode=True`` and no Lambda layers.

What the pooling remembers: for each pooled value, its position inside its own window
(0..k*k-1, row-major), as ``uint8``. The paper stores "max-pooling indices"; a window
position is the same information in one byte per value, instead of an int64 index into the
whole batch, and it needs no integer division or scatter to use. Ties go to the first
maximum in row-major order, as ``tf.nn.max_pool_with_argmax`` does.

Why the pooling and unpooling are written as reshapes and selects, compiled with XLA:
``max_pool_with_argmax`` plus ``scatter_nd`` cost this slim SegNet more time on a CPU than its
13 full-resolution convolutions' worth of memory traffic should (measured: 105 ms of a
274 ms forward pass at 2x360x480). Seen as a ``(B*H/k, k, W/k, k, C)`` view, pooling is a
max over two axes and unpooling a select broadcast over them; XLA fuses each into one pass
over memory (14 ms together). Only these element-wise steps are compiled: the convolutions
stay on oneDNN/cuDNN, which XLA on a CPU does not beat.

Why the unpooling takes the *pre-pool tensor* as an input: "SAME" pooling rounds odd sizes up
(45 -> 23), so "twice the pooled size" (46) is wrong for every odd size. Unpooling into the
exact pre-pool shape makes any height and width work, 1x1 and primes included.

Why ``supports_jit = False``: it keeps Keras from compiling the *whole* model with XLA when it
trains on a GPU (``jit_compile="auto"``); the convolutions are better served by cuDNN and the
layers already compile their own element-wise work.

Why a third, *export* form (``export_windows``): the same reshapes and selects, traced once
with no XLA sub-function and no run-time flag, in the ops that converters (tf2onnx, the
LiteRT converter) translate faithfully. It computes exactly what the other two compute; the
differences are in how the numbers are spelled: the padding is ``(k - h % k) % k`` instead
of ``-h % k`` (tf2onnx turns a floor modulo of a negative number into a C remainder: 37 rows
padded by -1, i.e. cropped), the pooled value is the window maximum itself rather than a
select of it (tf2onnx writes a float select as arithmetic, and ``0 * -inf`` of the padding
is NaN), reshapes carry the static channel count (the LiteRT converter needs it for the next
convolution), and window positions are ``int32`` (LiteRT's select has no plain ``uint8``).
``segnet_cli.export`` traces the model under it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import keras
import tensorflow as tf

_COMPILE = contextvars.ContextVar("segnet_compile_windows", default=True)
_EXPORT = contextvars.ContextVar("segnet_export_windows", default=False)


@contextlib.contextmanager
def compiled_windows(enabled) -> Iterator[None]:
    """Run the pooling and unpooling traced inside this block with or without XLA.

    Args:
        enabled: ``True`` (the default outside any block) or ``False``; or a scalar bool
            tensor of the graph being traced, to choose at run time with one trace (a
            ``tf.cond`` per layer), so both paths share the graph's convolution kernels.

    XLA compiles once per input shape (about 0.5-0.7 s for this model on a CPU). Inference
    on a stream of shapes that never repeat is faster without it; ``Segmenter`` decides.
    """
    token = _COMPILE.set(enabled)
    try:
        yield
    finally:
        _COMPILE.reset(token)


@contextlib.contextmanager
def export_windows() -> Iterator[None]:
    """Trace the pooling and unpooling inside this block in their export form.

    The plain element-wise ops (no XLA, no ``tf.cond``), spelled so that ONNX and LiteRT
    converters translate them exactly (see the module notes). Results are identical to the
    other forms; the window positions it returns are ``int32`` instead of ``uint8``.
    """
    token = _EXPORT.set(True)
    try:
        yield
    finally:
        _EXPORT.reset(token)


def _choose(compiled_fn, plain_fn, *args):
    if _EXPORT.get():
        return plain_fn(*args, export=True)
    flag = _COMPILE.get()
    if isinstance(flag, bool):
        return (compiled_fn if flag else plain_fn)(*args)
    return tf.cond(flag, lambda: compiled_fn(*args), lambda: plain_fn(*args))


def _windows(x, kh: int, kw: int, same: bool, export: bool = False):
    """``x`` as ``(B*H', kh, W', kw, C)`` windows: padded with -inf ("same") or cropped.

    Batch and window rows share the leading axis because XLA on a CPU splits work across
    threads along it: with the batch alone there, a batch of one ran on one core.
    """
    shape = tf.shape(x)
    h, w = shape[1], shape[2]
    if same:
        if export:  # the same numbers, no negative operand (see the module notes)
            pads = [[0, 0], [0, (kh - h % kh) % kh], [0, (kw - w % kw) % kw], [0, 0]]
        else:
            pads = [[0, 0], [0, -h % kh], [0, -w % kw], [0, 0]]
        x = tf.pad(x, pads, constant_values=float("-inf"))
    else:
        x = x[:, : h - h % kh, : w - w % kw, :]
    shape = tf.shape(x)
    channels = x.shape[-1] if export and x.shape[-1] is not None else shape[3]
    return tf.reshape(x, (-1, kh, shape[2] // kw, kw, channels)), shape[1] // kh


def _pool(x, kh: int, kw: int, same: bool, export: bool = False):
    win, rows = _windows(x, kh, kw, same, export)
    top = tf.reduce_max(win, axis=(1, 3))
    last = kh * kw - 1
    index = tf.int32 if export else tf.uint8
    # First maximum in row-major order: walk the positions backwards, earlier ones win.
    where = tf.fill(tf.shape(top), tf.constant(last, index))
    pooled = win[:, last // kw, :, last % kw, :]
    for pos in range(last - 1, -1, -1):
        candidate = win[:, pos // kw, :, pos % kw, :]
        hit = tf.equal(candidate, top)
        where = tf.where(hit, tf.constant(pos, index), where)
        if not export:
            # Select the input itself (not ``top``) so the gradient goes to that one position.
            pooled = tf.where(hit, candidate, pooled)
    if export:
        # No gradient to route: the maximum itself. (tf2onnx turns a float select into
        # ``c * a + (1 - c) * b``, which gives NaN where a padded -inf is not chosen.)
        pooled = top
    shape = tf.shape(top)
    channels = x.shape[-1] if export and x.shape[-1] is not None else shape[2]
    out = (tf.shape(x)[0], rows, shape[1], channels)
    return tf.reshape(pooled, out), tf.reshape(where, out)


def _unpool(values, where, reference, kh: int, kw: int, export: bool = False):
    shape = tf.shape(values)
    channels = values.shape[-1] if export and values.shape[-1] is not None else shape[3]
    flat = (-1, 1, shape[2], 1, channels)  # batch and rows on the leading axis, as in pooling
    index = tf.int32 if export else tf.uint8
    positions = tf.constant(list(range(kh * kw)), index, shape=(1, kh, 1, kw, 1))
    spread = tf.where(
        tf.equal(tf.reshape(where, flat), positions),
        tf.reshape(values, flat),
        tf.zeros((), values.dtype),
    )
    out = tf.reshape(spread, (shape[0], shape[1] * kh, shape[2] * kw, channels))
    h, w = tf.shape(reference)[1], tf.shape(reference)[2]
    out = out[:, :h, :w, :]
    # "valid" pooling dropped the last rows/columns: they come back as zeros.
    out = tf.pad(out, [[0, 0], [0, h - tf.shape(out)[1]], [0, w - tf.shape(out)[2]], [0, 0]])
    if export:  # a pad by computed amounts loses the static channels the next conv needs
        out = tf.reshape(out, (shape[0], h, w, channels))
    return out


# Compiled once per input shape; the traces themselves are shape-relaxed.
_pool_xla = tf.function(_pool, jit_compile=True, reduce_retracing=True)
_unpool_xla = tf.function(_unpool, jit_compile=True, reduce_retracing=True)


def _pair(value) -> tuple[int, int]:
    return (int(value),) * 2 if isinstance(value, int) else tuple(int(v) for v in value)


@keras.saving.register_keras_serializable(package="segnet")
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """Max pooling over non-overlapping windows that also returns where each maximum was.

    Args:
        pool_size: Height and width of the pooling window (at most 16x16).
        strides: Step of the window; must equal ``pool_size`` (defaults to it), because
            unpooling puts each value back into its own window.
        padding: ``"same"`` (any size works; odd sizes round up) or ``"valid"``.

    Call returns ``(pooled, where)``: ``where`` is ``uint8`` with the pooled shape and holds,
    for each pooled value, its row-major position inside its window.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding: str = "same", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size)
        self.strides = self.pool_size if strides is None else _pair(strides)
        self.padding = padding.lower()
        if self.strides != self.pool_size:
            raise ValueError("MaxPoolingWithArgmax2D needs strides equal to pool_size")
        if self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', not {padding!r}")
        if self.pool_size[0] * self.pool_size[1] > 256 or min(self.pool_size) < 1:
            raise ValueError(f"pool_size {self.pool_size} is out of range")
        self.supports_jit = False

    def build(self, input_shape):
        self.built = True

    def call(self, inputs):
        pooled, where = _choose(
            _pool_xla, _pool, inputs, *self.pool_size, self.padding == "same"
        )
        shape, _ = self.compute_output_shape(inputs.shape)
        pooled.set_shape(shape)
        where.set_shape(shape)
        # The positions carry no gradient; the pooled output does.
        return pooled, tf.stop_gradient(where)

    def _out_dim(self, size, k):
        if size is None:
            return None
        return -(-size // k) if self.padding == "same" else size // k

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        shape = (b, self._out_dim(h, self.pool_size[0]), self._out_dim(w, self.pool_size[1]), c)
        return shape, shape

    def compute_output_spec(self, inputs):
        shape, _ = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, dtype=inputs.dtype),
            keras.KerasTensor(shape, dtype="uint8"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"pool_size": self.pool_size, "strides": self.strides, "padding": self.padding}
        )
        return config


@keras.saving.register_keras_serializable(package="segnet")
class MaxUnpooling2D(keras.layers.Layer):
    """Place each value back at the window position its pooling recorded; zeros elsewhere.

    Args:
        pool_size: the window of the pooling being undone.

    Call with ``[values, where, reference]``: ``values`` and ``where`` have the pooled
    shape, ``reference`` is the tensor that was pooled (only its dynamic shape is used), so
    the output has exactly the pre-pool height and width.
    """

    def __init__(self, pool_size=(2, 2), **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size)
        self.supports_jit = False

    def build(self, input_shape):
        self.built = True

    def call(self, inputs):
        values, where, reference = inputs
        out = _choose(_unpool_xla, _unpool, values, where, reference, *self.pool_size)
        # Static channel count helps the next Conv2D build its kernel.
        out.set_shape(reference.shape[:-1].concatenate(values.shape[-1:]))
        return out

    def compute_output_shape(self, values_shape, where_shape, reference_shape):
        return (*reference_shape[:-1], values_shape[-1])

    def compute_output_spec(self, inputs):
        values, _, reference = inputs
        return keras.KerasTensor((*reference.shape[:-1], values.shape[-1]), dtype=values.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": self.pool_size})
        return config
