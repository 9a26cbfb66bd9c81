"""How far apart a model's predictions lie over an epoch: max − min of p(cancer).

A classifier stuck on the base-rate plateau gives every patient the same probability (its
encoder's pooled features died), so its validation spread sits near 0 while a model that ranks
patients spreads its answers over most of [0, 1]. Logged as `prediction_spread` (training) and
`val_prediction_spread`; `kdsb.training.runs.fit` can give up a run whose validation spread
stays under a floor.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdsb")
class PredictionSpread(keras.metrics.Metric):
    """max − min of the predictions seen since the last reset (0 before any)."""

    def __init__(self, name: str = "prediction_spread", **kwargs):
        super().__init__(name=name, **kwargs)
        # Every worker of a multi-worker run scores the same validation patients: the first
        # replica's extremes are the run's.
        self.highest = self.add_variable((), initializer=keras.initializers.Constant(-1.0),
                                         name="highest", aggregation="only_first_replica")
        self.lowest = self.add_variable((), initializer=keras.initializers.Constant(2.0),
                                        name="lowest", aggregation="only_first_replica")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(y_pred, self.dtype)
        self.highest.assign(ops.maximum(self.highest, ops.max(y_pred)))
        self.lowest.assign(ops.minimum(self.lowest, ops.min(y_pred)))

    def result(self):
        return ops.maximum(self.highest - self.lowest, 0.0)

    def reset_state(self):
        self.highest.assign(-1.0)
        self.lowest.assign(2.0)
