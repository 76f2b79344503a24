"""Segmentation metrics from one dataset-level confusion matrix, as the SegNet paper reports.

All figures come from a single confusion matrix accumulated over every pixel of every image
(not averaged per image), with void pixels dropped before counting:

* G (global accuracy) = correct pixels / labelled pixels.
* C (class-average accuracy) = mean over classes of recall TP / (TP + FN).
* IoU per class = TP / (TP + FP + FN); mIoU is their mean.
* Frequency-weighted IoU weights each class's IoU by its share of labelled pixels.

A class with no ground-truth pixels has no recall and is left out of C; its IoU is left out
of mIoU unless it was predicted (then its IoU is 0 and counts), matching the common
practice of ignoring classes absent from both truth and prediction. This is what the SegNet
and FCN scoring scripts do (``nanmean`` over ``diag / (rows + cols - diag)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def confusion(
    truth: np.ndarray, pred: np.ndarray, num_classes: int, void: int | None = None
) -> np.ndarray:
    """Confusion matrix ``cm[true, predicted]`` (int64) of one image, void pixels dropped.

    Truth values outside ``[0, num_classes)`` (other than void) are dropped too; predictions
    outside the range raise, since a model cannot produce them.
    """
    t = np.asarray(truth).reshape(-1).astype(np.int64)
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"truth has {t.size} pixels, prediction {p.size}")
    keep = (t >= 0) & (t < num_classes)
    if void is not None:
        keep &= t != void
    t, p = t[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError("prediction holds a class index outside the model's classes")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


@dataclass(frozen=True)
class Scores:
    """The figures of one confusion matrix; per-class lists hold NaN where undefined."""

    global_accuracy: float
    class_accuracy: float
    mean_iou: float
    fw_iou: float
    per_class_iou: list[float]
    per_class_accuracy: list[float]
    pixels: int

    def as_dict(self, names=None) -> dict:
        """A JSON-ready dict; undefined figures (NaN) become ``None``, since JSON has no NaN."""
        names = list(names) if names is not None else [str(i) for i in range(len(self.per_class_iou))]
        return {
            "global_accuracy": _none_if_nan(self.global_accuracy),
            "class_accuracy": _none_if_nan(self.class_accuracy),
            "mean_iou": _none_if_nan(self.mean_iou),
            "fw_iou": _none_if_nan(self.fw_iou),
            "pixels": self.pixels,
            "per_class": [
                {
                    "class": n,
                    "iou": None if np.isnan(i) else i,
                    "accuracy": None if np.isnan(a) else a,
                }
                for n, i, a in zip(names, self.per_class_iou, self.per_class_accuracy)
            ],
        }


def _none_if_nan(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def scores(cm: np.ndarray, ignore: int | None = None) -> Scores:
    """Compute G, C, per-class IoU, mIoU and fwIoU from a confusion matrix.

    Args:
        cm: ``cm[true, predicted]`` pixel counts, void already dropped.
        ignore: a class index inside the matrix that is void (a model whose outputs include
            the void class). Its row holds no pixels once void is dropped; pixels predicted
            as it are errors of their true class, but it gets no IoU or accuracy of its own
            and stays out of every mean.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pr = cm.sum(axis=0)
    total = cm.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(gt > 0, tp / gt, np.nan)
        union = gt + pr - tp
        iou = np.where(union > 0, tp / union, np.nan)
    if ignore is not None and 0 <= ignore < len(iou):
        recall[ignore] = iou[ignore] = np.nan
    g = float(tp.sum() / total) if total else float("nan")
    # Guard the means: nanmean of nothing but NaN warns and gives NaN anyway.
    c = float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else float("nan")
    miou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")
    fw = float(np.nansum(gt / total * np.nan_to_num(iou))) if total else float("nan")
    return Scores(g, c, miou, fw, iou.tolist(), recall.tolist(), int(total))


def median_frequency_weights(
    pixel_counts: np.ndarray, image_counts: np.ndarray, power: float = 1.0
) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus), as the SegNet paper trains with.

    ``freq[c]`` = pixels of class c / total pixels of the images where c is present;
    ``weight[c] = median(freq) / freq[c]``. ``power`` tempers the weights (``w ** power``):
    1 is the paper, 0 is no weighting. A class never seen gets weight 0 (nothing to learn).

    Args:
        pixel_counts: pixels of each class over the dataset.
        image_counts: total pixels of the images in which each class appears.
        power: exponent applied to the weights.
    """
    pixel_counts = np.asarray(pixel_counts, np.float64)
    image_counts = np.asarray(image_counts, np.float64)
    present = (pixel_counts > 0) & (image_counts > 0)
    freq = np.zeros_like(pixel_counts)
    freq[present] = pixel_counts[present] / image_counts[present]
    if not present.any():
        return np.zeros_like(pixel_counts)
    med = np.median(freq[present])
    w = np.zeros_like(freq)
    w[present] = (med / freq[present]) ** power
    return w
