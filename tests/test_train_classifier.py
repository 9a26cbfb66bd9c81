"""Tests of `kdsb train-classifier` end to end on a tiny cohort of small volumes."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json

import numpy as np
import pytest

from kdsb.classifier_training import PARENCHYMA_HU, ClassifierConfig, balanced_class_weights
from kdsb.cli import main
from kdsb.commands import train_classifier as command
from kdsb.datasets import load_volume_array
from kdsb.patches import normalize_hu
from kdsb.prediction import find_input_config
from kdsb.store import volume_path, write_volume

N_PATIENTS = 8
SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Eight 16³ volumes (positives hold a bright cube), labels.csv and a tiny saved GMCAE."""
    import keras

    from kdsb.gmcae import build_gmcae

    root = tmp_path_factory.mktemp("train_classifier")
    rng = np.random.default_rng(0)
    data = root / "data"
    rows = []
    for i in range(N_PATIENTS):
        label = i % 2
        hu = rng.normal(-800, 50, SHAPE)
        if label:
            hu[4:10, 4:10, 4:10] = 40
        write_volume(volume_path(data, f"p{i}"), hu, np.ones(SHAPE), (1, 1, 1), (0, 0, 0))
        rows.append(f"p{i},{label}\n")
    labels = root / "labels.csv"
    labels.write_text("id,cancer\n" + "".join(rows))
    keras.utils.set_random_seed(0)
    gmcae = root / "gmcae.keras"
    build_gmcae(patch_size=16, width=2, mixtures=2).save(gmcae)
    return data, labels, gmcae


@pytest.mark.slow
def test_train_classifier_writes_model_history_and_metrics(cohort, tmp_path, capsys):
    import keras

    data, labels, gmcae = cohort
    run = tmp_path / "run"
    argv = ["train-classifier", str(data), str(labels), str(run), "--gmcae", str(gmcae),
            "--epochs", "2", "--val-fraction", "0.25", "--batch-size", "2", "--lr", "1e-3",
            "--dense-units", "4", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "patients            2 (1 positive)" in out and "base-rate log loss" in out

    model = keras.saving.load_model(run / "classifier.keras", safe_mode=True, compile=False)
    assert model.output_shape == (None, 1)
    with open(run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [row["epoch"] for row in history] == ["0", "1"]
    assert {"loss", "log_loss", "auc", "val_log_loss", "val_auc"} <= set(history[0])

    result = json.loads((run / "metrics.json").read_text())
    for key in ("val_log_loss", "val_auc", "val_accuracy", "val_base_rate_log_loss",
                "n_train", "n_val", "train_ids", "val_ids"):
        assert key in result
    assert (result["n_train"], result["n_val"]) == (6, 2)
    assert sorted(result["train_ids"] + result["val_ids"]) == [f"p{i}" for i in range(8)]
    # Stratified: one patient of each class in validation.
    assert sorted(int(i[1:]) % 2 for i in result["val_ids"]) == [0, 1]
    assert result["val_base_rate_log_loss"] == pytest.approx(np.log(2))
    # The validation log loss of metrics.json is the best epoch's, recomputed patient by patient.
    best_epoch_loss = min(float(row["val_log_loss"]) for row in history)
    assert result["val_log_loss"] == pytest.approx(best_epoch_loss, rel=1e-3, abs=1e-4)
    stored = json.loads((run / "classifier.json").read_text())
    assert stored["downscale"] == 1 and stored["mask_outside_lungs"] is True
    assert stored["outside_hu"] == PARENCHYMA_HU and stored["lung_dilation_mm"] == 2.0
    assert find_input_config(run / "classifier.keras")["outside_hu"] == PARENCHYMA_HU

    # Resume: one more epoch appended to the same history.
    assert main(argv[:-2] + ["--seed", "3", "--epochs", "3", "--resume"]) == 0
    with open(run / "history.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    assert json.loads((run / "metrics.json").read_text())["val_ids"] == result["val_ids"]
    # Without --resume a used run folder is a usage error.
    assert main(argv) == 2


def test_labels_problems_are_data_errors(cohort, tmp_path, capsys):
    data, _, gmcae = cohort
    bad = tmp_path / "labels.csv"
    bad.write_text("id,cancer\np0,1\np1,0\nghost,1\n")
    run = tmp_path / "run"
    base = ["train-classifier", str(data), str(bad), str(run), "--gmcae", str(gmcae)]
    assert main(base) == 1
    assert "received 1 of 3 without one: ghost" in capsys.readouterr().err
    bad.write_text("id,cancer\np0,1\np1,0\n")
    assert main(base) == 1
    assert "expected a label for every volume, received 6 of 8" in capsys.readouterr().err
    bad.write_text("id,cancer\np0,maybe\n")
    assert main(base) == 1
    assert "expected a label 0 or 1 for p0, received 'maybe'" in capsys.readouterr().err
    assert not run.exists()


def test_usage_errors(cohort, tmp_path, capsys):
    data, labels, gmcae = cohort
    run = tmp_path / "run"
    base = ["train-classifier", str(data), str(labels), str(run)]
    assert main([*base, "--gmcae", str(tmp_path / "nope.keras")]) == 2
    assert main([*base, "--gmcae", str(gmcae), "--val-fraction", "0"]) == 2
    assert "expected --val-fraction in (0, 1), received 0.0" in capsys.readouterr().err


def test_command_defaults_match_the_config_and_weights():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["d", "l", "r", "--gmcae", "g.keras"])
    assert command.config_from_args(args) == ClassifierConfig(gmcae="g.keras")
    fields = {f.name for f in dataclasses.fields(ClassifierConfig)}
    assert set(command.DEFAULTS) <= fields
    weights = balanced_class_weights([0, 0, 0, 1])
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})


def test_masked_voxels_take_the_outside_value(tmp_path):
    hu = np.full(SHAPE, 40.0)
    lung = np.zeros(SHAPE, dtype=bool)
    lung[4:12, 4:12, 4:12] = True
    hu[lung] = -800.0
    path = volume_path(tmp_path, "p")
    write_volume(path, hu, lung, (2, 2, 2), (0, 0, 0))
    x = load_volume_array(path, mask_outside_lungs=True, lung_dilation_mm=0.0,
                          outside_hu=PARENCHYMA_HU)[..., 0]
    np.testing.assert_allclose(x[lung], normalize_hu(np.float32(-800.0)))
    np.testing.assert_allclose(x[~lung], normalize_hu(np.float32(PARENCHYMA_HU)))
    # A 2 mm margin (one voxel here) keeps the face neighbours of the lungs unmasked.
    x = load_volume_array(path, mask_outside_lungs=True, lung_dilation_mm=2.0,
                          outside_hu=PARENCHYMA_HU)[..., 0]
    assert x[3, 8, 8] == pytest.approx(normalize_hu(np.float32(40.0)))
    assert x[2, 8, 8] == pytest.approx(normalize_hu(np.float32(PARENCHYMA_HU)))
