"""Calibration metrics against hand computations on fixed scores (issue 12)."""

import math

import pytest
import torch

from peftlab.evaluate.calibration_metrics import auroc, calibration_metrics
from peftlab.evaluate.metrics import metrics_from_scores

# Probabilities chosen off the 15-bin edges; gold labels below. The scores are ln p shifted by a
# constant per row (what label-word log-probabilities look like), so the softmax must give p back.
PROBS = [(0.15, 0.85), (0.62, 0.38), (0.71, 0.29), (0.08, 0.92), (0.88, 0.12)]
GOLD = [1, 0, 1, 0, 0]


def scores_of(probs, shift=(-3.0, -7.5, -1.0, -12.0, -0.2)):
    return torch.tensor([[math.log(p) + s for p in row] for row, s in zip(probs, shift)])


def test_nll_brier_ece_auroc_equal_a_hand_computation():
    m = calibration_metrics(scores_of(PROBS), GOLD)
    assert m["nll"] == pytest.approx(-(math.log(.85) + math.log(.62) + math.log(.29) + math.log(.08)
                                       + math.log(.88)) / 5)
    # Brier: per example sum over both classes of (p - onehot)^2 = 2 (1 - p_gold)^2.
    assert m["brier"] == pytest.approx(2 * (.15**2 + .38**2 + .71**2 + .92**2 + .12**2) / 5)
    # Top-label confidences .85 (bin 12, right), .62 (bin 9, right), .71 (bin 10, wrong), and .92, .88 in
    # bin 13 (one wrong, one right: accuracy .5, confidence .9).
    assert m["ece"] == pytest.approx((.15 + .38 + .71 + 2 * abs(.5 - .9)) / 5)
    bins = m["reliability"]
    assert bins["n_bins"] == 15 and sum(bins["count"]) == 5
    assert [i for i, c in enumerate(bins["count"]) if c] == [9, 10, 12, 13]
    assert bins["count"][13] == 2 and bins["confidence"][13] == pytest.approx(.9)
    assert bins["accuracy"][13] == pytest.approx(.5) and bins["accuracy"][10] == 0.0
    assert bins["confidence"][0] is None
    # AUROC, positives = class 1 (A .85, C .29) against negatives (.38, .92, .12): wins A>B, A>E, C>E of 6.
    assert m["auroc"] == pytest.approx(3 / 6)


def test_auroc_counts_ties_as_half_and_needs_both_classes():
    assert auroc([0.5, 0.5, 0.7, 0.1], [True, False, True, False]) == pytest.approx(3.5 / 4)
    assert auroc([0.2, 0.4, 0.6], [False, False, True]) == 1.0
    assert auroc([0.2, 0.4], [True, True]) is None


def test_three_classes_brier_sums_over_classes_and_no_auroc():
    m = calibration_metrics(scores_of([(0.5, 0.3, 0.2)], shift=(-2.0,)), [2])
    assert m["brier"] == pytest.approx(.5**2 + .3**2 + .8**2)
    assert m["nll"] == pytest.approx(-math.log(.2))
    assert m["ece"] == pytest.approx(.5)  # one example, confidence .5, wrong
    assert m["auroc"] is None


def test_metrics_from_scores_holds_accuracy_and_calibration():
    m = metrics_from_scores(scores_of(PROBS), GOLD, ["negative", "positive"])
    # argmax: 1, 0, 0, 1, 0 against gold 1, 0, 1, 0, 0 -> 3 of 5.
    assert m["accuracy"] == pytest.approx(3 / 5) and m["confusion"]["matrix"] == [[2, 1], [1, 1]]
    assert m["nll"] == pytest.approx(calibration_metrics(scores_of(PROBS), GOLD)["nll"])
    assert "softmax" in m["probabilities"]
