"""Tests of kdsb.models.calibration: the fit against known maps, the layer against NumPy."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kdsb.errors import KdsbError
from kdsb.evaluation import metrics
from kdsb.models.calibration import (
    IDENTITY,
    Calibration,
    calibration_of,
    fit_calibration,
    with_calibration,
    without_calibration,
)


def _overconfident(n=4000, seed=0):
    """Labels drawn from true probabilities q, and a model reporting sigmoid(3·logit(q) + 1)."""
    rng = np.random.default_rng(seed)
    logit_q = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit_q))).astype(float)
    p = 1 / (1 + np.exp(-(3.0 * logit_q + 1.0)))
    return y, p


def test_platt_recovers_the_inverse_map_and_lowers_the_log_loss():
    y, p = _overconfident()
    calibration = fit_calibration(y, p, "platt")
    # The true map back is logit q = (logit p − 1) / 3: slope 1/3, intercept −1/3.
    assert calibration.slope == pytest.approx(1 / 3, abs=0.03)
    assert calibration.intercept == pytest.approx(-1 / 3, abs=0.08)
    calibrated = calibration.apply(p)
    assert metrics.log_loss(y, calibrated) < metrics.log_loss(y, p) - 0.1
    assert metrics.expected_calibration_error(y, calibrated) < 0.03
    assert metrics.roc_auc(y, calibrated) == pytest.approx(metrics.roc_auc(y, p))


def test_temperature_fits_the_slope_only_and_none_is_the_identity():
    y, p = _overconfident()
    temperature = fit_calibration(y, p, "temperature")
    assert temperature.intercept == 0.0 and 0.2 < temperature.slope < 0.5
    assert metrics.log_loss(y, temperature.apply(p)) < metrics.log_loss(y, p)
    assert fit_calibration(y, p, "none") == IDENTITY
    # One class: no slope to identify.
    assert fit_calibration(np.ones(5), np.full(5, 0.3), "temperature") == IDENTITY
    one = fit_calibration(np.ones(10), np.full(10, 0.3), "platt")
    assert one.slope == 1.0 and one.apply(0.3) == pytest.approx(11 / 12)  # Platt's target


def test_too_few_patients_fit_no_map(caplog):
    """Found by a user's check: two validation patients 0.006 apart gave a slope of 57."""
    import logging

    from kdsb.models.calibration import MIN_PATIENTS, method_for

    assert fit_calibration([1, 0], [0.4598, 0.4538], "platt").slope > 50  # what they would give
    with caplog.at_level(logging.WARNING, logger="kdsb.models.calibration"):
        assert method_for(MIN_PATIENTS, "platt") == "platt"
        assert method_for(1, "none") == "none"
        assert caplog.text == ""
        assert method_for(2, "temperature") == "none"
    assert "2 patient(s) are too few to fit a temperature calibration map on (at least 10)" \
        in caplog.text


def test_perfectly_separated_patients_get_finite_unearned_certainty_no_more():
    """Plain maximum likelihood would push the slope to its bound (p' = 0 or 1)."""
    y = np.array([0] * 8 + [1] * 8)
    p = np.r_[np.linspace(0.1, 0.4, 8), np.linspace(0.6, 0.9, 8)]
    calibrated = fit_calibration(y, p, "platt").apply(p)
    calibration = fit_calibration(y, p, "platt")
    assert calibration.slope < 3.0  # plain maximum likelihood: the bound, 1000
    assert 0.01 < calibrated.min() and calibrated.max() < 0.99  # off the clip bounds
    # Stationarity with Platt's targets: the mean prediction equals the mean target.
    assert calibrated.mean() == pytest.approx(0.5, abs=1e-4)


def test_bad_input_is_refused():
    with pytest.raises(KdsbError, match="calibration method"):
        fit_calibration([0, 1], [0.2, 0.8], "isotonic")
    with pytest.raises(KdsbError, match="as many labels"):
        fit_calibration([0, 1, 1], [0.2, 0.8], "platt")
    # Found in review: a NaN gave the identity map, 1.5 was clipped, both silently.
    for bad in (np.nan, 1.5, -0.1):
        with pytest.raises(KdsbError, match=r"expected probabilities in \[0, 1\] for "
                                            r"calibration, received 1 other value"):
            fit_calibration([0, 1, 0], [0.5, bad, 0.2], "platt")


def test_a_fit_that_stops_before_converging_is_a_warning(monkeypatch, caplog):
    """Found in review: L-BFGS-B's success flag was never read."""
    from kdsb.models import calibration

    y, p = _overconfident(400)
    real = calibration.minimize
    monkeypatch.setattr(calibration, "minimize",
                        lambda *args, **kwargs: real(*args, options={"maxiter": 1}, **kwargs))
    with caplog.at_level(logging.WARNING, logger="kdsb.models.calibration"):
        fit_calibration(y, p, "platt")
    assert "the platt calibration fit on 400 patients stopped before converging" in caplog.text
    caplog.clear()
    monkeypatch.setattr(calibration, "minimize", real)
    with caplog.at_level(logging.WARNING, logger="kdsb.models.calibration"):
        fit_calibration(y, p, "platt")
    assert caplog.text == ""


def test_the_layer_matches_numpy_and_travels_in_the_saved_model(tmp_path):
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="p")(inputs))
    assert calibration_of(model) is None and without_calibration(model) is model
    calibration = Calibration(slope=0.4, intercept=-0.7)
    calibrated = with_calibration(model, calibration)
    x = np.random.default_rng(1).normal(size=(6, 3)).astype("float32") * 5
    raw = np.asarray(model(x))[:, 0]
    np.testing.assert_allclose(np.asarray(calibrated(x))[:, 0], calibration.apply(raw),
                               rtol=1e-4, atol=1e-6)
    # Also at the clip bounds: a sure 0 or 1 is clipped alike in float32 and float64 (found in
    # review: the layer gave 0.99529 where metrics.json said 0.99556).
    steep = Calibration(slope=0.34, intercept=0.0)
    layer = with_calibration(model, steep).get_layer("calibration")
    edges = np.array([[0.0], [1.0]], dtype="float32")
    np.testing.assert_allclose(np.asarray(layer(edges))[:, 0], steep.apply(edges[:, 0]),
                               rtol=1e-6)
    path = tmp_path / "m.keras"
    calibrated.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    assert calibration_of(loaded) == calibration
    # Calibrating again replaces the map instead of stacking a second one; the identity
    # keeps every p as it is, a sure 0 or 1 too, as `Calibration.apply` does.
    again = with_calibration(loaded, IDENTITY)
    np.testing.assert_array_equal(np.asarray(again(x))[:, 0], raw)
    identity = again.get_layer("calibration")
    np.testing.assert_array_equal(np.asarray(identity(edges))[:, 0], IDENTITY.apply(edges[:, 0]))
    assert sum(layer.name == "calibration" for layer in again.layers) == 1


def test_the_sigmoid_is_accurate_in_its_tails():
    """Found in review: the tanh form gave exactly 0 below z ≈ -38 (calibrated out-of-fold
    predictions of exactly 0) and lost relative accuracy before that."""
    from kdsb.models.calibration import sigmoid

    z = np.array([-700.0, -40.0, -36.0, 0.0, 36.0])
    exact = np.exp(z) / (1.0 + np.exp(z))
    np.testing.assert_allclose(sigmoid(z), exact, rtol=1e-12)
    assert (sigmoid(z[:3]) > 0).all()


def test_a_map_that_flattens_every_prediction_is_warned_of(caplog):
    """Found by a user's trial: predictions ranked below chance gave a Platt slope at its lower
    bound, and the saved models answered 0.468 for everyone without a word at training."""
    import logging

    from kdsb.models.calibration import fit_calibration, warn_if_flattening

    y = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0])
    p = np.array([0.1, 0.2, 0.15, 0.8, 0.9, 0.85, 0.3, 0.7, 0.25, 0.75, 0.2, 0.95])  # reversed
    flat = fit_calibration(y, p, "platt")
    with caplog.at_level(logging.WARNING, logger="kdsb.models.calibration"):
        warn_if_flattening(flat, y.size, "platt")
    assert "has the least slope allowed (0.001)" in caplog.text
    assert "answers about 0.500 for every patient" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdsb.models.calibration"):
        warn_if_flattening(fit_calibration(y, 1.0 - p, "platt"), y.size, "platt")
    assert caplog.text == ""
