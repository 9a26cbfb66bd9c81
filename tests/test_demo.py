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
    assert "test cohort (--fast: a smoke test of the plumbing on 2 patients, not a result)" in out

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
    first = json.loads((work / "seconds.json").read_text())
    assert sorted(first) == ["predict", "preprocess", "synth", "train-classifier", "train-gmcae"]
    assert main(["demo", str(work), "--fast", "--patients", "4", "--seed", "1"]) == 0
    # The second run's seconds add to the first run's (found in review: seeds.csv counted only
    # the stages a resumed run did).
    again = json.loads((work / "seconds.json").read_text())
    assert all(again[stage] > first[stage] for stage in first)
    assert read_labels(work / "test_cohort" / "labels.csv") == test_labels
    assert (work / "runs" / "classifier" / "metrics.json").stat().st_mtime_ns == metrics_written
    assert read_predictions(work / "test_predictions.csv") == predictions

    # Another plan or seed in that folder is refused: its stages would be reused as they are
    # (found in review: a --fast folder served a full demo).
    capsys.readouterr()
    assert main(["demo", str(work), "--patients", "4", "--seed", "1"]) == 2
    assert "expected the plan" in capsys.readouterr().err
    assert main(["demo", str(work), "--fast", "--patients", "4", "--seed", "2"]) == 2
    assert "seed 1 → 2" in capsys.readouterr().err


def test_seeds_run_the_demo_per_seed_and_report_mean_and_sd(tmp_path, capsys, monkeypatch):
    """The per-seed runs are `run_demo` (exercised above); here their aggregation."""
    import csv

    import numpy as np

    from kdsb import demo

    calls = []

    def fake_run_demo(workdir, *, patients, seed, fast, workers):
        calls.append((workdir, patients, seed, fast, workers))
        return {"log_loss": 0.1 * seed, "base_rate_log_loss": 0.25, "roc_auc": 1 - 0.1 * seed,
                "brier": 0.01, "ece": 0.02, "accuracy": 0.9, "seconds": 60.0 + seed}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", str(tmp_path), "--seeds", "1", "2", "3", "--fast"]) == 0
    assert calls == [(tmp_path / f"seed_{s}", None, s, True, 2) for s in (1, 2, 3)]
    with open(tmp_path / "seeds.csv", newline="") as f:
        rows = {row["seed"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["1", "2", "3", "mean", "sd"]
    losses = np.array([0.1, 0.2, 0.3])
    assert float(rows["mean"]["log_loss"]) == pytest.approx(losses.mean(), abs=1e-4)
    assert float(rows["sd"]["log_loss"]) == pytest.approx(losses.std(ddof=1), abs=1e-4)
    out = capsys.readouterr().out
    assert "log_loss            0.200 ± 0.100" in out
    assert "beats the base rate for 2 of 3 seeds" in out
    assert main(["demo", str(tmp_path), "--seeds", "1", "1"]) == 2
    for argv in (["--seeds", "1", "--seed", "2"], ["--seed", "0", "--seeds", "1", "2"]):
        # (`--seed 0`, the former default, passed unnoticed: found in review.)
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", str(tmp_path), *argv])
        assert exit_info.value.code == 2
    calls.clear()
    assert main(["demo", str(tmp_path / "one")]) == 0  # no --seed: seed 0
    assert calls[0][2] == 0


def test_a_folder_begun_before_the_plan_held_restarts_trained_with_two(tmp_path):
    """plan.json of an earlier version has no "restarts": its runs were trained with the
    default 2, so a full demo goes on there and a --fast one (no restarts) is refused."""
    import dataclasses
    import json

    from kdsb import demo
    from kdsb.errors import UsageError

    for plan in (demo.FULL_PLAN, demo.FAST_PLAN):
        work = tmp_path / str(plan.patients)
        work.mkdir()
        earlier = {k: v for k, v in dataclasses.asdict(plan).items() if k != "restarts"}
        (work / demo.PLAN_NAME).write_text(json.dumps({**earlier, "seed": 0}))
        if plan.restarts == 2:
            demo._pin_plan(work, plan, 0)
        else:
            with pytest.raises(UsageError, match="restarts 2 → 0"):
                demo._pin_plan(work, plan, 0)


def test_the_plan_holds_the_settings_and_bad_options_pin_nothing(tmp_path, monkeypatch):
    """Found in review: a folder made by code of other settings was reused as this code's, and
    --seed -1 wrote a plan that locked the folder before it was refused."""
    import json

    from kdsb import demo
    from kdsb.errors import UsageError

    demo._pin_plan(tmp_path / "w", demo.FAST_PLAN, 0)
    assert json.loads((tmp_path / "w" / demo.PLAN_NAME).read_text())["spacing_mm"] == \
        demo.SPACING_MM
    monkeypatch.setattr(demo, "SPACING_MM", 1.0)
    with pytest.raises(UsageError, match="spacing_mm 2.0 → 1.0"):
        demo._pin_plan(tmp_path / "w", demo.FAST_PLAN, 0)
    for options, message in (({"seed": -1}, r"expected --seed in \[0, 2147483648\), received -1"),
                             ({"seed": 2**31}, r"expected --seed in \[0, 2147483648\), received "
                                               "2147483648"),
                             ({"workers": 0}, "expected --workers of at least 1, received 0")):
        with pytest.raises(UsageError, match=message):
            demo.run_demo(tmp_path / "v", fast=True, **options)
        assert not (tmp_path / "v").exists()
    # Every seed is checked before the first runs (found in review: `--seeds 0 -1` ran seed 0's
    # whole demo first).
    with pytest.raises(UsageError, match=r"expected --seed in \[0, 2147483648\), received -1"):
        demo.run_demo_seeds(tmp_path / "seeds", [0, -1], fast=True)
    assert not (tmp_path / "seeds").exists()
    # So is every seed's folder (found in review: a later one begun with other options was
    # refused after the earlier seeds' whole demos).
    demo._pin_plan(tmp_path / "seeds" / "seed_1", demo.FULL_PLAN, 1)
    with pytest.raises(UsageError, match="expected the plan .*seed_1 was begun with"):
        demo.run_demo_seeds(tmp_path / "seeds", [0, 1], fast=True)
    assert not (tmp_path / "seeds" / "seed_0").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="expected WORKDIR, a folder for the demo, received a "
                                         "file"):
        demo.run_demo(tmp_path / "file", fast=True)
