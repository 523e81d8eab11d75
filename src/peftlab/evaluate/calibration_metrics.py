"""Calibration of label-word classifiers: log-loss, Brier score, ECE with reliability bins, AUROC.

Probabilities are the softmax of the label-word scores (summed log-probabilities of each class's
label word) over the classes only: p(c | x) = exp(s_c) / sum_k exp(s_k). The rest of the
vocabulary is left out, so the classes' probabilities sum to 1 (as in lm-evaluation-harness's
multiple-choice accuracy, which compares the same scores).

Conventions (issue 12):
- nll: mean over examples of -ln p(gold), natural log.
- brier: mean over examples of sum over classes of (p_c - onehot_c)^2 (the multi-class form of
  Brier 1950; it lies in [0, 2], and is twice the "binary" Brier score when there are two classes).
- ece: top-label expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural
  Networks") with 15 equal-width confidence bins on [0, 1]; bin i holds the confidences in
  (i/15, (i+1)/15] (a confidence of exactly 0 goes to bin 0). ECE = sum_i n_i/n |acc_i - conf_i|.
- auroc: two classes only; the score is p(second class), the positives are the second class;
  rank-based (Mann-Whitney U / (n_pos n_neg)), a tie between a positive and a negative counts 0.5.
"""

from __future__ import annotations

import math

import torch

ECE_BINS = 15
PROBABILITIES = "softmax of the label-word scores over the classes"


def class_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """(n, k) label-word scores -> (n, k) probabilities, the softmax over the k classes (float64)."""
    return torch.softmax(scores.double(), dim=1)


def log_loss(scores: torch.Tensor, gold: list[int]) -> float:
    """Mean -ln p(gold); from log_softmax, so a confident wrong answer gives a large finite value."""
    if not gold:
        return float("nan")
    log_p = torch.log_softmax(scores.double(), dim=1)
    return float(-log_p[torch.arange(len(gold)), torch.tensor(gold)].mean())


def brier_score(probs: torch.Tensor, gold: list[int]) -> float:
    """Mean over examples of sum over classes of (p - onehot)^2."""
    if not gold:
        return float("nan")
    onehot = torch.nn.functional.one_hot(torch.tensor(gold), probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def reliability_bins(probs: torch.Tensor, gold: list[int], n_bins: int = ECE_BINS) -> dict:
    """Per confidence bin: its edges, count, mean top-label confidence and accuracy (None when empty)."""
    confidence, pred = probs.max(dim=1)
    correct = (pred == torch.tensor(gold, dtype=torch.long)).double() if gold else torch.zeros(0)
    # ceil(conf * n) - 1 puts conf in (i/n, (i+1)/n] into bin i; clamp sends 0 to bin 0.
    index = (torch.ceil(confidence * n_bins) - 1).clamp(0, n_bins - 1).long()
    bins = {"n_bins": n_bins, "lower": [i / n_bins for i in range(n_bins)],
            "upper": [(i + 1) / n_bins for i in range(n_bins)], "count": [], "confidence": [], "accuracy": []}
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        bins["count"].append(count)
        bins["confidence"].append(float(confidence[members].mean()) if count else None)
        bins["accuracy"].append(float(correct[members].mean()) if count else None)
    return bins


def expected_calibration_error(bins: dict) -> float:
    """sum over bins of (count / n) * |accuracy - confidence|, from reliability_bins' output."""
    n = sum(bins["count"])
    if not n:
        return float("nan")
    return sum(c / n * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)


def auroc(positive_scores: list[float], is_positive: list[bool]) -> float | None:
    """Area under the ROC curve by ranks (ties 0.5); None when one of the two classes is absent."""
    pos = [s for s, y in zip(positive_scores, is_positive) if y]
    neg = [s for s, y in zip(positive_scores, is_positive) if not y]
    if not pos or not neg:
        return None
    # Mid-ranks over all scores: U = (sum of the positives' ranks) - n_pos (n_pos + 1) / 2.
    order = sorted(range(len(positive_scores)), key=lambda i: positive_scores[i])
    ranks = [0.0] * len(order)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and positive_scores[order[j + 1]] == positive_scores[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1  # 1-based mid-rank of the tied run i..j
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, is_positive) if y)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def calibration_metrics(scores: torch.Tensor, gold: list[int]) -> dict:
    """nll, brier, ece (15 bins), reliability bins, and auroc for two classes (None otherwise)."""
    probs = class_probabilities(scores)
    bins = reliability_bins(probs, gold)
    two = probs.shape[1] == 2
    area = auroc(probs[:, 1].tolist(), [g == 1 for g in gold]) if two else None
    ece = expected_calibration_error(bins)
    return {"nll": log_loss(scores, gold), "brier": brier_score(probs, gold),
            "ece": None if math.isnan(ece) else ece, "auroc": area, "reliability": bins,
            "probabilities": PROBABILITIES,
            "calibration_conventions": f"nll: natural log; brier: sum over classes, mean over examples; "
                                       f"ece: top-label, {ECE_BINS} equal-width bins (i/{ECE_BINS}, "
                                       f"(i+1)/{ECE_BINS}]; auroc: p(second class), ties 0.5"}
