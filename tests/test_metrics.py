"""Metrics against confusion matrices and class weights computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segnet_cli.metrics import confusion, median_frequency_weights, scores

# Two rows of a 3-class image with void = 3 (one void pixel, top right).
TRUTH = np.array([[0, 0, 1, 3], [1, 1, 2, 2]])
PRED = np.array([[0, 1, 1, 2], [1, 0, 2, 0]])
# By hand, void dropped (7 pixels left):
#   true 0: predicted 0, 1        -> row [1, 1, 0]
#   true 1: predicted 1, 1, 0     -> row [1, 2, 0]
#   true 2: predicted 2, 0        -> row [1, 0, 1]
HAND_CM = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])


def test_confusion_drops_void_and_counts_true_by_predicted():
    cm = confusion(TRUTH, PRED, 3, void=3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, HAND_CM)
    # A void *inside* the class range is dropped by value: here the four pixels of truth 1.
    cm_in = confusion(np.where(TRUTH == 3, 1, TRUTH), PRED, 3, void=1)
    np.testing.assert_array_equal(cm_in, [[1, 1, 0], [0, 0, 0], [1, 0, 1]])


def test_scores_match_hand_computation():
    s = scores(HAND_CM)
    # G = (1 + 2 + 1) / 7.
    assert s.global_accuracy == pytest.approx(4 / 7)
    # Recall per class: 1/2, 2/3, 1/2; C is their mean.
    assert s.per_class_accuracy == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert s.class_accuracy == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    # Column sums (predicted) 3, 3, 1; IoU = TP / (row + col - TP).
    assert s.per_class_iou == pytest.approx([1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)])
    assert s.mean_iou == pytest.approx((1 / 4 + 1 / 2 + 1 / 2) / 3)
    # fwIoU weights each IoU by the class's share of truth: 2/7, 3/7, 2/7.
    assert s.fw_iou == pytest.approx(2 / 7 * 1 / 4 + 3 / 7 * 1 / 2 + 2 / 7 * 1 / 2)
    assert s.pixels == 7


def test_dataset_level_matrix_is_not_a_mean_of_images():
    # Image A: 1 pixel, right. Image B: 3 pixels, all wrong. Per-image mean accuracy would be
    # 0.5; the paper's dataset-level G is 1/4.
    a = confusion(np.array([0]), np.array([0]), 2)
    b = confusion(np.array([1, 1, 1]), np.array([0, 0, 0]), 2)
    assert scores(a + b).global_accuracy == pytest.approx(1 / 4)


def test_class_absent_from_truth_and_prediction_is_nan_and_left_out():
    cm = np.zeros((4, 4), np.int64)
    cm[:3, :3] = HAND_CM
    s = scores(cm)
    assert math.isnan(s.per_class_iou[3]) and math.isnan(s.per_class_accuracy[3])
    # The means are those of the 3-class matrix: class 3 changes nothing.
    ref = scores(HAND_CM)
    assert s.mean_iou == pytest.approx(ref.mean_iou)
    assert s.class_accuracy == pytest.approx(ref.class_accuracy)
    assert s.fw_iou == pytest.approx(ref.fw_iou)
    d = s.as_dict(["a", "b", "c", "d"])
    assert d["per_class"][3] == {"class": "d", "iou": None, "accuracy": None}
    json.dumps(d, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_class_predicted_but_absent_from_truth_counts_zero_iou():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 predicted once, never true
    s = scores(confusion(truth, pred, 3))
    # Class 2: TP 0, FP 1 -> IoU 0, and it counts in mIoU; no recall (no true pixels).
    assert s.per_class_iou[2] == 0.0
    assert math.isnan(s.per_class_accuracy[2])
    # Class 0: TP 1, FN 1 -> IoU 1/2, recall 1/2. Class 1: perfect.
    assert s.mean_iou == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s.class_accuracy == pytest.approx((1 / 2 + 1) / 2)
    assert s.global_accuracy == pytest.approx(3 / 4)


def test_void_class_inside_the_matrix_is_ignored_but_its_predictions_are_errors():
    # 3 outputs where index 2 is void: truth void pixels are dropped; a class-0 pixel
    # predicted as void is still an error of class 0.
    cm = confusion(np.array([0, 0, 1, 2]), np.array([0, 2, 1, 0]), 3, void=2)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    s = scores(cm, ignore=2)
    assert math.isnan(s.per_class_iou[2]) and math.isnan(s.per_class_accuracy[2])
    assert s.per_class_iou[:2] == pytest.approx([1 / 2, 1.0])
    assert s.mean_iou == pytest.approx(3 / 4)
    assert s.global_accuracy == pytest.approx(2 / 3)


def test_empty_matrix_gives_undefined_figures_not_errors():
    s = scores(np.zeros((3, 3), np.int64))
    assert all(math.isnan(v) for v in (s.global_accuracy, s.class_accuracy, s.mean_iou, s.fw_iou))
    d = s.as_dict()
    assert d["mean_iou"] is None and d["global_accuracy"] is None


def test_confusion_rejects_mismatched_or_impossible_predictions():
    with pytest.raises(ValueError, match="pixels"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion(np.zeros(4), np.array([0, 1, 2, 3]), 3)
    # Truth outside the classes (and not void) is dropped, not counted.
    assert confusion(np.array([0, 7]), np.array([0, 0]), 3).sum() == 1


def test_median_frequency_weights_by_hand():
    # Image A: 3 px of class 0, 1 px of class 1. Image B: 2 px of 0, 2 px of 2.
    # Image C: 4 px of class 1. Class 3 never appears.
    pixels = np.array([5, 5, 2, 0])
    # Pixels of the images where each class appears: 0 in A+B, 1 in A+C, 2 in B.
    image_pixels = np.array([8, 8, 4, 0])
    # freq = 5/8, 5/8, 2/4; median 5/8 -> weights 1, 1, 1.25; unseen class -> 0.
    np.testing.assert_allclose(
        median_frequency_weights(pixels, image_pixels), [1.0, 1.0, 1.25, 0.0]
    )
    # power tempers: w ** 0.5; power 0 gives 1 to every seen class.
    np.testing.assert_allclose(
        median_frequency_weights(pixels, image_pixels, power=0.5), [1.0, 1.0, 1.25**0.5, 0.0]
    )
    np.testing.assert_allclose(
        median_frequency_weights(pixels, image_pixels, power=0.0), [1.0, 1.0, 1.0, 0.0]
    )


def test_median_frequency_weights_even_count_uses_middle_mean():
    # freq = 0.1, 0.2, 0.4, 0.8 -> median (0.2 + 0.4) / 2 = 0.3.
    w = median_frequency_weights(np.array([1, 2, 4, 8]), np.array([10, 10, 10, 10]))
    np.testing.assert_allclose(w, [3.0, 1.5, 0.75, 0.375])
    assert median_frequency_weights(np.zeros(3), np.zeros(3)).tolist() == [0, 0, 0]
