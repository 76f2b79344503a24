"""Mixing two training crops into one (``segnet train --mix``): CutMix and ClassMix.

Why: a model trained on a few drives learns their streets as wholes, and the cross-drive
study found its errors on an unseen drive to be content (a car park, a petrol station), not
colour. Pasting part of one crop into another shows each object in scenes it was not taken
in. ClassMix pastes whole classes of the other crop (each object keeps its outline: a pole
stays a pole, now in front of another building); CutMix pastes a rectangle.

Works on a batch from the training pipeline: each crop is mixed with the *next* crop of its
batch (the last with the first), so no extra image is read. The pasted pixels bring their
labels and pixel weights, so the loss of a mixed crop is exactly that of its pixels; void
and padding pixels of the other crop (weight 0) are never pasted by ClassMix, and stay
ignored where CutMix pastes them. All randomness is stateless and drawn from one seed per
batch, so a resumed run mixes exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from segnet_cli.config import Mix


def mix_masks(labels, weights, seed, mode: Mix, prob: float, num_classes: int):
    """Where each crop of a batch takes the next crop's pixels.

    Args:
        labels: ``(B, H, W)`` int32 class indices of the batch.
        weights: ``(B, H, W)`` float pixel weights (0: ignored pixel).
        seed: ``(2,)`` int stateless-RNG seed of the batch.
        mode: ``Mix.CUTMIX`` or ``Mix.CLASSMIX`` (``Mix.NONE``: nothing is pasted).
        prob: chance that a crop is mixed at all.
        num_classes: K, the number of classes (``labels`` are below it).

    Returns:
        ``(B, H, W)`` bool: True where crop ``b`` takes the pixel of crop ``(b + 1) % B``.
    """
    import tensorflow as tf

    shape = tf.shape(labels)
    b, h, w = shape[0], shape[1], shape[2]
    if mode is Mix.NONE or prob <= 0:
        return tf.zeros(shape, tf.bool)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
    mixed = tf.random.stateless_uniform([b], s[0]) < prob
    other_labels = tf.roll(labels, -1, axis=0)
    other_weights = tf.roll(weights, -1, axis=0)
    if mode is Mix.CLASSMIX:
        # Each class of the other crop is taken with probability 1/2: about half of the
        # classes it shows, as ClassMix picks them, and every pixel of a taken class.
        take = tf.random.stateless_uniform([b, num_classes], s[1]) < 0.5
        paste = tf.gather(take, other_labels, batch_dims=1) & (other_weights > 0)
    elif mode is Mix.CUTMIX:
        # A rectangle of a uniformly drawn share of the crop, its centre anywhere in it
        # (clipped at the borders, as CutMix draws it).
        area = tf.random.stateless_uniform([b], s[1])
        centre = tf.random.stateless_uniform([b, 2], s[2])
        hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
        half_h = hf * tf.sqrt(area) / 2
        half_w = wf * tf.sqrt(area) / 2
        rows = tf.range(h, dtype=tf.float32)[None, :] + 0.5
        cols = tf.range(w, dtype=tf.float32)[None, :] + 0.5
        in_rows = tf.abs(rows - (centre[:, :1] * hf)) < half_h[:, None]
        in_cols = tf.abs(cols - (centre[:, 1:] * wf)) < half_w[:, None]
        paste = in_rows[:, :, None] & in_cols[:, None, :]
    else:  # pragma: no cover - TrainConfig admits only Mix members
        raise ValueError(f"unknown mix {mode!r}")
    return paste & mixed[:, None, None]


def mix_batch(
    images, labels, weights, seed, mode: Mix, prob: float, num_classes: int, targets=None
):
    """One training batch with crops mixed as ``mix_masks`` decides.

    Args:
        images: ``(B, H, W, C)`` float crops.
        labels, weights, seed, mode, prob, num_classes: as for ``mix_masks``.
        targets: ``(B, H, W, K)`` soft targets of the crops (``segnet train --teacher``),
            pasted with their pixels; or None.

    Returns:
        ``(images, labels, weights)`` of the same shapes and dtypes, and ``targets`` after
        them when given.
    """
    import tensorflow as tf

    paste = mix_masks(labels, weights, seed, mode, prob, num_classes)
    images = tf.where(paste[..., None], tf.roll(images, -1, axis=0), images)
    labels = tf.where(paste, tf.roll(labels, -1, axis=0), labels)
    weights = tf.where(paste, tf.roll(weights, -1, axis=0), weights)
    if targets is None:
        return images, labels, weights
    targets = tf.where(paste[..., None], tf.roll(targets, -1, axis=0), targets)
    return images, labels, weights, targets
