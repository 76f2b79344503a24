"""The two layers that make SegNet SegNet: pooling that remembers, unpooling that puts back.

SegNet's decoder does not learn to upsample: it places each value back at the position its
encoder's max pooling took it from, and lets the following convolutions fill the zeros.
Both layers are written the Keras way (``__init__``/``build``/``call``/``get_config``,
registered serializable), so a model using them saves to ``.keras`` and loads with
``safe_mode=True`` and no Lambda layers.

Why the unpooling takes the *pre-pool tensor* as an input: "SAME" pooling rounds odd sizes up
(45 -> 23), so "twice the pooled size" (46) is wrong for every odd size. Scattering into the
exact pre-pool shape makes any height and width work, 1x1 and primes included.

Why indices are int64 and include the batch: the flat index of a (4, 360, 480, 64) tensor is
already ~44M, past float32's exact integers (2^24), and CPU and GPU kernels once disagreed on
the per-image convention; ``include_batch_in_index=True`` is the one both honour.

Why ``supports_jit = False``: ``MaxPoolWithArgmax`` has no XLA kernel, and Keras resolves
``jit_compile="auto"`` to True on a GPU unless a layer declares it cannot be compiled.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="segnet")
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """2x2 max pooling that also returns where each maximum came from.

    Args:
        pool_size: Height and width of the pooling window.
        strides: Step of the window; defaults to ``pool_size``.
        padding: ``"same"`` (any size works; odd sizes round up) or ``"valid"``.

    Call returns ``(pooled, indices)``: ``indices`` is int64 with the pooled shape and holds,
    for each pooled value, its flat index into the *whole input batch* tensor.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding: str = "same", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(pool_size) if not isinstance(pool_size, int) else (pool_size,) * 2
        strides = self.pool_size if strides is None else strides
        self.strides = tuple(strides) if not isinstance(strides, int) else (strides,) * 2
        self.padding = padding.lower()
        self.supports_jit = False

    def build(self, input_shape):
        self.built = True

    def call(self, inputs):
        pooled, indices = tf.nn.max_pool_with_argmax(
            inputs,
            ksize=(1, *self.pool_size, 1),
            strides=(1, *self.strides, 1),
            padding=self.padding.upper(),
            output_dtype=tf.int64,
            include_batch_in_index=True,
        )
        # The indices carry no gradient; the pooled output does (the op registers one).
        return pooled, tf.stop_gradient(indices)

    def _out_dim(self, size, k, s):
        if size is None:
            return None
        if self.padding == "same":
            return -(-size // s)
        return (size - k) // s + 1

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        shape = (
            b,
            self._out_dim(h, self.pool_size[0], self.strides[0]),
            self._out_dim(w, self.pool_size[1], self.strides[1]),
            c,
        )
        return shape, shape

    def compute_output_spec(self, inputs):
        shape, _ = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, dtype=inputs.dtype),
            keras.KerasTensor(shape, dtype="int64"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"pool_size": self.pool_size, "strides": self.strides, "padding": self.padding}
        )
        return config


@keras.saving.register_keras_serializable(package="segnet")
class MaxUnpooling2D(keras.layers.Layer):
    """Place each value back at the flat index its pooling recorded; zeros elsewhere.

    Call with ``[values, indices, reference]``: ``values`` and ``indices`` have the pooled
    shape, ``reference`` is the tensor that was pooled (only its dynamic shape is used), so
    the output has exactly the pre-pool height and width.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_jit = False

    def build(self, input_shape):
        self.built = True

    def call(self, inputs):
        values, indices, reference = inputs
        out_shape = tf.shape(reference, out_type=tf.int64)
        flat_size = tf.reduce_prod(out_shape)
        flat = tf.scatter_nd(
            tf.reshape(indices, (-1, 1)),
            tf.reshape(values, (-1,)),
            tf.reshape(flat_size, (1,)),
        )
        out = tf.reshape(flat, out_shape)
        # Static channel count helps the next Conv2D build its kernel.
        out.set_shape(reference.shape[:-1].concatenate(values.shape[-1:]))
        return out

    def compute_output_shape(self, values_shape, indices_shape, reference_shape):
        return (*reference_shape[:-1], values_shape[-1])

    def compute_output_spec(self, inputs):
        values, _, reference = inputs
        return keras.KerasTensor((*reference.shape[:-1], values.shape[-1]), dtype=values.dtype)

    def get_config(self):
        return super().get_config()
