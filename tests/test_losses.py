"""The Lovász-softmax loss against a direct NumPy transcription of the paper's algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from segnet_cli.config import Loss


def lovasz_reference(probs: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Berman et al. 2018, Algorithm 1, one image and one present class at a time (float64)."""
    out = []
    for p, y, v in zip(probs.astype(np.float64), labels, valid):
        p, y = p[v], y[v]  # the valid pixels only
        per_class = []
        for c in range(p.shape[-1]):
            fg = (y == c).astype(np.float64)
            if not fg.any():
                continue  # classes='present'
            errors = np.abs(fg - p[:, c])
            order = np.argsort(-errors, kind="stable")
            e, g = errors[order], fg[order]
            intersection = g.sum() - np.cumsum(g)
            union = g.sum() + np.cumsum(1 - g)
            jaccard = 1 - intersection / union
            grad = np.concatenate([jaccard[:1], np.diff(jaccard)])
            per_class.append(e @ grad)
        out.append(np.mean(per_class) if per_class else 0.0)
    return np.array(out)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def random_batch(seed: int, b: int = 4, h: int = 6, w: int = 9, k: int = 4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (b, h, w, k)).astype(np.float32)
    labels = rng.integers(0, k, (b, h, w)).astype(np.int32)
    labels[1] = np.minimum(labels[1], 1)  # an image where classes 2 and 3 are absent
    valid = rng.random((b, h, w)) < 0.8
    valid[2] = False  # an image without any valid pixel
    return logits, labels, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_softmax_equals_the_reference(seed):
    from segnet_cli.losses import lovasz_softmax

    logits, labels, valid = random_batch(seed)
    probs = softmax(logits)
    got = lovasz_softmax(probs, labels, valid).numpy()
    want = lovasz_reference(probs, labels, valid)
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[2] == 0.0 and (got[[0, 1, 3]] > 0).all()


def test_lovasz_softmax_is_zero_for_a_perfect_prediction():
    from segnet_cli.losses import lovasz_softmax

    _, labels, valid = random_batch(3)
    perfect = np.eye(4, dtype=np.float32)[labels]
    assert lovasz_softmax(perfect, labels, valid).numpy().tolist() == [0.0] * 4
    # Wrong everywhere a pixel is ignored: still perfect.
    wrong = np.where(valid[..., None], perfect, np.roll(perfect, 1, axis=-1))
    assert lovasz_softmax(wrong, labels, valid).numpy().tolist() == [0.0] * 4


def test_lovasz_softmax_ignores_masked_pixels_value_and_gradient():
    import tensorflow as tf

    from segnet_cli.losses import lovasz_softmax

    logits, labels, valid = random_batch(4)
    rng = np.random.default_rng(5)
    other_logits = np.where(valid[..., None], logits, rng.normal(0, 5, logits.shape))
    other_labels = np.where(valid, labels, rng.integers(0, 4, labels.shape)).astype(np.int32)
    a = lovasz_softmax(softmax(logits), labels, valid).numpy()
    b = lovasz_softmax(softmax(other_logits.astype(np.float32)), other_labels, valid).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)
    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(lovasz_softmax(tf.nn.softmax(x), labels, valid))
    grad = tape.gradient(loss, x).numpy()
    assert np.isfinite(grad).all()
    assert (grad[~valid] == 0).all() and np.abs(grad[valid]).sum() > 0


def test_segmentation_loss_is_weighted_ce_plus_unweighted_lovasz_in_float32():
    import keras

    from segnet_cli.losses import SegmentationLoss, make_loss

    logits, labels, valid = random_batch(6)
    class_weights = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    pixel_w = np.where(valid, class_weights[labels], 0.0).astype(np.float32)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    want_ce = float(ce(labels, logits, sample_weight=pixel_w))
    want_lovasz = float(lovasz_reference(softmax(logits), labels, valid).mean())
    both = make_loss(Loss.CE_LOVASZ)
    assert float(both(labels, logits, sample_weight=pixel_w)) == pytest.approx(
        want_ce + want_lovasz, rel=1e-5
    )
    alone = make_loss(Loss.LOVASZ)
    value = float(alone(labels, logits, sample_weight=pixel_w))
    assert value == pytest.approx(want_lovasz, rel=1e-5)
    # Class weights scale the cross-entropy, never the Lovász term: only weight 0 counts.
    assert float(alone(labels, logits, sample_weight=pixel_w * 10)) == pytest.approx(
        want_lovasz, rel=1e-5
    )
    # bfloat16 logits (a mixed-precision model's) give a float32 loss close to float32's.
    value = both(labels, keras.ops.cast(logits, "bfloat16"), sample_weight=pixel_w)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert float(value) == pytest.approx(want_ce + want_lovasz, rel=2e-2)
    # ``ce`` is Keras's own loss; the others survive a save and a load (checkpoints).
    assert isinstance(make_loss(Loss.CE), keras.losses.SparseCategoricalCrossentropy)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(alone))
    assert isinstance(restored, SegmentationLoss)
    assert (restored.cross_entropy, restored.lovasz) == (False, True)


def test_distillation_loss_equals_the_numpy_reference_and_is_ce_at_alpha_0():
    import keras

    from segnet_cli.losses import DistillationLoss, make_loss

    logits, labels, valid = random_batch(7)
    rng = np.random.default_rng(7)
    targets = rng.dirichlet(np.ones(4), size=labels.shape).astype(np.float32)
    targets[0, 0, 0] = [0, 1, 0, 0]  # a certain target: 0 log 0 counts 0
    weights = np.where(valid, rng.uniform(0.5, 2.0, labels.shape), 0.0).astype(np.float32)
    # Quantised targets need not sum to 1: the loss renormalises them.
    y_true = np.concatenate([labels[..., None].astype(np.float32), targets * 1.02], axis=-1)
    log_p = np.log(softmax(logits.astype(np.float64)))
    ce = -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    t = targets.astype(np.float64)
    kl = np.sum(np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - log_p), 0.0), axis=-1)
    for alpha in (0.0, 0.3, 1.0):
        want = np.sum(weights * ((1 - alpha) * ce + alpha * kl)) / weights.size
        got = float(DistillationLoss(alpha)(y_true, logits, sample_weight=weights))
        assert got == pytest.approx(want, rel=1e-5)
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert float(DistillationLoss(0.0)(y_true, logits, sample_weight=weights)) == pytest.approx(
        float(sce(labels, logits, sample_weight=weights)), rel=1e-5
    )
    # A student that already gives the targets owes the distillation term nothing.
    perfect = np.log(targets + 1e-12)
    assert float(DistillationLoss(1.0)(y_true, perfect)) == pytest.approx(0.0, abs=1e-5)
    # It survives a save and a load (checkpoints), and refuses a share outside [0, 1].
    loss = make_loss(Loss.CE, distill=0.3)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, DistillationLoss) and restored.alpha == 0.3
    with pytest.raises(ValueError):
        DistillationLoss(1.5)
    with pytest.raises(ValueError):
        make_loss(Loss.CE_LOVASZ, distill=0.5)
