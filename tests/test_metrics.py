"""Tests of kdsb.evaluation.metrics against hand computations and brute-force NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest

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


def test_summary_keys_and_validation():
    scores = metrics.summary([1, 0], [0.8, 0.3])
    assert set(scores) == {"log_loss", "roc_auc", "accuracy", "base_rate_log_loss", "n",
                           "n_positive"}
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
