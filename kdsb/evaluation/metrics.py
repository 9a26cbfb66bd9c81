"""Binary classification metrics in NumPy: log loss, ROC AUC, accuracy, base rate, calibration.

Kept free of TensorFlow and scikit-learn so `kdsb evaluate` starts quickly and has no extra
dependency. Every function takes labels `y` (0/1) and probabilities `p` of the positive class,
both 1-D of the same length, and validates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from kdsb.errors import KdsbError

# Kaggle's Data Science Bowl 2017 clipped submissions at 1e-15 before taking logarithms.
LOG_LOSS_EPS = 1e-15
DEFAULT_THRESHOLD = 0.5
DEFAULT_CALIBRATION_BINS = 10


def _validate(y, p=None, *, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.size == 0:
        raise KdsbError("expected at least one label, received none")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = float(y[~np.isin(y, (0.0, 1.0))][0])
        raise KdsbError(f"expected labels 0 or 1, received {bad!r}")
    if p is None:
        return y, None
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise KdsbError(
            f"expected as many probabilities as labels, received {p.size} and {y.size}"
        )
    if not probabilities:
        if not np.isfinite(p).all():
            raise KdsbError(f"expected finite scores, received {float(p[~np.isfinite(p)][0])!r}")
        return y, p
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        bad = float(p[~(np.isfinite(p) & (p >= 0) & (p <= 1))][0])
        raise KdsbError(f"expected probabilities in [0, 1], received {bad!r}")
    return y, p


def log_loss(y, p, eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary cross-entropy in nats, with `p` clipped to [eps, 1 - eps]."""
    y, p = _validate(y, p)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def base_rate_log_loss(y, eps: float = LOG_LOSS_EPS) -> float:
    """Log loss of the constant predictor that outputs the mean label (the bar to beat).

    The mean is taken over `y` itself, so this is the best any constant can score on `y`.
    """
    y, _ = _validate(y)
    return log_loss(y, np.full_like(y, y.mean()), eps=eps)


def accuracy(y, p, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of patients whose label equals `p >= threshold`."""
    y, p = _validate(y, p)
    return float(np.mean((p >= threshold) == (y == 1.0)))


def roc_auc(y, p) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic; ties count one half.

    `p` may be any finite scores (only their order matters). Returns NaN when `y` holds a
    single class (the AUC is undefined).
    """
    y, p = _validate(y, p, probabilities=False)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(p)  # ties get their mean rank
    u = ranks[y == 1.0].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Tied scores move the curve diagonally, so the trapezoidal area equals `roc_auc`. `p` may be
    any finite scores.
    """
    y, p = _validate(y, p, probabilities=False)
    order = np.argsort(-p, kind="stable")
    y_sorted, p_sorted = y[order], p[order]
    # Keep the last index of each run of equal scores: thresholds between distinct values.
    last_of_run = np.r_[np.flatnonzero(np.diff(p_sorted)), y.size - 1]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = (last_of_run + 1) - tp
    positives, negatives = y.sum(), y.size - y.sum()
    tpr = np.r_[0.0, tp / positives] if positives else np.zeros(last_of_run.size + 1)
    fpr = np.r_[0.0, fp / negatives] if negatives else np.zeros(last_of_run.size + 1)
    return fpr, tpr


@dataclass(frozen=True)
class CalibrationBins:
    """A reliability table over equal-width probability bins on [0, 1].

    Attributes:
        edges: bin edges, shape (n_bins + 1,).
        mean_predicted: mean probability in each bin (NaN for empty bins).
        observed_rate: fraction of positives in each bin (NaN for empty bins).
        counts: patients per bin.
    """

    edges: np.ndarray
    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    counts: np.ndarray


def calibration_bins(y, p, n_bins: int = DEFAULT_CALIBRATION_BINS) -> CalibrationBins:
    """Bin patients by predicted probability and compare mean prediction with observed rate.

    Bins are [k/n, (k+1)/n), the last one closed so p = 1 falls into it.
    """
    if n_bins < 1:
        raise KdsbError(f"expected at least one calibration bin, received {n_bins}")
    y, p = _validate(y, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=n_bins) / counts
        observed_rate = np.bincount(index, weights=y, minlength=n_bins) / counts
    return CalibrationBins(edges, mean_predicted, observed_rate, counts)


def summary(y, p, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """The headline numbers: log loss, ROC AUC, accuracy, base-rate log loss and counts."""
    y, p = _validate(y, p)
    return {
        "log_loss": log_loss(y, p),
        "roc_auc": roc_auc(y, p),
        "accuracy": accuracy(y, p, threshold),
        "base_rate_log_loss": base_rate_log_loss(y),
        "n": int(y.size),
        "n_positive": int(y.sum()),
    }
