"""Pooling-with-argmax and unpooling against a NumPy reference, odd sizes, save/load.

Every check runs both ways the layers can be traced: compiled with XLA (the default) and
plain TensorFlow (what ``Segmenter`` runs for a tile shape's first batch).
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(params=[True, False], ids=["xla", "plain"])
def compiled(request):
    from segnet_cli.model.layers import compiled_windows

    with compiled_windows(request.param):
        yield request.param


def np_pool_argmax(x: np.ndarray, k: int = 2, same: bool = True):
    """Reference kxk/k max pooling; ``where`` is the row-major position in the window.

    Scans each window in row-major order and keeps a value only if strictly greater, so
    ties go to the first maximum.
    """
    b, h, w, c = x.shape
    ph, pw = (-(-h // k), -(-w // k)) if same else (h // k, w // k)
    pooled = np.zeros((b, ph, pw, c), x.dtype)
    where = np.zeros((b, ph, pw, c), np.uint8)
    for n in range(b):
        for i in range(ph):
            for j in range(pw):
                for ch in range(c):
                    best, at = -np.inf, -1
                    for y in range(k * i, min(k * i + k, h)):
                        for xx in range(k * j, min(k * j + k, w)):
                            if x[n, y, xx, ch] > best:
                                best, at = x[n, y, xx, ch], (y - k * i) * k + (xx - k * j)
                    pooled[n, i, j, ch], where[n, i, j, ch] = best, at
    return pooled, where


def np_unpool(values: np.ndarray, where: np.ndarray, shape, k: int = 2) -> np.ndarray:
    out = np.zeros(shape, values.dtype)
    b, ph, pw, c = values.shape
    for n, i, j, ch in np.ndindex(b, ph, pw, c):
        y, xx = k * i + where[n, i, j, ch] // k, k * j + where[n, i, j, ch] % k
        out[n, y, xx, ch] = values[n, i, j, ch]
    return out


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 2), (1, 3, 3, 1), (2, 4, 6, 2), (1, 1, 9, 2)])
def test_pool_and_unpool_match_numpy_reference(shape, compiled):
    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    pooled, where = MaxPoolingWithArgmax2D()(x)
    ref_p, ref_w = np_pool_argmax(x)
    np.testing.assert_array_equal(np.asarray(pooled), ref_p)
    np.testing.assert_array_equal(np.asarray(where), ref_w)
    assert np.asarray(where).dtype == np.uint8
    up = MaxUnpooling2D()([pooled * 3, where, x])
    assert tuple(up.shape) == shape  # exactly the pre-pool shape, odd sizes included
    np.testing.assert_array_equal(np.asarray(up), np_unpool(ref_p * 3, ref_w, shape))


def test_matches_tensorflow_argmax_pooling_and_scatter(compiled):
    """Same result as the textbook ``max_pool_with_argmax`` + ``scatter_nd`` pair, ties too."""
    import tensorflow as tf

    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    rng = np.random.default_rng(3)
    # ReLU-like input: many all-zero windows, where the tie rule decides the position.
    x = np.maximum(rng.standard_normal((2, 37, 53, 4)), 0).astype(np.float32)
    p, idx = tf.nn.max_pool_with_argmax(
        x, 2, 2, "SAME", output_dtype=tf.int64, include_batch_in_index=True
    )
    flat = np.zeros(x.size, np.float32)
    flat[idx.numpy().reshape(-1)] = p.numpy().reshape(-1) + 1.0
    pooled, where = MaxPoolingWithArgmax2D()(x)
    np.testing.assert_array_equal(np.asarray(pooled), p.numpy())
    up = MaxUnpooling2D()([pooled + 1.0, where, x])
    np.testing.assert_array_equal(np.asarray(up), flat.reshape(x.shape))


def test_ties_go_to_the_first_position_in_the_window(compiled):
    from segnet_cli.model.layers import MaxPoolingWithArgmax2D

    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 2, 3, 0] = x[0, 3, 2, 0] = 1.0  # a tie at positions 1 and 2 of window (1, 1)
    _, where = MaxPoolingWithArgmax2D()(x)
    assert np.asarray(where)[0, :, :, 0].tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize("k,padding,shape", [(3, "same", (1, 7, 8, 2)), (2, "valid", (2, 5, 7, 3))])
def test_other_window_sizes_and_valid_padding(k, padding, shape, compiled):
    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    pooled, where = MaxPoolingWithArgmax2D(k, padding=padding)(x)
    ref_p, ref_w = np_pool_argmax(x, k, same=padding == "same")
    np.testing.assert_array_equal(np.asarray(pooled), ref_p)
    np.testing.assert_array_equal(np.asarray(where), ref_w)
    up = MaxUnpooling2D(k)([pooled, where, x])
    np.testing.assert_array_equal(np.asarray(up), np_unpool(ref_p, ref_w, shape, k))


def test_overlapping_windows_are_refused():
    from segnet_cli.model.layers import MaxPoolingWithArgmax2D

    with pytest.raises(ValueError, match="strides equal to pool_size"):
        MaxPoolingWithArgmax2D(pool_size=3, strides=2)


def test_unpool_gradient_flows_to_values_only(compiled):
    import tensorflow as tf

    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    x = tf.Variable(np.random.default_rng(1).standard_normal((1, 5, 5, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        p, i = MaxPoolingWithArgmax2D()(x)
        y = MaxUnpooling2D()([p * 2.0, i, x])
        loss = tf.reduce_sum(y)
    g = tape.gradient(loss, x).numpy()
    # Each pooled maximum gets gradient 2 (value * 2 put back), everything else 0.
    assert sorted(np.unique(g).tolist()) == [0.0, 2.0]
    assert int((g == 2.0).sum()) == 3 * 3 * 2


def test_pool_gradient_goes_to_one_position_on_ties(compiled):
    """Like ``max_pool_with_argmax``: a tied window sends its gradient to the recorded position."""
    import tensorflow as tf

    from segnet_cli.model.layers import MaxPoolingWithArgmax2D

    x = tf.Variable(np.ones((1, 2, 2, 1), np.float32))
    with tf.GradientTape() as tape:
        p, _ = MaxPoolingWithArgmax2D()(x)
    g = tape.gradient(p, x).numpy()
    assert g[0, :, :, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_layers(dtype, compiled):
    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    x = np.random.default_rng(5).integers(-8, 8, (1, 5, 7, 3)).astype(np.float32)
    pooled, where = MaxPoolingWithArgmax2D(dtype=f"mixed_{dtype}")(x)
    assert pooled.dtype.name == dtype
    ref_p, ref_w = np_pool_argmax(x)  # small integers: exact in every float type
    np.testing.assert_array_equal(np.asarray(pooled, np.float32), ref_p)
    np.testing.assert_array_equal(np.asarray(where), ref_w)
    up = MaxUnpooling2D(dtype=f"mixed_{dtype}")([pooled, where, x])
    assert up.dtype.name == dtype
    np.testing.assert_array_equal(np.asarray(up, np.float32), np_unpool(ref_p, ref_w, x.shape))


def test_layers_declare_no_whole_model_xla_and_serialize():
    import keras

    from segnet_cli.model.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

    pool = MaxPoolingWithArgmax2D(pool_size=2, name="p")
    assert pool.supports_jit is False and MaxUnpooling2D().supports_jit is False
    cfg = keras.saving.serialize_keras_object(pool)
    again = keras.saving.deserialize_keras_object(cfg)
    assert isinstance(again, MaxPoolingWithArgmax2D)
    assert again.pool_size == (2, 2) and again.strides == (2, 2) and again.padding == "same"
    unpool = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(MaxUnpooling2D(pool_size=3))
    )
    assert unpool.pool_size == (3, 3)


@pytest.mark.parametrize(
    "k,padding,shape",
    [(2, "same", (2, 37, 53, 3)), (2, "same", (1, 1, 1, 2)), (2, "same", (1, 1, 101, 2)),
     (3, "same", (1, 7, 8, 2)), (2, "valid", (2, 5, 7, 3))],
)
def test_export_form_equals_the_other_forms(k, padding, shape):
    """The export form (``export_windows``) computes exactly what Keras runs, ties included."""
    import tensorflow as tf

    from segnet_cli.model.layers import (
        MaxPoolingWithArgmax2D,
        MaxUnpooling2D,
        compiled_windows,
        export_windows,
    )

    rng = np.random.default_rng(6)
    # ReLU-like: many all-zero windows, where the tie rule decides the position.
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    pool, unpool = MaxPoolingWithArgmax2D(k, padding=padding), MaxUnpooling2D(k)
    results = []
    for form in ("xla", "plain", "export"):
        ctx = export_windows() if form == "export" else compiled_windows(form == "xla")
        with ctx:
            # Traced once with unknown height and width, as an exported graph is.
            fn = tf.function(
                lambda t: (lambda p, w: (p, tf.cast(w, tf.int32), unpool([p * 3, w, t])))(*pool(t)),
                input_signature=[tf.TensorSpec((None, None, None, shape[-1]), tf.float32)],
            )
            results.append([np.asarray(r) for r in fn(x)])
    ref_p, ref_w = np_pool_argmax(x, k, same=padding == "same")
    for pooled, where, up in results:
        np.testing.assert_array_equal(pooled, ref_p)
        np.testing.assert_array_equal(where, ref_w)
        np.testing.assert_array_equal(up, np_unpool(ref_p * 3, ref_w, shape, k))
