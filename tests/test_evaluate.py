"""Tests of `kdsb evaluate` end to end: table, plots, exit codes and error messages."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from kdsb.cli import main
from kdsb.errors import UsageError
from kdsb.evaluation import metrics
from kdsb.evaluation.evaluate import evaluate, format_table, within_clip


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
    chance, chance_95 = metrics.ece_if_calibrated(p)
    assert f"ECE by chance       {chance:.4f}" in out
    assert f"ECE by chance 95 %  {chance_95:.4f}" in out
    assert f"accuracy (p>=0.5)   {metrics.accuracy(y, p):.4f}" in out
    assert f"Brier score         {metrics.brier(y, p):.4f}" in out
    assert f"ECE (10 bins)       {metrics.expected_calibration_error(y, p):.4f}" in out
    # Intervals by default: 2000 resamples, seed 0.
    low, high = metrics.bootstrap_intervals(y, p, n_boot=2000, seed=0)["roc_auc"]
    assert f"ROC AUC             {metrics.roc_auc(y, p):.4f} [{low:.4f}, {high:.4f}]" in out
    assert "95% percentile bootstrap intervals, 2000 resamples of patients (seed 0)" in out
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


def test_predicted_only_scores_a_held_out_part_against_the_whole_labels_file(files, tmp_path,
                                                                             capsys):
    preds, labels, y, p = files
    part = tmp_path / "part.csv"
    rows = preds.read_text().splitlines()
    part.write_text("\n".join(rows[:21]) + "\n")  # the header and 20 of the 30 patients
    assert main(["evaluate", str(part), str(labels), "--bootstrap", "0"]) == 1
    assert "pass --predicted-only" in capsys.readouterr().err
    assert main(["evaluate", str(part), str(labels), "--bootstrap", "0", "--predicted-only"]) == 0
    kept = [int(row.split(",")[0][1:]) for row in rows[1:21]]
    out = capsys.readouterr().out
    assert f"log loss            {metrics.log_loss(y[kept], p[kept]):.4f}" in out
    # Predictions without a label stay an error.
    part.write_text(part.read_text() + "zz,0.5\n")
    assert main(["evaluate", str(part), str(labels), "--predicted-only"]) == 1
    assert "1 predicted id(s) without a label" in capsys.readouterr().err


def test_evaluate_rejects_probabilities_outside_0_1(files, tmp_path, capsys):
    _, labels, _, _ = files
    bad = tmp_path / "bad.csv"
    bad.write_text("id,cancer\np00,1.2\n")
    assert main(["evaluate", str(bad), str(labels)]) == 1
    assert "expected a probability in [0, 1] for p00, received '1.2'" in capsys.readouterr().err


def test_predictions_of_exactly_0_or_1_are_warned_of(tmp_path, caplog):
    """Found by a user's trial: one wrong p = 0 gave a log loss of 8.6 without a word."""
    labels, preds = tmp_path / "labels.csv", tmp_path / "pred.csv"
    labels.write_text("id,cancer\na,1\nb,0\nc,1\nd,0\n")
    preds.write_text("id,cancer\na,1\nb,0\nc,0\nd,0.2\n")
    with caplog.at_level("WARNING"):
        scores = evaluate(preds, labels, n_boot=0)
    assert (f"{preds}: 3 prediction(s) of exactly 0 or 1; the log loss clips them to [1e-15, "
            f"1 - 1e-15], so a wrong one costs 34.5 nats") in caplog.text
    assert scores["log_loss"] == pytest.approx((34.5388 - np.log(0.8)) / 4, rel=1e-4)


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
    # Bad outputs and seeds: one line, not a traceback (found in review).
    assert main(["evaluate", str(preds), str(labels), "--plots", str(preds)]) == 2
    assert "expected --plots DIR, a folder for the plots, received a file" in \
        capsys.readouterr().err
    assert main(["evaluate", str(preds), str(labels), "--plots", str(preds / "plots")]) == 2
    assert "received a path under a file" in capsys.readouterr().err
    assert main(["evaluate", str(preds), str(labels), "--seed", "-1"]) == 2
    assert "expected --seed of 0 or more, received -1" in capsys.readouterr().err


def test_format_table_shows_nan_as_na():
    table = format_table({"log_loss": 0.5, "roc_auc": float("nan"), "accuracy": 1.0,
                          "base_rate_log_loss": 0.6})
    assert "ROC AUC             n/a" in table and "log loss            0.5000" in table


def _write(path, header, rows):
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


@pytest.fixture
def split(tmp_path):
    """Test and validation patients whose best Youden thresholds differ, labelled in one file.

    Validation (Youden ties the cuts below 0.7 and below 0.35, the higher wins): between 0.6
    and 0.7. Test: between 0.45 and 0.5.
    """
    val_y, val_p = [0, 0, 1, 0, 1, 1], [0.1, 0.3, 0.35, 0.6, 0.7, 0.9]
    test_y, test_p = [0, 1, 0, 1, 1], [0.2, 0.4, 0.45, 0.5, 0.8]
    val_ids = [f"v{i}" for i in range(6)]
    test_ids = [f"t{i}" for i in range(5)]
    labels = _write(tmp_path / "labels.csv", "id,cancer",
                    zip(test_ids + val_ids, test_y + val_y, strict=True))
    preds = _write(tmp_path / "test.csv", "id,cancer", zip(test_ids, test_p, strict=True))
    # The training command's out-of-fold file: id,cancer,fold,label.
    oof = _write(tmp_path / "oof.csv", "id,cancer,fold,label",
                 [(i, v, k % 3, label) for k, (i, v, label) in
                  enumerate(zip(val_ids, val_p, val_y, strict=True))])
    return preds, labels, oof, (np.array(val_y), np.array(val_p)), \
        (np.array(test_y), np.array(test_p))


def test_youden_threshold_is_picked_on_validation(split, capsys):
    preds, labels, oof, (val_y, val_p), (test_y, test_p) = split
    picked = metrics.pick_threshold(val_y, val_p, "youden")
    assert 0.6 < picked < 0.7 and 0.45 < metrics.pick_threshold(test_y, test_p, "youden") < 0.5
    argv = ["evaluate", str(preds), str(labels), "--threshold", "youden", "--validation", str(oof),
            "--bootstrap", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"threshold {picked:.6g} (youden on {oof}, 6 patients)" in out
    # On the test patients at ~0.65 only t4 (0.8, positive) is called positive.
    c = metrics.confusion_at(test_y, test_p, picked)
    assert (c.tp, c.fp, c.tn, c.fn) == (1, 0, 2, 2)
    assert "                 predicted 1  predicted 0\n" \
           "  cancer 1                 1            2\n" \
           "  no cancer 0              0            2\n" \
           "  sensitivity 0.3333  specificity 1.0000  PPV 1.0000  NPV 0.5000" in out
    # Scores are those of the 5 test patients only; no intervals with --bootstrap 0.
    assert "patients            5 (3 positive)" in out and "[" not in out
    assert f"log loss            {metrics.log_loss(test_y, test_p):.4f}\n" in out


def test_a_threshold_picked_under_predicts_clip_still_separates_clipped_predictions(tmp_path):
    """Found in review: out-of-fold negatives near 1e-6 put the Youden cut (halfway in log-odds
    to the lowest positive, 0.3) at 0.002, under `kdsb predict`'s clip of 0.005, so every
    clipped test prediction was called positive."""
    val = [("v0", 0, 1e-6), ("v1", 0, 2e-6), ("v2", 0, 1e-5), ("v3", 1, 0.3), ("v4", 1, 0.9)]
    test = [("t0", 0, 0.005), ("t1", 0, 0.005), ("t2", 1, 0.4), ("t3", 1, 0.995)]
    assert metrics.pick_threshold([y for _, y, _ in val], [p for *_, p in val], "youden") < 0.005
    labels = _write(tmp_path / "labels.csv", "id,cancer", [(i, y) for i, y, _ in val + test])
    preds = _write(tmp_path / "test.csv", "id,cancer", [(i, p) for i, _, p in test])
    oof = _write(tmp_path / "oof.csv", "id,cancer", [(i, p) for i, _, p in val])
    scores = evaluate(preds, labels, threshold="youden", validation_csv=oof)
    assert 0.005 < scores["threshold"]["threshold"] <= 0.3
    assert [scores["threshold"][k] for k in ("tp", "fp", "tn", "fn")] == [2, 0, 2, 0]
    # Above the clip: validation scores separated at 0.9995 give 0.995, where clipped
    # positives lie; evaluated predictions not clipped keep the cut the rule found.
    clipped = np.array([0.005, 0.5, 0.995])
    assert within_clip(0.9995, clipped) == 0.995 and within_clip(0.3, clipped) == 0.3
    assert within_clip(0.002, np.array([0.001, 0.5, 0.995])) == 0.002
    # Made with `predict --clip 0.02`: the clip given (found in review: such predictions lie
    # inside the default clip too, and the cut moved only to just above 0.005).
    test02 = [("t0", 0, 0.02), ("t1", 0, 0.02), ("t2", 1, 0.4), ("t3", 1, 0.98)]
    preds02 = _write(tmp_path / "test02.csv", "id,cancer", [(i, p) for i, _, p in test02])
    scores = evaluate(preds02, labels, threshold="youden", validation_csv=oof, clip=0.02)
    assert 0.02 < scores["threshold"]["threshold"] <= 0.3
    assert [scores["threshold"][k] for k in ("tp", "fp", "tn", "fn")] == [2, 0, 2, 0]
    with pytest.raises(UsageError, match=r"expected --clip in \[0, 0.5\), received 0.5"):
        evaluate(preds02, labels, threshold="youden", validation_csv=oof, clip=0.5)


def test_the_printed_threshold_given_again_gives_the_same_matrix(tmp_path, capsys, caplog):
    """Found in review: a cut moved to just above the clip printed as "0.005"; given as
    --threshold 0.005 it called the clipped patients positive. And --clip without a rule was
    ignored without a word."""
    val = [("v0", 0, 1e-6), ("v1", 0, 2e-6), ("v2", 0, 1e-5), ("v3", 1, 0.3), ("v4", 1, 0.9)]
    test = [("t0", 0, 0.005), ("t1", 1, 0.005), ("t2", 1, 0.4), ("t3", 1, 0.995)]
    labels = _write(tmp_path / "labels.csv", "id,cancer", [(i, y) for i, y, _ in val + test])
    preds = _write(tmp_path / "test.csv", "id,cancer", [(i, p) for i, _, p in test])
    oof = _write(tmp_path / "oof.csv", "id,cancer", [(i, p) for i, _, p in val])

    def matrix(*options):
        assert main(["evaluate", str(preds), str(labels), "--bootstrap", "0", *options]) == 0
        out = capsys.readouterr().out
        printed = re.search(r"threshold (\S+) \(", out).group(1)
        return printed, out[out.index("predicted 1 when"):]

    with caplog.at_level(logging.WARNING):  # any case; the clip is used (review: warned of)
        printed, picked = matrix("--threshold", " Youden", "--validation", str(oof), "--clip",
                                 "0.005")
    assert "--clip moves only" not in caplog.text
    assert printed == repr(float(np.nextafter(0.005, 1.0)))
    assert matrix("--threshold", printed, "--predicted-only")[1] == picked
    with caplog.at_level(logging.WARNING):
        matrix("--threshold", "0.3", "--clip", "0.02", "--predicted-only")
    assert "--clip moves only a threshold picked by youden or f1 on --validation: ignored " \
        "with --threshold VALUE" in caplog.text


def test_evaluate_returns_intervals_and_threshold(split, caplog):
    preds, labels, oof, (val_y, val_p), (test_y, test_p) = split
    scores = evaluate(preds, labels, n_boot=100, seed=3, threshold="f1", validation_csv=oof)
    picked = metrics.pick_threshold(val_y, val_p, "f1")
    assert scores["threshold"] == {**metrics.confusion_at(test_y, test_p, picked).as_dict(),
                                   "rule": "f1", "picked_on": f"{oof}, 6 patients",
                                   "shown": f"{picked:.6g}"}
    assert scores["intervals"] == metrics.bootstrap_intervals(test_y, test_p, n_boot=100, seed=3)
    assert scores["brier"] == pytest.approx(metrics.brier(test_y, test_p))
    # The old call: no intervals, no threshold (the validation file then only removes its
    # patients from the labels, and says so).
    plain = evaluate(preds, labels, validation_csv=oof)
    assert "intervals" not in plain and "threshold" not in plain
    assert f"--validation {oof}: its patients pick a --threshold youden or f1" in caplog.text
    assert {k: plain[k] for k in metrics.summary(test_y, test_p)} == metrics.summary(test_y,
                                                                                     test_p)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_threshold_rule_without_validation_is_a_usage_error(split, capsys, rule):
    preds, labels, _, _, _ = split
    assert main(["evaluate", str(preds), str(labels), "--threshold", rule]) == 2
    err = _one_line_error(capsys)
    assert f"kdsb evaluate: error: expected --validation VAL_PRED_CSV with --threshold {rule}" \
        in err


def test_validation_overlapping_the_test_set_is_a_usage_error(split, tmp_path, capsys):
    preds, labels, oof, _, _ = split
    leaky = tmp_path / "leaky.csv"
    leaky.write_text(oof.read_text() + "t1,0.4,0,1\nt3,0.5,0,1\n")
    argv = ["evaluate", str(preds), str(labels), "--threshold", "youden", "--validation",
            str(leaky)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"received 2 id(s) in both {leaky} and {preds}: t1, t3 " \
        "(the threshold would be picked on the test set)" in err


def test_one_class_validation_names_its_file(split, tmp_path, capsys, caplog):
    """Found in review: the refusal did not name the validation file, and the AUC warning said
    every label of the labels file was 0 when only the evaluated patients' were."""
    preds, labels, oof, _, _ = split
    negatives = tmp_path / "negatives.csv"
    negatives.write_text("id,cancer\nv0,0.1\nv1,0.3\nv3,0.6\n")
    argv = ["evaluate", str(preds), str(labels), "--threshold", "youden", "--validation",
            str(negatives), "--predicted-only"]
    assert main(argv) == 1
    assert f"--validation {negatives}: expected both classes to pick a threshold, received 0 " \
        "positive and 3 negative patient(s)" in _one_line_error(capsys)
    only_negative = tmp_path / "t0.csv"
    only_negative.write_text("id,cancer\nt0,0.2\nt2,0.45\n")
    assert main(["evaluate", str(only_negative), str(labels), "--predicted-only"]) == 0
    assert f"every evaluated patient's label (2 patient(s) of {labels}) is 0" in caplog.text


def test_validation_ids_need_labels(split, tmp_path, capsys):
    preds, labels, oof, _, _ = split
    unlabelled = tmp_path / "unlabelled.csv"  # id,cancer only: no label column of its own
    unlabelled.write_text("id,cancer\n" + "".join(
        ",".join(line.split(",")[:2]) + "\n" for line in oof.read_text().splitlines()[1:])
        + "w9,0.4\n")
    argv = ["evaluate", str(preds), str(labels), "--threshold", "f1", "--validation",
            str(unlabelled)]
    assert main(argv) == 1
    assert f"expected a label in {labels} (or a label column in {unlabelled}) for every " \
        "validation id, received 1 of 7 without one: w9" in _one_line_error(capsys)
    # A given threshold is not picked on them: unlabelled validation ids are only left out.
    argv[argv.index("f1")] = "0.5"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "patients            5 (3 positive)" in out and "threshold 0.5 (given)" in out


def test_an_out_of_fold_files_own_labels_serve_its_patients(split, tmp_path, capsys):
    """Found by a user's trial: oof.csv carries each patient's label, yet its patients had to be
    added to LABELS_CSV by hand before a threshold could be picked on them."""
    preds, labels, oof, (val_y, val_p), _ = split
    test_only = tmp_path / "test_labels.csv"
    test_only.write_text("".join(line + "\n" for line in labels.read_text().splitlines()
                                 if not line.startswith("v")))
    argv = ["evaluate", str(preds), str(test_only), "--threshold", "youden", "--validation",
            str(oof)]
    assert main(argv) == 0
    picked = metrics.pick_threshold(val_y, val_p, "youden")
    assert f"threshold {picked:.6g} (youden on {oof}, 6 patients)" in capsys.readouterr().out
    # A blank label cell leaves its patient to LABELS_CSV, and without a rule the column is not
    # read at all (found in review: both stopped runs the column has nothing to do with).
    blank = tmp_path / "blank.csv"
    blank.write_text(oof.read_text().replace(",0\n", ",\n", 1))
    assert main([*argv[:2], str(labels), *argv[3:6], str(blank)]) == 0
    junk = tmp_path / "junk.csv"
    junk.write_text(oof.read_text().replace(",0\n", ",maybe\n", 1))
    assert main(["evaluate", str(preds), str(labels), "--threshold", "0.5", "--validation",
                 str(junk)]) == 0
    capsys.readouterr()
    clashing = tmp_path / "clash.csv"
    clashing.write_text(labels.read_text().replace("v0,0", "v0,1"))
    argv[2] = str(clashing)
    assert main(argv) == 1
    assert f"expected {oof}'s label column to agree with {clashing}, received other labels " \
        "for v0" in _one_line_error(capsys)


def test_numeric_threshold_prints_the_confusion_matrix(files, capsys):
    preds, labels, y, p = files
    assert main(["evaluate", str(preds), str(labels), "--threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    c = metrics.confusion_at(y, p, 0.3)
    assert c.tp + c.fp + c.tn + c.fn == 30 and c.fp > 0 and c.tn > 0
    assert "threshold 0.3 (given); predicted 1 when p >= threshold" in out
    assert f"  {'cancer 1':<13}  {c.tp:>11}  {c.fn:>11}\n" in out
    assert f"  {'no cancer 0':<13}  {c.fp:>11}  {c.tn:>11}\n" in out
    assert f"sensitivity {c.sensitivity:.4f}  specificity {c.specificity:.4f}" in out


def test_a_threshold_that_puts_every_patient_on_one_side_is_a_warning(files, caplog):
    preds, labels, _, p = files
    assert main(["evaluate", str(preds), str(labels), "--threshold", "0.1"]) == 0
    assert ("at threshold 0.1 every evaluated patient is predicted 1 (their probabilities "
            f"lie in [{p.min():.6g}, {p.max():.6g}])\n") in caplog.text


@pytest.mark.parametrize("value", ["1.5", "0", "abc", "nan"])
def test_bad_threshold_is_a_usage_error(files, capsys, value):
    preds, labels, _, _ = files
    assert main(["evaluate", str(preds), str(labels), "--threshold", value]) == 2
    assert f"expected --threshold youden or f1 or a number in (0, 1), received {value!r}" \
        in _one_line_error(capsys)


def test_calibration_plot_shows_the_ece(files, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    preds, labels, y, p = files
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    evaluate(preds, labels, plots_dir=tmp_path / "plots")
    assert (tmp_path / "plots" / "roc.png").is_file()
    legend = [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()]
    assert f"model (ECE {metrics.expected_calibration_error(y, p):.3f})" in legend


def test_format_table_shows_intervals():
    table = format_table({"log_loss": 0.5, "roc_auc": 0.7, "brier": 0.2},
                         intervals={"log_loss": (0.4, 0.61), "roc_auc": (float("nan"),) * 2})
    assert "log loss            0.5000 [0.4000, 0.6100]" in table
    assert "ROC AUC             0.7000 [n/a, n/a]" in table
    assert "Brier score         0.2000\n" in table


def test_one_class_draws_no_roc_curve(tmp_path, monkeypatch):
    """All labels one class: AUC is undefined, and roc.png says so instead of drawing a curve
    labelled 'AUC nan' (found by a user's check)."""
    from matplotlib.axes import Axes

    from kdsb.evaluation.evaluate import plot_roc

    texts, curves = [], []
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **k: texts.append(s))
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: curves.append(k.get("label")) or
                        real_plot(self, *a, **k))
    plot_roc(np.ones(4), np.array([0.2, 0.4, 0.6, 0.8]), tmp_path / "roc.png")
    assert texts == ["no ROC curve: every label is 1"] and curves == ["chance"]
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_a_threshold_picked_beyond_the_evaluated_predictions_says_why(tmp_path, caplog):
    """Found in review: validation scores on another scale than the evaluated ones (oof.csv's
    fold calibrations against predict's ensemble) put the picked threshold beyond every
    evaluated prediction; the warning says that the ranges differ."""
    labels = _write(tmp_path / "labels.csv", "id,cancer",
                    [("v0", 1), ("v1", 1), ("v2", 0), ("v3", 0), ("t0", 0), ("t1", 1)])
    oof = _write(tmp_path / "oof.csv", "id,cancer",
                 [("v0", 0.99), ("v1", 0.98), ("v2", 0.9), ("v3", 0.85)])
    preds = _write(tmp_path / "test.csv", "id,cancer", [("t0", 0.2), ("t1", 0.7)])
    assert main(["evaluate", str(preds), str(labels), "--threshold", "youden", "--validation",
                 str(oof), "--bootstrap", "0"]) == 0
    assert "every evaluated patient is predicted 0 (their probabilities lie in [0.2, 0.7]); " \
           "the validation predictions it was picked on lie in [0.85, 0.99]: on another " \
           "scale than these?" in caplog.text
