"""Training losses: class-weighted cross-entropy, the Lovász-softmax loss, or their sum; and
cross-entropy blended with distillation from teachers' soft targets.

The Lovász-softmax loss (Berman, Triki & Blaschko, "The Lovász-Softmax loss: a tractable
surrogate for the optimization of the intersection-over-union measure in neural networks",
CVPR 2018) optimises what segmentation is scored on: the Jaccard index (IoU) of each class.
For one image and one class ``c`` with pixel errors ``e_i = |[y_i = c] - p_i(c)|``, it is the
Lovász extension of the Jaccard loss evaluated at ``e``: sort the errors in decreasing order,
and weight each by how much the Jaccard loss grows when its pixel joins the misclassified
set,

    loss_c = sum_i e_(i) * (J(i) - J(i - 1)),   J(i) = 1 - |G - M_i| / |G + M_i|,

where ``G`` is the class's pixels and ``M_i`` the ``i`` pixels of largest error (the paper's
Algorithm 1: intersections and unions as cumulative sums). The loss of an image is the mean
over the classes present in its ground truth, and the loss of a batch the mean over its
images, as the paper's ``per_image=True, classes='present'``. The sort and the cumulative
sums run in NumPy inside the graph (``tf.numpy_function``), on the host also when training
on a GPU: see ``lovasz_softmax`` for the measurement behind that.

``segnet train`` feeds ``model.fit`` with ``(image, label, pixel_weight)``: the weight is the
class weight of the pixel's class, 0 for void and crop padding. Cross-entropy is weighted by
it; the Lovász term only uses it to ignore the pixels whose weight is 0 (the Jaccard index
has its own balance between classes: every present class counts equally).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from segnet_cli.config import Loss


def lovasz_pixel_weights(errors: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Each pixel's weight in the Lovász extension of the Jaccard loss at ``errors``.

    Sorts the errors in decreasing order and takes ``J(i) - J(i - 1)`` at each rank from
    cumulative sums (the paper's ``lovasz_grad``), then puts the values back in pixel order.
    The loss is then ``sum(errors * weights)`` over the valid pixels, and its gradient with
    respect to the errors is the weights themselves.

    Args:
        errors: ``(..., N)`` float32 errors in [0, 1]; -1 marks an ignored pixel (it sorts
            after every valid one and gets weight 0).
        fg: ``(..., N)`` float32, 1 where the pixel belongs to the class (0 if ignored).

    Returns:
        ``(..., N)`` float32 weights, 0 for ignored pixels.
    """
    order = np.argsort(-errors, axis=-1)
    fg_sorted = np.take_along_axis(fg, order, axis=-1)
    rank = np.arange(1, errors.shape[-1] + 1, dtype=np.float32)  # i
    hits = np.cumsum(fg_sorted, axis=-1)  # class pixels among the i largest errors
    gts = hits[..., -1:]  # |G|
    # |G - M_i| = |G| - hits and |G + M_i| = |G| + (i - hits), which is at least 1.
    jaccard = 1 - (gts - hits) / (gts + rank - hits)
    grad = np.diff(jaccard, axis=-1, prepend=np.zeros_like(jaccard[..., :1]))
    # Ignored pixels sort last: the valid ones are the first ``valid`` ranks of each row.
    valid = np.count_nonzero(errors >= 0, axis=-1, keepdims=True)
    grad *= rank <= valid
    weights = np.empty_like(grad)
    np.put_along_axis(weights, order, grad, axis=-1)
    return weights


def lovasz_softmax(probs: tf.Tensor, labels: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """The Lovász-softmax loss of each image of a batch.

    Args:
        probs: ``(B, H, W, K)`` class probabilities (a softmax), any float dtype.
        labels: ``(B, H, W)`` class indices; ignored pixels may hold any index in range.
        valid: ``(B, H, W)`` bool, False for the pixels to ignore.

    Returns:
        ``(B,)`` float32: per image, the mean over the classes present among its valid
        pixels of the Lovász extension of the Jaccard loss; 0 for an image without valid
        pixels.
    """
    probs = tf.cast(probs, tf.float32)
    batch, k = tf.shape(probs)[0], tf.shape(probs)[-1]
    p = tf.transpose(tf.reshape(probs, [batch, -1, k]), [0, 2, 1])  # (B, K, N)
    v = tf.cast(tf.reshape(valid, [batch, 1, -1]), tf.float32)  # (B, 1, N)
    fg = tf.one_hot(tf.reshape(labels, [batch, -1]), k, axis=1, dtype=tf.float32) * v
    errors = tf.abs(fg - p) * v - (1.0 - v)  # ignored pixels: -1
    # The sort runs in NumPy: its SIMD argsort is several times faster on a CPU than
    # TensorFlow's (a top_k of every element): measured for a 224x288 batch of 8 with 11
    # classes, forward and backward took 0.55-0.64 s this way and 1.4-1.6 s with tf.math.top_k.
    # Only the permutation-dependent weights come from there; the gradient flows through
    # ``errors`` in TensorFlow.
    weights = tf.numpy_function(
        lovasz_pixel_weights, [tf.stop_gradient(errors), fg], tf.float32, stateful=False
    )
    weights = tf.stop_gradient(tf.ensure_shape(weights, errors.shape))
    per_class = tf.reduce_sum(errors * weights, axis=-1)  # (B, K); weights are 0 if ignored
    present = tf.cast(tf.reduce_any(fg > 0, axis=-1), tf.float32)
    return tf.reduce_sum(per_class * present, axis=-1) / tf.maximum(
        tf.reduce_sum(present, axis=-1), 1.0
    )


@keras.saving.register_keras_serializable(package="segnet")
class SegmentationLoss(keras.losses.Loss):
    """Pixel-weighted cross-entropy, the Lovász-softmax loss, or their sum, for ``model.fit``.

    Takes logits and integer labels; ``sample_weight`` is the per-pixel weight. The
    cross-entropy term equals ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``
    with the same weights (sum of weighted pixel losses over all pixels of the batch); the
    Lovász term is the mean over the images of ``lovasz_softmax``, ignoring pixels of weight
    0 and otherwise unweighted. Computed in float32 whatever the model's precision.

    Args:
        cross_entropy: include the weighted cross-entropy.
        lovasz: include the Lovász-softmax loss.
    """

    def __init__(
        self,
        cross_entropy: bool = True,
        lovasz: bool = True,
        name: str = "segmentation_loss",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ) -> None:
        if not (cross_entropy or lovasz):
            raise ValueError("a loss needs at least one of its terms")
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        self.cross_entropy = cross_entropy
        self.lovasz = lovasz

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras multiplies per-sample losses by ``sample_weight`` after ``call``; the Lovász
        # term needs the weights inside (to leave ignored pixels out of its sorting), so they
        # travel with the labels and ``call`` returns one loss per image, already weighted.
        labels = tf.cast(y_true, tf.float32)
        weights = tf.ones_like(labels) if sample_weight is None else sample_weight
        packed = tf.stack([labels, tf.cast(weights, tf.float32)], axis=-1)
        return super().__call__(packed, y_pred)

    def call(self, y_true, y_pred):
        """Per-image losses from ``y_true = stack([labels, pixel_weights], -1)``.

        Returns:
            ``(B,)``; Keras's mean over the batch then gives the loss.
        """
        labels = tf.cast(y_true[..., 0], tf.int32)
        weights = y_true[..., 1]
        logits = tf.cast(y_pred, tf.float32)
        loss = tf.zeros(tf.shape(logits)[:1], tf.float32)
        if self.cross_entropy:
            ce = keras.ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss += tf.reduce_mean(ce * weights, axis=[1, 2])
        if self.lovasz:
            loss += lovasz_softmax(tf.nn.softmax(logits, axis=-1), labels, weights > 0)
        return loss

    def get_config(self) -> dict:
        return {**super().get_config(), "cross_entropy": self.cross_entropy, "lovasz": self.lovasz}


@keras.saving.register_keras_serializable(package="segnet")
class DistillationLoss(keras.losses.Loss):
    """Cross-entropy against the masks blended with the KL divergence from soft targets.

    Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015), per pixel as in pixel-wise distillation for segmentation: the student's
    softmax is pulled both to the mask's class and to the teachers' class probabilities,

        loss = (1 - alpha) * CE(label, logits) + alpha * KL(targets || softmax(logits)),

    at temperature 1 (the targets are precomputed probabilities). The targets carry what a
    mask cannot: which wrong classes are plausible (a pole's pixels that could be a sign),
    and an averaged ensemble of teachers generalises better than each of its members.

    ``y_true`` is ``concat([labels, targets], -1)``, ``(B, H, W, 1 + K)`` floats: the class
    index, then K target probabilities (renormalised here: quantised targets need not sum
    to exactly 1). ``sample_weight`` is the per-pixel weight, applied to both terms as
    ``SparseCategoricalCrossentropy`` applies it, so ``alpha=0`` is that loss exactly.

    Args:
        alpha: the distillation term's share, from 0 to 1.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        name: str = "distillation_loss",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be from 0 to 1, not {alpha}")
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        self.alpha = float(alpha)

    def call(self, y_true, y_pred):
        """Per-pixel losses ``(B, H, W)``; Keras weights and averages them."""
        labels = tf.cast(y_true[..., 0], tf.int32)
        targets = tf.cast(y_true[..., 1:], tf.float32)
        targets = targets / tf.maximum(tf.reduce_sum(targets, axis=-1, keepdims=True), 1e-6)
        logits = tf.cast(y_pred, tf.float32)
        log_p = tf.nn.log_softmax(logits, axis=-1)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        # xlogy: a target of 0 contributes 0, not 0 * log 0.
        kl = tf.reduce_sum(tf.math.xlogy(targets, targets) - targets * log_p, axis=-1)
        return (1.0 - self.alpha) * ce + self.alpha * kl

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha}


def make_loss(kind: Loss, distill: float | None = None) -> keras.losses.Loss:
    """The Keras loss of a ``--loss`` choice, or the distillation loss with ``--teacher``.

    ``ce`` is Keras's own sparse cross-entropy, as every run before ``--loss`` existed used:
    its checkpoints load without this module.

    Args:
        kind: the ``--loss`` choice.
        distill: with teachers, the distillation term's share (``--distill``); ``kind`` must
            then be ``ce``.
    """
    kind = Loss(kind)
    if distill is not None:
        if kind is not Loss.CE:
            raise ValueError("distillation blends with the cross-entropy loss only")
        return DistillationLoss(distill)
    if kind is Loss.CE:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return SegmentationLoss(cross_entropy=kind is Loss.CE_LOVASZ, lovasz=True)
