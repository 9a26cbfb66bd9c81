"""Smoke test of `kdsb demo --fast`: every stage runs and leaves its files (learning is checked
by the full `make demo`, too slow for the unit suite)."""

from __future__ import annotations

import json

import pytest

from kdsb.cli import main
from kdsb.io.tables import read_labels, read_predictions


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fast_demo_runs_every_stage(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", str(work), "--fast", "--patients", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("== synth", "== preprocess", "== train-gmcae", "== train-classifier",
                  "== predict"):
        assert stage in out
    assert "test (a separate phantom cohort)" in out and "base-rate log loss" in out

    test_labels = read_labels(work / "test_cohort" / "labels.csv")
    predictions = read_predictions(work / "test_predictions.csv")
    assert sorted(predictions) == sorted(test_labels) and len(predictions) == 2
    assert all(0.005 <= p <= 0.995 for p in predictions.values())
    result = json.loads((work / "runs" / "classifier" / "metrics.json").read_text())
    assert (result["n_train"], result["n_val"]) == (2, 2)
    for name in ("roc.png", "calibration.png"):
        assert (work / "plots" / name).stat().st_size > 0
    assert (work / "runs" / "gmcae" / "gmcae.keras").is_file()

    # A second run reuses every stage's results instead of failing on existing folders; a synth
    # killed before labels.csv (its completion marker) is redone, and a finished classifier run
    # is not trained again.
    (work / "test_cohort" / "labels.csv").unlink()
    metrics_written = (work / "runs" / "classifier" / "metrics.json").stat().st_mtime_ns
    assert main(["demo", str(work), "--fast", "--patients", "4", "--seed", "1"]) == 0
    assert read_labels(work / "test_cohort" / "labels.csv") == test_labels
    assert (work / "runs" / "classifier" / "metrics.json").stat().st_mtime_ns == metrics_written
    assert read_predictions(work / "test_predictions.csv") == predictions
