"""Metrics of the held-out evaluations and the served-score tests (numpy only): AUC and its
standard error, Wilson intervals, sensitivity / specificity, expected calibration error and
the box-hit rule. Every family's evaluation, ``common``'s operating point and ``evaluate``
use them; nothing in ``mosmedai_training`` is imported here.
"""

from __future__ import annotations

import math

import numpy as np

#: A predicted box "hits" when its centre lies in the true box grown by this share (about its centre).
HIT_ENLARGEMENT = 0.25
ECE_BINS = 10


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def auc_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count one half)."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC."""
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(variance, 0.0))


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sensitivity_specificity(positive: np.ndarray, labels: np.ndarray) -> tuple[float, float, dict[str, int]]:
    positive = np.asarray(positive, bool).ravel()
    labels = np.asarray(labels, bool).ravel()
    counts = {
        "tp": int((positive & labels).sum()),
        "fn": int((~positive & labels).sum()),
        "tn": int((~positive & ~labels).sum()),
        "fp": int((positive & ~labels).sum()),
    }
    sensitivity = counts["tp"] / max(1, counts["tp"] + counts["fn"])
    specificity = counts["tn"] / max(1, counts["tn"] + counts["fp"])
    return sensitivity, specificity, counts


def expected_calibration_error(probability: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over equal-width probability bins: sum of |mean p - observed rate| weighted by bin share."""
    probability = np.asarray(probability, np.float64).ravel()
    labels = np.asarray(labels, np.float64).ravel()
    index = np.minimum((probability * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(probability[chosen].mean() - labels[chosen].mean())
    return float(error)


def box_hit(predicted: np.ndarray, truth: np.ndarray, enlargement: float = HIT_ENLARGEMENT) -> bool:
    """Whether the predicted box's centre lies in the true box grown by `enlargement`."""
    centre_r, centre_c = (predicted[0] + predicted[2]) / 2.0, (predicted[1] + predicted[3]) / 2.0
    grow_r = (truth[2] - truth[0]) * enlargement / 2.0
    grow_c = (truth[3] - truth[1]) * enlargement / 2.0
    return bool(
        truth[0] - grow_r <= centre_r <= truth[2] + grow_r and truth[1] - grow_c <= centre_c <= truth[3] + grow_c
    )
