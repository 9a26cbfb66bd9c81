"""benchmarks/classifier.py: head option overrides from the command line and their run folders."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "classifier.py"


@pytest.fixture
def bench(monkeypatch):
    pytest.importorskip("tensorflow")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds the repository to it
    spec = importlib.util.spec_from_file_location("classifier_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "classifier_benchmark", module)
    spec.loader.exec_module(module)
    return module


def test_overrides_are_python_literals_or_text(bench):
    assert bench.parse_override("freeze_blocks=2") == ("freeze_blocks", 2)
    assert bench.parse_override("lr=3e-4") == ("lr", 3e-4)
    assert bench.parse_override("levels=1,2") == ("levels", (1, 2))
    assert bench.parse_override("calibration=temperature") == ("calibration", "temperature")
    for bad in ("freeze_blocks", "=2", "not a key=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
            bench.parse_override(bad)


def test_overridden_runs_get_folders_of_their_own(bench):
    assert bench.run_name("spp", 24, {}) == "spp_24"
    # Sorted by key: the same overrides in any order reuse one folder.
    assert bench.run_name("mil", 96, {"lr": 3e-4, "dropout": 0.1}) == "mil_96_dropout=0.1_lr=0.0003"
    # Every head's options are valid ClassifierOptions fields.
    fields = set(bench.ClassifierOptions.__dataclass_fields__)
    for options in bench.HEADS.values():
        assert set(options) <= fields


def test_thickest_tissue_is_the_radius_of_the_thickest_ball(bench, tmp_path):
    """A 12 mm ball and a 2 mm-thick vessel inside the lung mask: the ball's radius; tissue
    outside the mask and lung air do not count."""
    from kdsb.io import volumes

    spacing = (2.0, 1.0, 1.0)
    z, y, x = np.ogrid[:40, :80, :80]
    hu = np.full((40, 80, 80), -850, dtype=np.int16)
    ball = ((z - 20) * 2.0) ** 2 + (y - 40.0) ** 2 + (x - 30.0) ** 2 <= 12.0**2
    hu[ball] = 30
    hu[:, 10:12, 60:62] = 40  # a vessel
    hu[:, :, 75:] = 50  # the chest wall, outside the mask
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[:, :, :75] = 1
    volumes.write_volume(volumes.volume_path(tmp_path, "p"), hu, mask, spacing, (0.0, 0.0, 0.0))
    thickness = bench.thickest_tissue_mm(volumes.volume_path(tmp_path, "p"))
    assert 11.0 <= thickness <= 13.0
    hu[ball] = -850
    volumes.write_volume(volumes.volume_path(tmp_path, "q"), hu, mask, spacing, (0.0, 0.0, 0.0))
    assert bench.thickest_tissue_mm(volumes.volume_path(tmp_path, "q")) <= 1.5


def test_the_reference_predicts_out_of_fold_and_held_out(bench):
    """Every training patient gets one out-of-fold prediction, from a model fitted on the other
    folds of the heads' `stratified_folds`; held-out patients (who may share the training
    patients' ids) from a model fitted on all of them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    labels = {f"p{i:02d}": i % 2 for i in range(16)}
    train = {i: 10.0 + 4.0 * y + rng.normal(0.0, 2.0) for i, y in labels.items()}
    test = {"p00": 9.0, "p01": 25.0, "p02": 11.0, "p03": 19.0}  # ids the training cohort has
    oof, held_out = bench.reference_predictions(train, test, labels, folds=4, seed=3)

    def fit(ids):
        model = make_pipeline(StandardScaler(), LogisticRegression())
        return model.fit([[train[i]] for i in ids], [labels[i] for i in ids])

    folds = bench.stratified_folds(sorted(labels), labels, 4, seed=3)
    for fold in folds:
        model = fit([i for i in labels if i not in fold])
        expected = model.predict_proba([[train[i]] for i in fold])[:, 1]
        assert [oof[i] for i in fold] == pytest.approx(expected.tolist())
    assert sorted(oof) == sorted(labels)
    model = fit(sorted(labels))
    assert [held_out[i] for i in sorted(test)] == pytest.approx(
        model.predict_proba([[test[i]] for i in sorted(test)])[:, 1].tolist())
    assert held_out["p01"] > held_out["p03"] > held_out["p02"] > held_out["p00"]


def test_a_row_scores_the_predictions_or_keeps_the_runs_own_figures(bench):
    labels = {"a": 0, "b": 1, "c": 0, "d": 1}
    oof = {"a": 0.2, "b": 0.9, "c": 0.4, "d": 0.3}
    test = {"t0": 0, "t1": 1}
    row = bench.scores_row(4, bench.REFERENCE, 0, oof, labels, {"t0": 0.1, "t1": 0.8}, test, 2.0)
    assert row["oof_auc"] == 0.75 and row["test_auc"] == 1.0 and row["cpu_s"] == 2.0
    y, p = np.array([0, 1, 0, 1]), np.array([0.2, 0.9, 0.4, 0.3])
    assert row["oof_log_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert row["test_log_loss"] == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    run = {"log_loss": 0.5, "ece": 0.1, "roc_auc": 0.6}  # a head run's metrics.json figures
    row = bench.scores_row(4, "mil", 0, oof, labels, {"t0": 0.1, "t1": 0.8}, test, 2.0, run)
    assert (row["oof_log_loss"], row["oof_ece"], row["oof_auc"]) == (0.5, 0.1, 0.6)


def test_heads_with_no_value_print_the_reference_alone(bench, monkeypatch, tmp_path, capsys):
    calls = []

    def fake_run_seed(work, seed, sizes, heads, folds, test_size, workers, base, overrides,
                      reference):
        calls.append((heads, reference))
        return [{"size": n, "head": bench.REFERENCE, "seed": seed, "cpu_s": 1.0,
                 **{key: 0.5 for key in ("oof_auc", "oof_log_loss", "oof_ece",
                                         "oof_ece_if_calibrated", "test_log_loss", "test_auc",
                                         "test_ece", "test_ece_if_calibrated")}} for n in sizes]

    monkeypatch.setattr(bench, "run_seed", fake_run_seed)
    assert bench.main([str(tmp_path), "--heads", "--sizes", "24", "--seeds", "0", "1"]) == 0
    assert calls == [([], True), ([], True)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[:4] == ["n", "head", "oof", "AUC"]
    assert lines[-1].split()[:5] == ["24", "thick", "0.500", "±", "0.000"]
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path), "--heads", "--no-reference"])
    assert "nothing to run" in capsys.readouterr().err


def test_a_workdir_of_cohorts_drawn_otherwise_is_refused(bench, tmp_path, capsys):
    """Found in review: finished cohorts were reused whatever --test-size or --base asked."""
    drawn = {"train_patients": 24, "test_patients": 64, "base": None}
    bench._check_cohorts_record(tmp_path, drawn)
    bench._check_cohorts_record(tmp_path, drawn)  # the same: fine
    for other in ({**drawn, "test_patients": 32}, {**drawn, "base": "/ct.nii.gz"}):
        with pytest.raises(SystemExit, match="holds cohorts drawn for .* use another WORKDIR"):
            bench._check_cohorts_record(tmp_path, other)
