"""The measures of `restage personalize evaluate` (ray_app/personal_eval.py) on hand-computed
cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_app.personal_eval import (
    Detection,
    accuracy,
    balanced_accuracy,
    best_mask_threshold,
    best_threshold,
    box_iou,
    detection_ap,
    largest_box,
    mask_box,
    mask_iou,
    otsu_threshold,
    roc_auc,
    similarity_map,
    upsample,
)


def test_roc_auc_counts_pairs_and_ties_half():
    labels = np.array([True, True, False, False, False])
    # positives 0.9 and 0.4; negatives 0.5, 0.3, 0.1: 0.9 beats 3, 0.4 beats 2 -> 5 / 6
    assert roc_auc(np.array([0.9, 0.4, 0.5, 0.3, 0.1]), labels) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts half: (3 + 1.5 + 1) / 6
    assert roc_auc(np.array([0.9, 0.5, 0.5, 0.3, 0.6]), labels) == pytest.approx(4.5 / 6)
    assert roc_auc(np.ones(5), labels) == pytest.approx(0.5)
    assert roc_auc(-np.array([0.9, 0.4, 0.5, 0.3, 0.1]), labels) == pytest.approx(1 / 6)
    assert math.isnan(roc_auc(np.ones(3), np.ones(3, bool)))
    with pytest.raises(ValueError, match="shape"):
        roc_auc(np.ones(3), np.ones(4, bool))


def test_threshold_chosen_for_balanced_accuracy_then_applied():
    scores = np.array([0.9, 0.7, 0.6, 0.2, 0.1, 0.05])
    labels = np.array([True, True, False, True, False, False])
    t = best_threshold(scores, labels)
    # >= 0.65 gets 2/3 positives and 3/3 negatives (0.833); >= 0.15 gets 3/3 and 2/3 (0.833):
    # the lowest of the best wins
    assert t == pytest.approx(0.15)
    assert balanced_accuracy(scores, labels, t) == pytest.approx((1 + 2 / 3) / 2)
    assert accuracy(scores, labels, t) == pytest.approx(5 / 6)
    assert accuracy(scores, labels, 0.65) == pytest.approx(5 / 6)
    assert balanced_accuracy(scores, labels, 0.95) == pytest.approx(0.5)
    assert math.isnan(best_threshold(scores, np.zeros(6, bool)))


def test_similarity_map_is_the_cosine_of_each_patch_to_the_prototype():
    tokens = np.zeros((2, 2, 2))
    tokens[0, 0] = [1, 0]
    tokens[0, 1] = [0, 3]
    tokens[1, 0] = [-2, 0]
    tokens[1, 1] = [1, 1]
    got = similarity_map(tokens, np.array([2.0, 0.0]))
    assert got == pytest.approx(np.array([[1, 0], [-1, 1 / math.sqrt(2)]]))


def test_upsample_keeps_a_constant_map_and_its_size():
    up = upsample(np.full((4, 4), 0.25), 16)
    assert up.shape == (16, 16)
    assert up == pytest.approx(np.full((16, 16), 0.25))
    step = upsample(np.array([[0.0, 1.0], [0.0, 1.0]]), 8)
    assert step[:, 0] == pytest.approx(0.0) and step[:, -1] == pytest.approx(1.0)


def test_otsu_splits_two_clusters_between_them():
    values = np.concatenate([np.full(50, 0.1), np.full(30, 0.8)])
    t = otsu_threshold(values)
    assert 0.1 < t <= 0.8
    assert ((values >= t) == (values == 0.8)).all()
    assert otsu_threshold(np.full(5, 0.3)) == 0.3


def test_mask_iou_and_the_best_mask_threshold():
    truth = np.zeros((4, 4), bool)
    truth[:2, :2] = True
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True
    assert mask_iou(pred, truth) == pytest.approx(4 / 6)
    assert math.isnan(mask_iou(np.zeros((2, 2)), np.zeros((2, 2))))
    # a map high exactly on the mask: the chosen threshold reproduces it
    values = np.where(truth, 0.9, 0.1) + np.linspace(0, 0.01, 16).reshape(4, 4)
    t = best_mask_threshold([values], [truth])
    assert mask_iou(values >= t, truth) == 1.0
    assert math.isnan(best_mask_threshold([], []))


def test_boxes_of_masks_and_of_the_largest_component():
    binary = np.zeros((6, 8), bool)
    binary[0, 0] = True  # a single pixel
    binary[2:5, 3:7] = True  # 12 pixels
    binary[5, 7] = True  # touches the block diagonally: 8-connected, part of it
    assert mask_box(binary) == (0, 0, 8, 6)
    assert largest_box(binary) == (3, 2, 8, 6)
    assert largest_box(np.zeros((3, 3), bool)) is None
    assert mask_box(np.zeros((3, 3))) is None


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


def test_detection_ap_ranks_by_score_and_integrates_the_precision_envelope():
    box = (0, 0, 1, 1)
    dets = [
        Detection(box, 0.9, 0.8),  # right
        Detection(box, 0.8, 0.0),  # a negative image: wrong
        Detection(box, 0.7, 0.6),  # right
        Detection(box, 0.6, 0.3),  # too loose: wrong
        Detection(None, 0.95, 0.0),  # nothing above the threshold: no detection
    ]
    # 3 images show the product; precision 1, 1/2, 2/3, 2/4 at recall 1/3, 1/3, 2/3, 2/3:
    # envelope 1 at 1/3 and 2/3 at 2/3 -> 1/3 * 1 + 1/3 * 2/3
    assert detection_ap(dets, 3) == pytest.approx(1 / 3 + 2 / 9)
    # at IoU 0.25 the loose one is right too: precision 3/4 at recall 3/3 lifts the
    # envelope at recall 2/3 to 3/4 -> 1/3 * 1 + 2/3 * 3/4
    assert detection_ap(dets, 3, iou=0.25) == pytest.approx(1 / 3 + 2 / 3 * 3 / 4)
    assert detection_ap([Detection(None, 1.0, 0.0)], 2) == 0.0
    assert math.isnan(detection_ap(dets, 0))
    # a tie between a right and a wrong detection: the wrong one ranks first
    tie = [Detection(box, 0.5, 1.0), Detection(box, 0.5, 0.0)]
    assert detection_ap(tie, 1) == pytest.approx(1 / 2)
