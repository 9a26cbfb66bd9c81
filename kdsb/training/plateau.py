"""Did a classifier learn anything? The base-rate plateau's tests, one owner for the rule
`kdsb.training.model_fitting` restarts a model by (`--restarts`) and
`kdsb.training.cross_validation` warns of a fold model by.

A model stuck on the plateau gives every patient nearly the base rate (its encoder's pooled
features died) or only wobbles around it; `metrics.prediction_spread` tells the first, and
`explained_fraction` the second, forgiving the logit offset balanced class weights give.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from kdsb.evaluation import metrics

logger = logging.getLogger(__name__)

# Training gives up once this logged spread (`kdsb.models.spread`) stayed under
# `metrics.CONSTANT_SPREAD` for --patience epochs.
GIVE_UP_MONITOR = "val_prediction_spread"
# A model whose shifted validation predictions explain less than this fraction of the
# labels' entropy (`explained_fraction`) learned nothing: it is trained again (--restarts).
# On the benchmark's phantom cohorts (24 and 96 patients) the folds stopped on the plateau
# explain 0.002-0.028 of it (spread 0.002-0.09), confidently wrong ones below 0, the others
# 0.42-1.00 (benchmarks/README.md, "Restarts on the plateau").
LEARNED_FRACTION = 0.05
SHIFT_BOUND = 20.0  # the largest logit shift `explained_fraction` tries


def warn_if_constant(p: np.ndarray, what: str) -> None:
    """Warn when a model gives (nearly) every held-out patient the same probability: its
    training never left the plateau at the base rate, and it adds nothing to the ensemble."""
    spread = metrics.prediction_spread(p)
    if spread < metrics.CONSTANT_SPREAD:
        logger.warning("%s: every held-out prediction lies within %.1e of %.3f: the model did "
                       "not learn (try another --seed or --lr)", what, spread, float(np.mean(p)))


def explained_fraction(y, p) -> float:
    """The fraction of the labels' entropy that predictions `p` explain, forgiving them a shift:
    1 − log loss(sigmoid(logit(p) + b)) / log loss(base rate), with the shift b that fits `y`
    best (McFadden's pseudo-R² of a logistic fit of `y` on logit(p) with its slope held at 1).

    The shift forgives the offset balanced class weights give every prediction; the slope is
    not refitted, so predictions that only wobble around the plateau (spread 0.01) stay at ~0
    however they happen to rank a few patients. NaN with one class.
    """
    from scipy.optimize import minimize_scalar

    from kdsb.models.calibration import logit, sigmoid

    y = np.asarray(y, dtype=np.float64)
    if y.min() == y.max():
        return math.nan
    z = logit(p)
    shifted = minimize_scalar(lambda b: metrics.log_loss(y, sigmoid(z + b)),
                              bounds=(-SHIFT_BOUND, SHIFT_BOUND), method="bounded")
    return 1.0 - float(shifted.fun) / metrics.base_rate_log_loss(y)
