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
    """Every training patient gets one out-of-fold prediction from a model that did not see it;
    a feature that separates the classes ranks them (AUC 1), out of fold and held out."""
    labels = {f"p{i:02d}": i % 2 for i in range(16)}
    train = {i: 10.0 + 8.0 * y + 0.1 * int(i[1:]) for i, y in labels.items()}
    test = {"t0": 9.0, "t1": 25.0, "t2": 11.0, "t3": 19.0}
    oof, held_out = bench.reference_predictions(train, labels, test, folds=4, seed=0)
    assert sorted(oof) == sorted(labels) and sorted(held_out) == sorted(test)
    positives = [oof[i] for i in labels if labels[i]]
    negatives = [oof[i] for i in labels if not labels[i]]
    assert min(positives) > max(negatives)
    assert held_out["t1"] > held_out["t3"] > 0.5 > held_out["t2"] > held_out["t0"]
    row = bench.scores_row(16, bench.REFERENCE, 0, oof, labels, held_out,
                           {"t0": 0, "t1": 1, "t2": 0, "t3": 1}, 1.0)
    assert row["oof_auc"] == 1.0 and row["test_auc"] == 1.0
    assert row["head"] == "thick" and row["oof_log_loss"] < 0.69
