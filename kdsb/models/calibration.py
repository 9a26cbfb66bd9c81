"""Probability calibration that travels inside a saved classifier (Platt or temperature scaling).

A classifier trained on a few dozen patients is often over- or under-confident, and a model
trained with balanced class weights predicts as if half the patients had cancer. Calibration maps
its probability p to

    p' = sigmoid(slope · logit(p) + intercept),   logit(p) = log p − log(1 − p),

fitted by maximum likelihood on predictions the model did not train on (out-of-fold or
validation patients): "platt" fits slope and intercept, "temperature" the slope alone
(slope = 1 / T) and "none" keeps p. As in Platt (1999), the targets are not 0 and 1 but
1 / (N₋ + 2) and (N₊ + 1) / (N₊ + 2): on a few perfectly separated validation patients the
plain maximum-likelihood slope runs off to infinity (every prediction 0 or 1, unearned), while
these targets keep it finite and the probabilities as sure as the patient counts allow.
The map is monotone, so the AUC is unchanged; it moves
log loss, Brier score and calibration error.

The map is a registered Keras layer, `ProbabilityCalibration`, appended to the classifier's
output (`with_calibration`), so `classifier.keras` carries it (the map needs no side file)
and every tool that loads the model (predict, explain) applies it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops
from scipy.optimize import minimize
from scipy.special import expit

from kdsb.errors import KdsbError
from kdsb.models.output_layers import with_output_layer, without_output_layer

logger = logging.getLogger(__name__)

METHODS = ("platt", "temperature", "none")
CALIBRATION_LAYER = "calibration"
# Probabilities are clipped to [EPSILON, 1 − EPSILON] before the logit: float32 sigmoids reach
# exactly 1.0, whose logit is infinite. 2⁻²³ (logit ≈ −15.9) because 1 − 2⁻²³ is exact in float32,
# so the saved layer (float32) and `Calibration.apply` (float64) clip a p of 1.0 alike.
EPSILON = 2.0**-23
# Bounds of the fitted slope: a slope ≤ 0 would reverse (or erase) the model's ranking.
SLOPE_BOUNDS = (1e-3, 1e3)
# Fewest patients a map is fitted on. Two validation patients 0.006 apart gave a slope of 57 (a
# user's check): the map fits them and throws every other patient to 0.09 or 0.67.
MIN_PATIENTS = 10


@dataclass(frozen=True)
class Calibration:
    """The fitted map p' = sigmoid(slope · logit(p) + intercept)."""

    slope: float = 1.0
    intercept: float = 0.0

    def apply(self, p) -> np.ndarray:
        """Calibrated probabilities of `p` (NumPy, float64); the identity map keeps them as they
        are (not through logit and back, which may move a value by its last bit)."""
        if self.slope == 1.0 and self.intercept == 0.0:
            return np.asarray(p, dtype=np.float64)
        return sigmoid(self.slope * logit(p) + self.intercept)


IDENTITY = Calibration()


def logit(p) -> np.ndarray:
    """log p − log(1 − p) of probabilities clipped to [EPSILON, 1 − EPSILON] (float64)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1.0 - EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    """1 / (1 + e^−z) (float64), accurate in its tails (found in review: the former tanh form
    gave exactly 0 below z ≈ −38, and calibrated out-of-fold predictions of exactly 0)."""
    return expit(np.asarray(z, dtype=np.float64))


def method_for(patients: int, method: str, one_class: bool = False) -> str:
    """The calibration method to fit when the fewest patients any of a run's maps is fitted on
    number `patients`: `method`, or "none" (with a warning) under `MIN_PATIENTS`, or when those
    patients are `one_class` (a map fitted on one class would only pull every probability toward
    it)."""
    if method == "none" or (patients >= MIN_PATIENTS and not one_class):
        return method
    if one_class:
        logger.warning("the %d patient(s) a %s calibration map would be fitted on are all of one "
                       "class: no map is fitted, the model's probabilities are kept as they are",
                       patients, method)
    else:
        logger.warning("%d patient(s) are too few to fit a %s calibration map on (at least %d): "
                       "no map is fitted, the model's probabilities are kept as they are",
                       patients, method, MIN_PATIENTS)
    return "none"


def fit_calibration(y, p, method: str = "platt") -> Calibration:
    """Fit the calibration map on labels `y` (0/1) and uncalibrated probabilities `p`.

    Maximum likelihood (mean log loss, L-BFGS with analytic gradients). With a single class in
    `y` the slope cannot be identified: the identity is returned for "temperature", and for
    "platt" the slope is kept at 1 while the intercept moves toward the observed rate. (How
    many patients a map needs is `method_for`'s rule.)

    Raises:
        KdsbError: an unknown method, or `y` and `p` of different lengths or out of range.
    """
    if method not in METHODS:
        raise KdsbError(f"expected a calibration method in {METHODS}, received {method!r}")
    y = np.asarray(y, dtype=np.float64).ravel()
    z = logit(p).ravel()
    if y.shape != z.shape or y.size == 0:
        raise KdsbError(
            f"expected as many labels as probabilities (at least one), received {y.size} and "
            f"{z.size}"
        )
    if not np.isin(y, (0.0, 1.0)).all():
        raise KdsbError("expected labels 0 or 1 for calibration")
    raw = np.asarray(p, dtype=np.float64).ravel()
    bad = ~((raw >= 0.0) & (raw <= 1.0))  # NaN included
    if bad.any():
        raise KdsbError(f"expected probabilities in [0, 1] for calibration, received "
                        f"{int(bad.sum())} other value(s), e.g. {raw[bad][0]!r}")
    one_class = y.min() == y.max()
    if method == "none" or (method == "temperature" and one_class):
        return IDENTITY
    positives = y.sum()
    negatives = y.size - positives
    target = np.where(y == 1.0, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        slope, intercept = (params[0], params[1]) if method == "platt" else (params[0], 0.0)
        if one_class:
            slope = 1.0
        s = slope * z + intercept
        # Mean of log(1 + e^s) − t·s, and its gradient (q − t) times ds/dparams.
        value = np.mean(np.logaddexp(0.0, s) - target * s)
        residual = sigmoid(s) - target
        grad_slope = 0.0 if one_class else np.mean(residual * z)
        grads = [grad_slope, np.mean(residual)] if method == "platt" else [grad_slope]
        return float(value), np.asarray(grads)

    start = np.array([1.0, 0.0] if method == "platt" else [1.0])
    bounds = [SLOPE_BOUNDS, (None, None)] if method == "platt" else [SLOPE_BOUNDS]
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    if not result.success:  # convex and smoothed: not seen, but a map must not pass unnoticed
        logger.warning("the %s calibration fit on %d patients stopped before converging (%s); "
                       "its map is kept as it stood", method, y.size, result.message)
    slope = 1.0 if one_class else float(result.x[0])
    intercept = float(result.x[1]) if method == "platt" else 0.0
    return Calibration(slope=slope, intercept=intercept)


def warn_if_flattening(calibration: Calibration, patients: int, method: str) -> None:
    """Warn when the map saved with a model has the least slope allowed (`SLOPE_BOUNDS`): the
    predictions it was fitted on rank the patients at or below chance, and the calibrated model
    answers nearly one probability for every patient (found by a user's trial: predict then
    said the scans were unlike the training ones)."""
    if calibration.slope <= SLOPE_BOUNDS[0] * (1.0 + 1e-6):
        logger.warning("the %s calibration map fitted on %d patients has the least slope "
                       "allowed (%g): their predictions rank them at or below chance, so the "
                       "saved model answers about %.3f for every patient (it has not learned "
                       "what the labels say)", method, patients, SLOPE_BOUNDS[0],
                       float(sigmoid(calibration.intercept)))


@keras.saving.register_keras_serializable(package="kdsb")
class ProbabilityCalibration(keras.layers.Layer):
    """p → sigmoid(slope · logit(p) + intercept), on probabilities of any shape (float32).

    Args:
        slope: multiplies the logit (1 / temperature), > 0.
        intercept: added to the scaled logit.
        **kwargs: standard Keras layer arguments.
    """

    def __init__(self, slope: float = 1.0, intercept: float = 0.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not slope > 0:
            raise ValueError(f"ProbabilityCalibration: expected slope > 0, received {slope!r}")
        self.slope = float(slope)
        self.intercept = float(intercept)

    def call(self, inputs):
        p = ops.cast(inputs, "float32")
        if self.slope == 1.0 and self.intercept == 0.0:
            # The identity (`--calibration none`) keeps p as `Calibration.apply` does (found in
            # review: clipped, a sure 0 or 1 came out 1.2e-7 from it in predict and not in
            # explain's report).
            return p
        p = ops.clip(p, EPSILON, 1.0 - EPSILON)
        z = ops.log(p) - ops.log1p(-p)
        return ops.sigmoid(self.slope * z + self.intercept)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"slope": self.slope, "intercept": self.intercept})
        return config


def without_calibration(model: keras.Model) -> keras.Model:
    """The model up to (not including) its calibration layer; `model` itself if it has none."""
    return without_output_layer(model, CALIBRATION_LAYER)


def with_calibration(model: keras.Model, calibration: Calibration) -> keras.Model:
    """A model sharing `model`'s layers whose output is calibrated (an earlier one replaced);
    the record of how it reads a volume (`kdsb.models.input_record`), if it has one, stays
    after the map."""
    # Here, not at the top: both modules are imported by the Keras hook, each half initialised
    # while the other runs.
    from kdsb.models.input_record import input_record_of, with_input_record, without_input_record

    record = input_record_of(model)
    layer = ProbabilityCalibration(
        slope=calibration.slope, intercept=calibration.intercept, name=CALIBRATION_LAYER
    )
    calibrated = with_output_layer(without_calibration(without_input_record(model)), layer)
    return calibrated if record is None else with_input_record(calibrated, record)


def calibration_of(model: keras.Model) -> Calibration | None:
    """The calibration a model applies, or None for a model without the layer."""
    if CALIBRATION_LAYER not in {layer.name for layer in model.layers}:
        return None
    layer = model.get_layer(CALIBRATION_LAYER)
    return Calibration(slope=layer.slope, intercept=layer.intercept)
