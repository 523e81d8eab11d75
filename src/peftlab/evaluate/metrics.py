"""Classification metrics: accuracy with a Wilson 95% interval, per-class P/R/F1, confusion, and (from
the scores) calibration: see evaluate/calibration_metrics.py."""

from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; better than the normal one near 0 and 1."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for two classifiers scored on the same examples: `only_a` examples
    only the first got right, `only_b` only the second (the binomial test of the discordant pairs at 1/2;
    McNemar 1947, Edwards 1948). 1.0 when they never disagree."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)  # Python integers: exact for any n


def classification_metrics(gold: list[int], pred: list[int], classes: list[str]) -> dict:
    """accuracy, ci95, n, per_class {class: precision, recall, f1, support}, confusion[gold][pred]."""
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    n = len(gold)
    correct = sum(confusion[i][i] for i in range(k))
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i][i]
        predicted = sum(confusion[j][i] for j in range(k))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "accuracy": correct / n if n else 0.0,
        "ci95": list(wilson_interval(correct, n)),
        "n": n,
        "per_class": per_class,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / k if k else 0.0,
        "confusion": {"labels": list(classes), "matrix": confusion},
    }


def metrics_from_scores(scores, gold: list[int], classes: list[str]) -> dict:
    """The full metrics of one evaluation from its (n, k) label-word scores: classification_metrics of the
    argmax, plus calibration (nll, brier, ece with its reliability bins, auroc; evaluate/calibration_metrics.py)."""
    from peftlab.evaluate.calibration_metrics import calibration_metrics

    pred = scores.argmax(dim=1).tolist() if len(gold) else []
    metrics = classification_metrics(gold, pred, classes)
    metrics.update(calibration_metrics(scores, gold))
    return metrics
