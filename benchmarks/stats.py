"""Error bars for accuracy.py: paired bootstrap CIs over questions, and POPE's yes/no metrics.

numpy only (no scipy): the benchmarks import nothing heavier than the runtime needs.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def paired_diff_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """Accuracy of a minus accuracy of b on the same questions, with a percentile bootstrap CI.

    `a`, `b`: per-question correctness (0/1), aligned. Each resample draws the questions
    with replacement and scores both methods on the same draw, so what they share (the
    hard questions) cancels: the CI is that of the difference, not of two accuracies.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired correctness must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return {"diff": None, "low": None, "high": None, "n": 0, "excludes_zero": False}
    d = a - b
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = d[draws].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "n": n,
            "excludes_zero": bool(low > 0 or high < 0)}


def pope_metrics(answers_yes, truth_yes) -> dict:
    """POPE's accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class)."""
    pred, truth = np.asarray(answers_yes, dtype=bool), np.asarray(truth_yes, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"answers and truth differ in shape: {pred.shape} and {truth.shape}")
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n}
