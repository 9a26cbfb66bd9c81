"""Tests of kdsb.evaluation.metrics against hand computations and brute-force NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit, logit

from kdsb.errors import KdsbError
from kdsb.evaluation import metrics


def _auc_by_pairs(y, p):
    """Brute force: P(score of a positive > score of a negative) + half the ties."""
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_log_loss_by_hand():
    y = [1, 0, 1, 0]
    p = [0.9, 0.2, 0.6, 0.5]
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.5)) / 4
    assert metrics.log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    # Clipping: a confident mistake costs -log(eps), not infinity.
    assert metrics.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))
    assert metrics.log_loss([0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_base_rate_log_loss_is_the_entropy_of_the_mean():
    y = np.array([1, 0, 0, 0])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert metrics.base_rate_log_loss(y) == pytest.approx(expected)
    assert metrics.base_rate_log_loss(y) == pytest.approx(metrics.log_loss(y, np.full(4, 0.25)))


def test_accuracy_threshold():
    assert metrics.accuracy([1, 0, 1, 0], [0.5, 0.49, 0.2, 0.7]) == pytest.approx(0.5)
    assert metrics.accuracy([1, 0], [0.6, 0.4], threshold=0.7) == pytest.approx(0.5)


def test_roc_auc_matches_pairwise_reference_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) * 0.5 + 0.3 * y, 1)  # coarse rounding makes many ties
    assert metrics.roc_auc(y, p) == pytest.approx(_auc_by_pairs(y, p), abs=1e-12)
    assert metrics.roc_auc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)
    assert metrics.roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)
    assert metrics.roc_auc([1, 0], [0.1, 0.9]) == pytest.approx(0.0)
    assert math.isnan(metrics.roc_auc([1, 1], [0.1, 0.9]))


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    p = np.round(rng.random(100), 1)
    fpr, tpr = metrics.roc_curve(y, p)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(metrics.roc_auc(y, p), abs=1e-12)


def test_calibration_bins():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.95, 0.9, 1.0])
    bins = metrics.calibration_bins(y, p, n_bins=2)
    np.testing.assert_allclose(bins.edges, [0, 0.5, 1])
    np.testing.assert_array_equal(bins.counts, [2, 3])
    np.testing.assert_allclose(bins.mean_predicted, [0.1, (0.95 + 0.9 + 1.0) / 3])
    np.testing.assert_allclose(bins.observed_rate, [0.5, 2 / 3])
    empty = metrics.calibration_bins([1], [0.95], n_bins=4)
    assert np.isnan(empty.mean_predicted[:3]).all() and empty.counts.tolist() == [0, 0, 0, 1]
    # A probability on an edge k/n opens bin k, and the edges are those k/n (found in review:
    # 5/7 fell into bin 4, and the drawn edge 3/10 was 0.30000000000000004).
    on_edges = metrics.calibration_bins([1, 0], [5 / 7, 0.3], n_bins=7)
    assert on_edges.counts.tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert metrics.calibration_bins([1], [0.3], n_bins=10).edges[3] == 0.3


def test_ece_if_calibrated_is_the_mean_ece_of_labels_drawn_from_the_predictions(monkeypatch):
    """Against a loop over the same draws (one row of uniforms per draw, against the sorted
    predictions), whatever the patients' order, in blocks of draws, one draw at a time or all
    at once; exact for sure predictions and for one bin of coin flips."""
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(30), [0.0, 1.0, 0.5]])
    uniforms = np.random.default_rng(7).random((500, p.size))
    reference = np.array([metrics.expected_calibration_error(u < np.sort(p), np.sort(p), 3)
                          for u in uniforms])
    expected = (reference.mean(), np.quantile(reference, 0.9))

    def found(predictions):
        return metrics.ece_if_calibrated(predictions, 3, n_draws=500, level=0.9, seed=7)

    assert found(p) == pytest.approx(expected, rel=1e-12)
    assert found(p[::-1]) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(metrics, "_CHUNK_DRAWS", 2 * p.size + 1)  # two draws per block
    assert found(p) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(metrics, "_CHUNK_DRAWS", p.size // 2)  # fewer than one draw: one
    assert found(p) == pytest.approx(expected, rel=1e-12)
    assert metrics.ece_if_calibrated([0.0, 1.0, 1.0, 0.0]) == (0.0, 0.0)  # sure and right
    # Four coin flips in one bin: E|k/4 - 1/2| over k ~ Binomial(4, 1/2) is 3/16.
    mean, high = metrics.ece_if_calibrated([0.5] * 4, n_draws=40_000)
    assert mean == pytest.approx(3 / 16, abs=0.004) and high == 0.5
    with pytest.raises(KdsbError, match="expected at least one draw, received 0"):
        metrics.ece_if_calibrated([0.5], n_draws=0)
    with pytest.raises(KdsbError, match="expected at least one prediction, received none"):
        metrics.ece_if_calibrated([])


def test_summary_keys_and_validation():
    scores = metrics.summary([1, 0], [0.8, 0.3])
    assert set(scores) == {"log_loss", "brier", "ece", "ece_if_calibrated",
                           "ece_if_calibrated_95", "roc_auc", "accuracy", "base_rate_log_loss",
                           "n", "n_positive"}
    assert (scores["ece_if_calibrated"], scores["ece_if_calibrated_95"]) == pytest.approx(
        metrics.ece_if_calibrated([0.8, 0.3]))
    assert scores["brier"] == pytest.approx((0.2**2 + 0.3**2) / 2)
    assert scores["ece"] == pytest.approx(metrics.expected_calibration_error([1, 0], [0.8, 0.3]))
    assert scores["n"] == 2 and scores["n_positive"] == 1
    with pytest.raises(KdsbError, match="expected labels 0 or 1, received 2.0"):
        metrics.log_loss([2, 0], [0.5, 0.5])
    with pytest.raises(KdsbError, match="expected as many probabilities as labels"):
        metrics.log_loss([1, 0], [0.5])
    with pytest.raises(KdsbError, match=r"expected probabilities in \[0, 1\], received 1.5"):
        metrics.log_loss([1, 0], [1.5, 0.5])
    assert metrics.roc_auc([1, 0, 0], [7.0, -3.0, 2.0]) == pytest.approx(1.0)  # any scores
    with pytest.raises(KdsbError, match="expected finite scores, received nan"):
        metrics.roc_auc([1, 0], [np.nan, 0.5])
    with pytest.raises(KdsbError, match="expected at least one label"):
        metrics.base_rate_log_loss([])


# A small example worked by hand. Distinct scores, highest first, with true and false positives
# when predicting positive for p >= score (3 positives, 3 negatives):
#   0.9: tp 1 fp 0   J 1/3   F1 2/4
#   0.7: tp 2 fp 0   J 2/3   F1 4/5
#   0.6: tp 2 fp 1   J 1/3   F1 4/6
#   0.35: tp 3 fp 1  J 2/3   F1 6/7
#   0.3: tp 3 fp 2   J 1/3   F1 6/8
#   0.1: tp 3 fp 3   J 0     F1 6/9
HAND_Y = np.array([0, 0, 1, 0, 1, 1])
HAND_P = np.array([0.1, 0.3, 0.35, 0.6, 0.7, 0.9])


def _sample(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.25, n), 0.01, 0.99), 2)


def test_brier_by_hand():
    y, p = [1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]
    assert metrics.brier(y, p) == pytest.approx((0.01 + 0.04 + 0.16 + 0.25) / 4, rel=1e-12)
    assert metrics.brier([1, 0], [1.0, 0.0]) == 0.0
    assert metrics.brier([1, 0], [0.5, 0.5]) == pytest.approx(0.25)
    with pytest.raises(KdsbError, match=r"expected probabilities in \[0, 1\]"):
        metrics.brier([1], [1.5])


def test_expected_calibration_error_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.95, 0.9, 1.0])
    # Bin [0, 0.5): 2 patients, mean 0.1, rate 1/2. Bin [0.5, 1]: 3, mean 0.95, rate 2/3.
    expected = 2 / 5 * abs(0.5 - 0.1) + 3 / 5 * abs(2 / 3 - 0.95)
    assert metrics.expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
    # Predicting the rate of each bin is perfectly calibrated.
    assert metrics.expected_calibration_error([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.0)
    # One bin: the gap between mean prediction and mean label.
    assert metrics.expected_calibration_error(y, p, n_bins=1) == pytest.approx(
        abs(p.mean() - y.mean()))


def test_expected_calibration_error_matches_a_loop_reference():
    y, p = _sample(300, 2)
    expected = 0.0
    for k in range(10):
        inside = (p >= k / 10) & ((p < (k + 1) / 10) if k < 9 else (p <= 1))
        if inside.any():
            expected += inside.sum() / p.size * abs(y[inside].mean() - p[inside].mean())
    assert metrics.expected_calibration_error(y, p) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_intervals_match_a_loop_over_resamples():
    y, p = _sample(40, 3)
    n_boot, seed = 300, 5
    intervals = metrics.bootstrap_intervals(y, p, n_boot=n_boot, seed=seed)
    # Reference: the same index arrays, each resample scored by the plain metric functions.
    index = np.random.default_rng(seed).integers(0, y.size, size=(n_boot, y.size))
    values = {name: [] for name in metrics.BOOTSTRAP_METRICS}
    for i in index:
        values["log_loss"].append(metrics.log_loss(y[i], p[i]))
        values["accuracy"].append(metrics.accuracy(y[i], p[i]))
        values["brier"].append(metrics.brier(y[i], p[i]))
        values["roc_auc"].append(metrics.roc_auc(y[i], p[i]))
    assert set(intervals) == set(metrics.BOOTSTRAP_METRICS)
    for name, sample in values.items():
        sample = np.array(sample)
        sample = sample[~np.isnan(sample)]  # one-class resamples have no AUC
        np.testing.assert_allclose(intervals[name], np.quantile(sample, [0.025, 0.975]),
                                   rtol=1e-12, err_msg=name)


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_more_patients():
    widths = []
    for n in (60, 1600):
        y, p = _sample(n, 4)
        intervals = metrics.bootstrap_intervals(y, p, seed=1)
        point = metrics.summary(y, p)
        for name, (low, high) in intervals.items():
            assert low <= point[name] <= high, (n, name)
        widths.append({name: high - low for name, (low, high) in intervals.items()})
    for name in metrics.BOOTSTRAP_METRICS:
        assert widths[1][name] < 0.5 * widths[0][name], name  # ~ 1/sqrt(n): about 0.19


def test_bootstrap_intervals_are_reproducible_with_a_seed():
    y, p = _sample(100, 6)
    first = metrics.bootstrap_intervals(y, p, n_boot=500, seed=7)
    assert metrics.bootstrap_intervals(y, p, n_boot=500, seed=7) == first
    assert metrics.bootstrap_intervals(y, p, n_boot=500, seed=8) != first
    # A wider level gives a wider interval from the same resamples.
    wide = metrics.bootstrap_intervals(y, p, n_boot=500, seed=7, level=0.99)
    assert wide["log_loss"][0] <= first["log_loss"][0] <= first["log_loss"][1] \
        <= wide["log_loss"][1]


def test_bootstrap_skips_one_class_resamples_for_the_auc():
    # Every resample holding both classes ranks the positive first: AUC 1, however many are
    # one class only.
    intervals = metrics.bootstrap_intervals([1, 0, 0], [0.9, 0.1, 0.2], n_boot=200)
    assert intervals["roc_auc"] == (1.0, 1.0)
    one_class = metrics.bootstrap_intervals([1, 1], [0.9, 0.1], n_boot=50)
    assert all(math.isnan(v) for v in one_class["roc_auc"])
    assert one_class["accuracy"] == (0.0, 1.0)
    with pytest.raises(KdsbError, match="expected at least one bootstrap resample, received 0"):
        metrics.bootstrap_intervals([1, 0], [0.9, 0.1], n_boot=0)
    # One patient: no interval at all, not a zero-width one.
    single = metrics.bootstrap_intervals([1], [0.3], n_boot=50)
    assert all(math.isnan(v) for interval in single.values() for v in interval)
    with pytest.raises(KdsbError, match=r"expected an interval level in \(0, 1\), received 1"):
        metrics.bootstrap_intervals([1, 0], [0.9, 0.1], level=1)


def _halfway(upper: float, lower: float) -> float:
    """The probability halfway between two in log-odds."""
    return float(expit((logit(upper) + logit(lower)) / 2))


def test_pick_threshold_by_hand():
    # Youden's J ties at 0.7 and 0.35: the higher cut wins, placed halfway to the next lower
    # score (0.6). F1 is best at 0.35 (then 0.3 below it).
    assert metrics.pick_threshold(HAND_Y, HAND_P, "youden") == pytest.approx(_halfway(0.7, 0.6))
    assert metrics.pick_threshold(HAND_Y, HAND_P, "f1") == pytest.approx(_halfway(0.35, 0.3))
    assert metrics.pick_threshold([0, 1], [0.2, 0.8], "youden") == pytest.approx(0.5)
    # Every patient called positive: the lowest score itself.
    assert metrics.pick_threshold([1, 1, 0], [0.9, 0.3, 0.4], "f1") == 0.3  # F1 0.8
    with pytest.raises(KdsbError, match="expected a threshold rule among youden, f1, received"):
        metrics.pick_threshold(HAND_Y, HAND_P, "accuracy")
    with pytest.raises(KdsbError, match="expected both classes to pick a threshold, received 0 "
                                        "positive and 2 negative"):
        metrics.pick_threshold([0, 0], [0.2, 0.8], "f1")


def test_a_threshold_picked_on_unclipped_scores_holds_for_clipped_predictions():
    """Found in review: out-of-fold probabilities are not clipped, `kdsb predict`'s are (0.005,
    0.995); a threshold on the lowest validation positive (0.997) called no test patient
    positive, sensitivity 0 for a model of AUC 1."""
    picked = metrics.pick_threshold([0, 0, 1, 1], [0.00012, 0.001, 0.997, 0.9998], "youden")
    c = metrics.confusion_at([0, 0, 1, 1], [0.005, 0.005, 0.995, 0.995], picked)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 0, 2, 0)


def test_a_threshold_separates_scores_within_1e_15_of_0_or_1_and_neighbouring_floats():
    """Found in review: the scores were clipped to [1e-15, 1 - 1e-15] before their midpoint was
    taken, so the cut the rule chose fell on the wrong side of scores nearer 0 or 1."""
    cases = [([1, 0, 1, 0], [0.9, 0.1, 1e-20, 1e-30], "f1", (2, 1, 1, 0)),
             ([1, 0], [1.0, 0.9999999999999996], "youden", (1, 0, 1, 0)),
             ([1, 0], [0.5, np.nextafter(0.5, 0)], "youden", (1, 0, 1, 0))]
    for y, p, rule, cells in cases:
        c = metrics.confusion_at(y, p, metrics.pick_threshold(y, p, rule))
        assert (c.tp, c.fp, c.tn, c.fn) == cells, p


def test_a_threshold_next_to_a_score_of_exactly_0_or_1_lies_halfway_in_probability():
    """Found in review: a next lower score of exactly 0 gave a cut of about 1e-155 (its logit
    clipped to the smallest float's), so a negative at 1e-9 elsewhere was called positive."""
    assert metrics.pick_threshold([0, 0, 1, 1], [0.0, 0.0, 0.02, 0.4], "youden") == 0.01
    # Halfway in probability: an evaluated 0.999 falls on the positives' side (review).
    assert metrics.pick_threshold([0, 0, 1, 1], [0.1, 0.6, 1.0, 1.0], "youden") == 0.8


def test_pick_threshold_maximises_the_rule_over_distinct_scores():
    y, p = _sample(200, 9)

    def youden(c):
        return c.sensitivity + c.specificity - 1

    def f1(c):
        return 2 * c.tp / (2 * c.tp + c.fp + c.fn)

    scores = np.unique(p)
    for rule, objective in (("youden", youden), ("f1", f1)):
        by_score = {t: objective(metrics.confusion_at(y, p, t)) for t in scores}
        best = max(by_score.values())
        expected = max(t for t, value in by_score.items() if value == pytest.approx(best))
        below = scores[scores < expected].max()
        picked = metrics.pick_threshold(y, p, rule)
        assert below < picked < expected, rule  # the same calls on these patients
        assert picked == pytest.approx(_halfway(expected, below)), rule


def test_confusion_at_counts_and_rates():
    c = metrics.confusion_at(HAND_Y, HAND_P, 0.35)  # p >= threshold is positive
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 1, 2, 0)
    assert (c.sensitivity, c.specificity, c.ppv, c.npv) == pytest.approx((1, 2 / 3, 3 / 4, 1))
    c = metrics.confusion_at(HAND_Y, HAND_P, 0.65)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 0, 3, 1)
    assert c.as_dict() == pytest.approx({"threshold": 0.65, "tp": 2, "fp": 0, "tn": 3, "fn": 1,
                                         "sensitivity": 2 / 3, "specificity": 1.0, "ppv": 1.0,
                                         "npv": 3 / 4})
    # NumPy reference on random data.
    y, p = _sample(150, 10)
    c = metrics.confusion_at(y, p, 0.5)
    assert c.tp == np.sum((p >= 0.5) & (y == 1)) and c.tn == np.sum((p < 0.5) & (y == 0))
    assert c.tp + c.fp + c.tn + c.fn == 150
    assert c.tp + c.tn == pytest.approx(150 * metrics.accuracy(y, p, 0.5))
    # Undefined rates are NaN: no positive calls, no positive patients.
    none_called = metrics.confusion_at([1, 0], [0.2, 0.1], 0.9)
    assert math.isnan(none_called.ppv) and none_called.sensitivity == 0.0
    negatives_only = metrics.confusion_at([0, 0], [0.2, 0.7], 0.5)
    assert math.isnan(negatives_only.sensitivity) and negatives_only.npv == 1.0
    with pytest.raises(KdsbError, match="expected a finite threshold, received nan"):
        metrics.confusion_at([1, 0], [0.2, 0.1], math.nan)
