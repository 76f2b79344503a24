"""Pooling-with-argmax and unpooling against a NumPy reference, odd sizes, save/load."""

from __future__ import annotations

import numpy as np
import pytest


def np_pool_argmax(x: np.ndarray):
    """Reference 2x2/2 SAME max pooling with batch-inclusive flat argmax indices."""
    b, h, w, c = x.shape
    ph, pw = -(-h // 2), -(-w // 2)
    pooled = np.zeros((b, ph, pw, c), x.dtype)
    idx = np.zeros((b, ph, pw, c), np.int64)
    for n in range(b):
        for i in range(ph):
            for j in range(pw):
                for k in range(c):
                    best, where = -np.inf, -1
                    for y in range(2 * i, min(2 * i + 2, h)):
                        for xx in range(2 * j, min(2 * j + 2, w)):
                            if x[n, y, xx, k] > best:
                                best = x[n, y, xx, k]
                                where = ((n * h + y) * w + xx) * c + k
                    pooled[n, i, j, k], idx[n, i, j, k] = best, where
    return pooled, idx


def np_unpool(values: np.ndarray, idx: np.ndarray, shape) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), values.dtype)
    flat[idx.reshape(-1)] = values.reshape(-1)
    return flat.reshape(shape)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 2), (1, 3, 3, 1), (2, 4, 6, 2), (1, 1, 9, 2)])
def test_pool_and_unpool_match_numpy_reference(shape):
    from segnet_cli.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    pooled, idx = MaxPoolingWithArgmax2D()(x)
    ref_p, ref_i = np_pool_argmax(x)
    np.testing.assert_array_equal(np.asarray(pooled), ref_p)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    assert np.asarray(idx).dtype == np.int64
    up = MaxUnpooling2D()([pooled, idx, x])
    assert tuple(up.shape) == shape  # exactly the pre-pool shape, odd sizes included
    np.testing.assert_array_equal(np.asarray(up), np_unpool(ref_p, ref_i, shape))


def test_unpool_gradient_flows_to_values_only():
    import tensorflow as tf

    from segnet_cli.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    x = tf.Variable(np.random.default_rng(1).standard_normal((1, 5, 5, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        p, i = MaxPoolingWithArgmax2D()(x)
        y = MaxUnpooling2D()([p * 2.0, i, x])
        loss = tf.reduce_sum(y)
    g = tape.gradient(loss, x).numpy()
    # Each pooled maximum gets gradient 2 (value * 2 put back), everything else 0.
    assert sorted(np.unique(g).tolist()) == [0.0, 2.0]
    assert int((g == 2.0).sum()) == 3 * 3 * 2


def test_layers_declare_no_xla_and_serialize():
    import keras

    from segnet_cli.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    pool = MaxPoolingWithArgmax2D(pool_size=2, name="p")
    assert pool.supports_jit is False and MaxUnpooling2D().supports_jit is False
    cfg = keras.saving.serialize_keras_object(pool)
    again = keras.saving.deserialize_keras_object(cfg)
    assert isinstance(again, MaxPoolingWithArgmax2D)
    assert again.pool_size == (2, 2) and again.strides == (2, 2) and again.padding == "same"


def test_large_batch_indices_exceed_float32_exactness():
    """Indices past 2**24 must stay exact (int64), or unpooling scatters to wrong places."""
    from segnet_cli.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    shape = (2, 64, 512, 300)  # 19.7M elements: indices beyond 2**24
    x = np.zeros(shape, np.float32)
    x[1, 63, 511, 299] = 5.0
    p, i = MaxPoolingWithArgmax2D()(x)
    assert int(np.asarray(i).max()) == int(np.prod(shape)) - 1
    up = np.asarray(MaxUnpooling2D()([p, i, x]))
    assert up[1, 63, 511, 299] == 5.0 and up.sum() == 5.0
