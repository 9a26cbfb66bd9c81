"""Tests of `kdsb evaluate` end to end: table, plots, exit codes and error messages."""

from __future__ import annotations

import numpy as np
import pytest

from kdsb.cli import main
from kdsb.evaluation import metrics
from kdsb.evaluation.evaluate import format_table


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 30)
    y[:2] = (0, 1)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 30), 0, 1)
    ids = [f"p{i:02d}" for i in range(30)]
    labels = tmp_path / "labels.csv"
    labels.write_text("id,cancer\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, y, strict=True)))
    preds = tmp_path / "pred.csv"
    # Predictions in another order than the labels: evaluate pairs them by id.
    rows = [f"{i},{v:.6f}\n" for i, v in zip(ids, p, strict=True)]
    preds.write_text("id,cancer\n" + "".join(reversed(rows)))
    return preds, labels, y, np.round(p, 6)


def test_evaluate_prints_metrics_and_writes_plots(files, tmp_path, capsys, monkeypatch):
    import matplotlib

    preds, labels, y, p = files
    # Plotting must leave the caller's matplotlib backend alone.
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use called"))
    plots = tmp_path / "plots"
    assert main(["evaluate", str(preds), str(labels), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert f"log loss            {metrics.log_loss(y, p):.4f}" in out
    assert f"base-rate log loss  {metrics.base_rate_log_loss(y):.4f}" in out
    assert f"ROC AUC             {metrics.roc_auc(y, p):.4f}" in out
    assert f"accuracy            {metrics.accuracy(y, p):.4f}" in out
    for name in ("roc.png", "calibration.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_evaluate_mismatched_ids_is_a_data_error(files, tmp_path, capsys):
    preds, labels, _, _ = files
    text = preds.read_text().splitlines()
    extra = tmp_path / "extra.csv"
    extra.write_text("\n".join(text[:-1] + ["zz,0.5"]) + "\n")  # drops p00, adds zz
    assert main(["evaluate", str(extra), str(labels)]) == 1
    err = capsys.readouterr().err
    assert "expected predictions and labels for the same patients" in err
    assert "1 predicted id(s) without a label" in err and ": zz" in err
    assert "1 labelled id(s) without a prediction" in err and ": p00" in err


def test_evaluate_rejects_probabilities_outside_0_1(files, tmp_path, capsys):
    _, labels, _, _ = files
    bad = tmp_path / "bad.csv"
    bad.write_text("id,cancer\np00,1.2\n")
    assert main(["evaluate", str(bad), str(labels)]) == 1
    assert "expected a probability in [0, 1] for p00, received '1.2'" in capsys.readouterr().err


def test_evaluate_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "only_one.csv"])
    assert exit_info.value.code == 2


def test_missing_input_files_are_usage_errors(files, tmp_path, capsys):
    preds, labels, _, _ = files
    assert main(["evaluate", str(tmp_path / "nope.csv"), str(labels)]) == 2
    assert "expected PRED_CSV, an id,cancer CSV of probabilities, received a missing path: " \
        f"{tmp_path / 'nope.csv'}" in capsys.readouterr().err
    assert main(["evaluate", str(preds), str(tmp_path)]) == 2
    assert "expected LABELS_CSV, an id,cancer CSV of 0/1 labels, received a folder" \
        in capsys.readouterr().err


def test_format_table_shows_nan_as_na():
    table = format_table({"log_loss": 0.5, "roc_auc": float("nan"), "accuracy": 1.0,
                          "base_rate_log_loss": 0.6})
    assert "ROC AUC             n/a" in table and "log loss            0.5000" in table
