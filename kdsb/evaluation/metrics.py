"""Binary classification metrics in NumPy: log loss, ROC AUC, accuracy, base rate, calibration
(Brier score, ECE, reliability bins), bootstrap intervals and threshold picking.

Kept free of TensorFlow and scikit-learn so `kdsb evaluate` starts quickly and has no extra
dependency. The functions take labels `y` (0/1) and probabilities `p` of the positive class,
both 1-D of the same length, and validate them (`ece_if_calibrated` takes `p` alone).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit
from scipy.stats import rankdata

from kdsb.errors import KdsbError

logger = logging.getLogger(__name__)

# Kaggle's Data Science Bowl 2017 clipped submissions at 1e-15 before taking logarithms.
LOG_LOSS_EPS = 1e-15
DEFAULT_THRESHOLD = 0.5
DEFAULT_CALIBRATION_BINS = 10
DEFAULT_BOOTSTRAP = 2000
DEFAULT_LEVEL = 0.95
DEFAULT_CALIBRATED_DRAWS = 2000  # label draws of a perfectly calibrated model (ece_if_calibrated)
# The metrics `bootstrap_intervals` reports, named as in `summary`.
BOOTSTRAP_METRICS = ("log_loss", "roc_auc", "accuracy", "brier")
# Rules of `pick_threshold`.
THRESHOLD_RULES = ("youden", "f1")
# Bootstrap resamples and calibrated label draws are made and scored this many patient draws
# at a time, to bound memory.
_CHUNK_DRAWS = 2_000_000
# Predictions spanning less than this tell no patient apart (a model on the base-rate plateau,
# `kdsb.training.plateau`; a cohort unlike a model's training cohort, `kdsb predict`).
CONSTANT_SPREAD = 1e-3


def prediction_spread(p) -> float:
    """max − min of predictions `p`; infinite for fewer than two (one patient's prediction is
    never "the same for every patient")."""
    return float(np.ptp(p)) if len(p) > 1 else math.inf


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


def _counts_at_distinct_scores(y: np.ndarray, p: np.ndarray):
    """Distinct scores in decreasing order, and the true and false positives when predicting
    positive for `p >= score`, for each (validated inputs)."""
    order = np.argsort(-p, kind="stable")
    y_sorted, p_sorted = y[order], p[order]
    # Keep the last index of each run of equal scores: thresholds between distinct values.
    last_of_run = np.r_[np.flatnonzero(np.diff(p_sorted)), y.size - 1]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = (last_of_run + 1) - tp
    return p_sorted[last_of_run], tp, fp


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Tied scores move the curve diagonally, so the trapezoidal area equals `roc_auc`. `p` may be
    any finite scores.
    """
    y, p = _validate(y, p, probabilities=False)
    _, tp, fp = _counts_at_distinct_scores(y, p)
    positives, negatives = y.sum(), y.size - y.sum()
    tpr = np.r_[0.0, tp / positives] if positives else np.zeros(tp.size + 1)
    fpr = np.r_[0.0, fp / negatives] if negatives else np.zeros(fp.size + 1)
    return fpr, tpr


def brier(y, p) -> float:
    """Brier score: the mean squared difference between probability and label (0 is perfect,
    0.25 is what a constant 0.5 scores)."""
    y, p = _validate(y, p)
    return float(np.mean((p - y) ** 2))


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


def _bin_edges(n_bins: int) -> np.ndarray:
    """The n + 1 edges k/n of equal-width calibration bins (exactly 0.3, not linspace's
    0.30000000000000004)."""
    if n_bins < 1:
        raise KdsbError(f"expected at least one calibration bin, received {n_bins}")
    return np.arange(n_bins + 1) / n_bins


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """The calibration bin of each probability: [k/n, (k+1)/n) by the edges of `_bin_edges`,
    the last one closed."""
    edges = _bin_edges(n_bins)
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)


def calibration_bins(y, p, n_bins: int = DEFAULT_CALIBRATION_BINS) -> CalibrationBins:
    """Bin patients by predicted probability and compare mean prediction with observed rate.

    Bins are [k/n, (k+1)/n), the last one closed so p = 1 falls into it.
    """
    y, p = _validate(y, p)
    edges = _bin_edges(n_bins)
    index = _bin_index(p, n_bins)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=n_bins) / counts
        observed_rate = np.bincount(index, weights=y, minlength=n_bins) / counts
    return CalibrationBins(edges, mean_predicted, observed_rate, counts)


def expected_calibration_error(y, p, n_bins: int = DEFAULT_CALIBRATION_BINS) -> float:
    """Expected calibration error over the equal-width bins of `calibration_bins`.

    The sum over non-empty bins of (patients in the bin / all patients) times
    |observed rate − mean predicted probability| in that bin: 0 is perfect calibration.
    """
    bins = calibration_bins(y, p, n_bins)
    filled = bins.counts > 0
    gaps = np.abs(bins.observed_rate[filled] - bins.mean_predicted[filled])
    return float(np.sum(bins.counts[filled] / bins.counts.sum() * gaps))


def ece_if_calibrated(
    p,
    n_bins: int = DEFAULT_CALIBRATION_BINS,
    *,
    n_draws: int = DEFAULT_CALIBRATED_DRAWS,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """The ECE a perfectly calibrated model with these predictions would show, by chance alone.

    On few patients the ECE is large even for a calibrated model: each bin's observed rate is a
    handful of coin flips. Labels are drawn as y ~ Bernoulli(p) `n_draws` times (uniforms of
    `np.random.default_rng(seed)` against the predictions in ascending order, so the answer
    does not depend on the patients' order; a block of draws at a time, each draw a row of
    `rng.random((n_draws, n))`) and each draw's ECE computed over the bins of `calibration_bins`
    (which depend on p only). An observed ECE near the mean is what calibration looks like at
    this size; one above the `level` quantile is evidence of miscalibration.

    Returns:
        (mean, `level` quantile) of the drawn ECEs.
    """
    if n_draws < 1:
        raise KdsbError(f"expected at least one draw, received {n_draws}")
    p = np.sort(np.asarray(p, dtype=np.float64).ravel())
    if p.size == 0:
        raise KdsbError("expected at least one prediction, received none")
    bins = calibration_bins(np.zeros(p.size), p, n_bins)  # checks p
    filled = np.flatnonzero(bins.counts)
    one_hot = (_bin_index(p, n_bins)[:, None] == filled[None, :]).astype(np.float64)
    weights = bins.counts[filled] / p.size
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_DRAWS // p.size)
    eces = []
    for start in range(0, n_draws, rows):
        drawn = rng.random((min(rows, n_draws - start), p.size)) < p
        observed = (drawn @ one_hot) / bins.counts[filled]  # draw × filled bin
        eces.append(np.abs(observed - bins.mean_predicted[filled]) @ weights)
    eces = np.concatenate(eces)
    return float(eces.mean()), float(np.quantile(eces, level))


def bootstrap_intervals(
    y,
    p,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of log loss, ROC AUC, accuracy and Brier score.

    Each resample draws as many patients as there are, with replacement, from
    `np.random.default_rng(seed)` (index arrays `rng.integers(0, n, size=(n_boot, n))`, drawn a
    block of rows at a time); the interval is the central `level` fraction of the resampled
    values. Resamples that hold one class only have no ROC AUC and are skipped for the AUC (its
    interval comes from the others; both ends are NaN when every resample is one class). One
    patient has no interval (NaN): every resample would be that patient, a zero-width interval
    that claims a certainty one patient cannot give.

    Args:
        y: 0/1 labels.
        p: probabilities of the positive class.
        n_boot: number of resamples, at least 1.
        level: coverage of the interval, in (0, 1) (0.95 gives the 2.5 and 97.5 percentiles).
        seed: seed of the resampling.
        threshold: decision threshold of the accuracy, as in `accuracy`.

    Returns:
        Metric name (`BOOTSTRAP_METRICS`) → (low, high).
    """
    if n_boot < 1:
        raise KdsbError(f"expected at least one bootstrap resample, received {n_boot}")
    if not 0.0 < level < 1.0:
        raise KdsbError(f"expected an interval level in (0, 1), received {level}")
    y, p = _validate(y, p)
    n = y.size
    if n < 2:
        return dict.fromkeys(BOOTSTRAP_METRICS, (math.nan, math.nan))
    clipped = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    per_patient = np.stack([
        -(y * np.log(clipped) + (1.0 - y) * np.log1p(-clipped)),  # log loss
        ((p >= threshold) == (y == 1.0)).astype(np.float64),  # accuracy
        (p - y) ** 2,  # Brier
    ], axis=1)
    # The AUC of a resample from how often each patient was drawn (counts): patients sorted by
    # score and equal scores grouped g = 1, 2, …, with pos_g and neg_g the drawn positives and
    # negatives in group g, AUC = Σ_g pos_g · (neg below g + ½ neg_g) / (Σ pos · Σ neg): each
    # positive against the negatives scored lower, ties counting one half.
    order = np.argsort(p, kind="stable")
    group_starts = np.r_[0, np.flatnonzero(np.diff(p[order])) + 1]
    is_positive = y[order] == 1.0

    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _CHUNK_DRAWS // n)
    means, aucs = [], []
    for start in range(0, n_boot, rows_per_chunk):
        rows = min(rows_per_chunk, n_boot - start)
        index = rng.integers(0, n, size=(rows, n))
        offsets = (np.arange(rows) * n)[:, None]
        counts = np.bincount((index + offsets).ravel(), minlength=rows * n)
        counts = counts.reshape(rows, n).astype(np.float64)
        means.append(counts @ per_patient / n)
        sorted_counts = counts[:, order]
        # pos_g, neg_g: (rows, groups); `below` is each group's negatives scored lower.
        pos = np.add.reduceat(np.where(is_positive, sorted_counts, 0.0), group_starts, axis=1)
        neg = np.add.reduceat(np.where(is_positive, 0.0, sorted_counts), group_starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        u = np.sum(pos * (below + 0.5 * neg), axis=1)
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.where(pairs > 0, u / pairs, math.nan))
    means = np.concatenate(means)
    aucs = np.concatenate(aucs)
    aucs = aucs[~np.isnan(aucs)]
    if aucs.size < n_boot:
        logger.debug("%d of %d bootstrap resamples hold one class: no AUC", n_boot - aucs.size,
                     n_boot)
    tails = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]

    def interval(values: np.ndarray) -> tuple[float, float]:
        if values.size == 0:
            return math.nan, math.nan
        low, high = np.quantile(values, tails)
        return float(low), float(high)

    by_name = {"log_loss": means[:, 0], "roc_auc": aucs, "accuracy": means[:, 1],
               "brier": means[:, 2]}
    return {name: interval(by_name[name]) for name in BOOTSTRAP_METRICS}


@dataclass(frozen=True)
class Confusion:
    """The 2×2 confusion matrix at a threshold (predict positive when p >= threshold).

    Attributes:
        threshold: the decision threshold.
        tp, fp, tn, fn: true and false positives, true and false negatives.
    """

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        """True positive rate tp / (tp + fn); NaN without positives."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """True negative rate tn / (tn + fp); NaN without negatives."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        """Positive predictive value (precision) tp / (tp + fp); NaN without positive calls."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        """Negative predictive value tn / (tn + fn); NaN without negative calls."""
        return _ratio(self.tn, self.tn + self.fn)

    def as_dict(self) -> dict[str, float]:
        """The threshold, the four counts and the four rates, by name."""
        return {
            "threshold": self.threshold, "tp": self.tp, "fp": self.fp, "tn": self.tn,
            "fn": self.fn, "sensitivity": self.sensitivity, "specificity": self.specificity,
            "ppv": self.ppv, "npv": self.npv,
        }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def confusion_at(y, p, threshold: float) -> Confusion:
    """Count true and false positives and negatives when predicting positive for p >= threshold.

    `p` may be any finite scores.
    """
    y, p = _validate(y, p, probabilities=False)
    if not math.isfinite(threshold):
        raise KdsbError(f"expected a finite threshold, received {threshold!r}")
    called = p >= threshold
    positive = y == 1.0
    return Confusion(
        threshold=float(threshold),
        tp=int(np.sum(called & positive)),
        fp=int(np.sum(called & ~positive)),
        tn=int(np.sum(~called & ~positive)),
        fn=int(np.sum(~called & positive)),
    )


def pick_threshold(y, p, rule: str) -> float:
    """The threshold (predict positive when p >= threshold) that a rule finds best on `y`, `p`.

    The cuts considered fall between consecutive distinct values of `p`. Rules:

    - "youden": maximise Youden's J = sensitivity + specificity − 1;
    - "f1": maximise F1 = 2·tp / (2·tp + fp + fn).

    Ties go to the highest cut (the fewest positive calls). The threshold lies halfway, in
    log-odds, between the lowest score called positive and the next lower one (halfway in
    probability when either is exactly 0 or 1; the lowest score called positive itself when
    every patient is called positive, or when the two are too near each other for a halfway
    point), rather than on a patient's score: predictions
    clipped or rounded otherwise (`kdsb predict` clips to [0.005, 0.995]; oof.csv does not)
    then fall on the side of the validation patients they are close to. Pick on validation or
    out-of-fold predictions, never on the patients the threshold is then evaluated on.

    Raises:
        KdsbError: an unknown rule, or `y` holds one class only (nothing to trade off).
    """
    if rule not in THRESHOLD_RULES:
        raise KdsbError(
            f"expected a threshold rule among {', '.join(THRESHOLD_RULES)}, received {rule!r}"
        )
    y, p = _validate(y, p)
    positives = y.sum()
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        raise KdsbError(
            f"expected both classes to pick a threshold, received {int(positives)} positive "
            f"and {int(negatives)} negative patient(s)"
        )
    scores, tp, fp = _counts_at_distinct_scores(y, p)  # scores in decreasing order
    # One division of exact integers each, so that equal ratios tie exactly.
    if rule == "youden":
        objective = (tp * negatives - fp * positives) / (positives * negatives)
    else:
        objective = 2.0 * tp / (tp + positives + fp)  # 2tp / (2tp + fp + fn), fn = P - tp
    best = int(np.argmax(objective))  # argmax: the first, the highest score
    if best == scores.size - 1:
        return float(scores[best])
    higher, lower = scores[best: best + 2]
    if lower <= 0.0 or higher >= 1.0:  # no log-odds midpoint (found in review: 1e-155 for 0)
        return float((higher + lower) / 2.0)
    middle = float(expit(logit(np.array([higher, lower])).mean()))
    # Scores too near each other for a midpoint between them: the higher one itself.
    return middle if lower < middle <= higher else float(higher)


def summary(y, p, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """The headline numbers: log loss, Brier score, ECE (and a calibrated model's by chance:
    `ece_if_calibrated`, its mean and 95 % quantile), ROC AUC, accuracy, base-rate log loss
    and counts."""
    y, p = _validate(y, p)
    chance_mean, chance_high = ece_if_calibrated(p)
    return {
        "log_loss": log_loss(y, p),
        "brier": brier(y, p),
        "ece": expected_calibration_error(y, p),
        "ece_if_calibrated": chance_mean,
        "ece_if_calibrated_95": chance_high,
        "roc_auc": roc_auc(y, p),
        "accuracy": accuracy(y, p, threshold),
        "base_rate_log_loss": base_rate_log_loss(y),
        "n": int(y.size),
        "n_positive": int(y.sum()),
    }
