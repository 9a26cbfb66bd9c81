"""Score a submission CSV against a labels CSV: metrics table with bootstrap intervals, a
confusion matrix at a threshold picked on validation predictions, ROC and calibration plots."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kdsb.errors import KdsbError, LabelsError, UsageError
from kdsb.evaluation import metrics
from kdsb.evaluation.predict import PROBABILITY_CLIP
from kdsb.io.atomic import save_figure
from kdsb.io.run_layout import OOF_LABEL
from kdsb.io.tables import read_label_column, read_labels, read_predictions, summarise_ids

logger = logging.getLogger(__name__)

ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"
PLOT_SIZE_INCHES = (4.5, 4.5)
PLOT_DPI = 120

# Row order and labels of the printed table.
TABLE_ROWS = (
    ("log_loss", "log loss"),
    ("base_rate_log_loss", "base-rate log loss"),
    ("brier", "Brier score"),
    ("ece", "ECE (10 bins)"),
    # What a calibrated model with these predictions would show by chance (metrics.summary).
    ("ece_if_calibrated", "ECE by chance"),
    ("ece_if_calibrated_95", "ECE by chance 95 %"),
    ("roc_auc", "ROC AUC"),
    ("accuracy", "accuracy (p>=0.5)"),  # --threshold prints its own confusion matrix
)


def align(
    predictions: Mapping[str, float],
    labels: Mapping[str, int],
    *,
    predictions_path: str | os.PathLike = "predictions",
    labels_path: str | os.PathLike = "labels",
    predicted_only: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair predictions with labels by id; both must name exactly the same patients, or with
    `predicted_only` every predicted patient must have a label (the labels may name more: a
    held-out part of a cohort scored against the cohort's labels file).

    Returns:
        The ids (sorted), the labels and the probabilities in that order.

    Raises:
        LabelsError: some ids appear in only one of the two files (a few are named).
    """
    only_predicted = sorted(set(predictions) - set(labels))
    only_labelled = sorted(set(labels) - set(predictions))
    problems = []
    if only_predicted:
        problems.append(
            f"{len(only_predicted)} predicted id(s) without a label in {labels_path}: "
            f"{summarise_ids(only_predicted)}"
        )
    if only_labelled and predicted_only:
        if not only_predicted:  # (found by a user's trial: said just before the error below)
            logger.info("scoring the %d predicted patients; %d more in %s left out",
                        len(predictions), len(only_labelled), labels_path)
    elif only_labelled:
        problems.append(
            f"{len(only_labelled)} labelled id(s) without a prediction in {predictions_path}: "
            f"{summarise_ids(only_labelled)}"
        )
    if problems:
        raise LabelsError(
            "expected predictions and labels for the same patients, received " + "; ".join(problems)
            + (" (pass --predicted-only to score the predicted patients alone)"
               if only_labelled and not only_predicted else "")
        )
    ids = sorted(predictions)
    y = np.array([labels[i] for i in ids], dtype=np.float64)
    p = np.array([predictions[i] for i in ids], dtype=np.float64)
    return ids, y, p


def _number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def format_table(
    scores: Mapping[str, float],
    title: str = "",
    *,
    intervals: Mapping[str, tuple[float, float]] | None = None,
) -> str:
    """A small aligned text table of the headline metrics (NaN shown as 'n/a').

    Args:
        scores: `metrics.summary` (missing rows are shown as 'n/a').
        title: a first line, or nothing.
        intervals: metric name → (low, high), shown as "value [low, high]" where present.
    """
    width = max(len(name) for _, name in TABLE_ROWS)
    lines = [title] if title else []
    for key, name in TABLE_ROWS:
        text = _number(scores.get(key, math.nan))
        if intervals is not None and key in intervals:
            low, high = intervals[key]
            text += f" [{_number(low)}, {_number(high)}]"
        lines.append(f"  {name:<{width}}  {text}")
    if "n" in scores:
        positives = scores.get("n_positive", "?")
        lines.append(f"  {'patients':<{width}}  {scores['n']} ({positives} positive)")
    return "\n".join(lines)


def threshold_text(value: float, p: np.ndarray) -> str:
    """A threshold as text that, given as `--threshold`, calls every prediction of `p` as
    `value` does: 6 significant digits where they do, else every digit (found in review: a cut
    moved to just above the clip printed as "0.005", which, given again, called the patients
    at 0.005 positive)."""
    short = f"{value:.6g}"
    return short if np.array_equal(p >= float(short), p >= value) else repr(float(value))


def format_confusion(threshold: Mapping[str, object]) -> str:
    """The labelled 2×2 confusion matrix, sensitivity, specificity, PPV and NPV.

    Args:
        threshold: the "threshold" entry of `evaluate`'s result (`metrics.Confusion.as_dict`
            plus "rule", "picked_on" and "shown", the threshold as printed).
    """
    rule = threshold.get("rule", "given")
    origin = (f"{rule} on {threshold['picked_on']}" if threshold.get("picked_on") else str(rule))
    tp, fp, tn, fn = (int(threshold[key]) for key in ("tp", "fp", "tn", "fn"))
    cells = max(len(str(count)) for count in (tp, fp, tn, fn))
    column = max(len("predicted 1"), cells)
    return "\n".join([
        f"threshold {threshold['shown']} ({origin}); predicted 1 when p >= threshold",
        f"  {'':<13}  {'predicted 1':>{column}}  {'predicted 0':>{column}}",
        f"  {'cancer 1':<13}  {tp:>{column}}  {fn:>{column}}",
        f"  {'no cancer 0':<13}  {fp:>{column}}  {tn:>{column}}",
        f"  sensitivity {_number(threshold['sensitivity'])}  "
        f"specificity {_number(threshold['specificity'])}  "
        f"PPV {_number(threshold['ppv'])}  NPV {_number(threshold['npv'])}",
    ])


def parse_threshold(text: str | float) -> str | float:
    """A `--threshold` value: a rule of `metrics.THRESHOLD_RULES`, or a number in (0, 1).

    Raises:
        UsageError: anything else.
    """
    if isinstance(text, str) and text.strip().lower() in metrics.THRESHOLD_RULES:
        return text.strip().lower()
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise UsageError(
            f"expected --threshold {' or '.join(metrics.THRESHOLD_RULES)} or a number in (0, 1), "
            f"received {text!r}"
        )
    return value


def plot_roc(y: np.ndarray, p: np.ndarray, path: str | os.PathLike) -> Path:
    """Write the ROC curve with its AUC and the chance diagonal as a PNG (with one class among
    the labels, no curve: the plot says why)."""
    from matplotlib.figure import Figure

    auc = metrics.roc_auc(y, p)
    fig = Figure(figsize=PLOT_SIZE_INCHES)
    ax = fig.subplots()
    if math.isnan(auc):
        ax.text(0.5, 0.5, f"no ROC curve: every label is {int(y[0])}", ha="center", va="center")
    else:
        fpr, tpr = metrics.roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"model (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=PLOT_DPI)


def plot_calibration(
    y: np.ndarray, p: np.ndarray, path: str | os.PathLike, n_bins: int = 10
) -> Path:
    """Write a reliability diagram (observed rate vs mean prediction per bin) as a PNG."""
    from matplotlib.figure import Figure

    bins = metrics.calibration_bins(y, p, n_bins)
    filled = bins.counts > 0
    fig = Figure(figsize=PLOT_SIZE_INCHES)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ece = metrics.expected_calibration_error(y, p, n_bins)
    ax.plot(bins.mean_predicted[filled], bins.observed_rate[filled], "o-", lw=2,
            label=f"model (ECE {ece:.3f})")
    ax.axhline(y.mean(), color="tab:orange", lw=1, label=f"base rate {y.mean():.2f}")
    for x, rate, count in zip(
        bins.mean_predicted[filled], bins.observed_rate[filled], bins.counts[filled], strict=True
    ):
        ax.annotate(str(count), (x, rate), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="mean predicted probability", ylabel="observed cancer rate",
           title="Calibration (patients per bin)", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=PLOT_DPI)


def _split_validation(
    validation_csv: str | os.PathLike,
    predictions: Mapping[str, float],
    predictions_csv: str | os.PathLike,
    labels: Mapping[str, int],
    labels_csv: str | os.PathLike,
    picks: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Validation labels and probabilities, and the labels left for the evaluated patients.

    `picks`: the validation patients pick the threshold, so each needs a label; otherwise they
    are only left out of the labels, and those without one are simply not there (y and p then
    hold the labelled ones).

    Raises:
        UsageError: validation ids are among the evaluated ones.
        LabelsError: with `picks`, a validation id has no label in `labels_csv` nor in the
            validation file's own `label` column (oof.csv's), or the two disagree.
    """
    # The id and cancer columns, and an out-of-fold file's own label column (found by a user's
    # trial: oof.csv's patients had to be added to LABELS_CSV by hand).
    validation = read_predictions(validation_csv)
    overlap = sorted(set(validation) & set(predictions))
    if overlap:
        raise UsageError(
            f"expected --validation patients other than the evaluated ones, received "
            f"{len(overlap)} id(s) in both {validation_csv} and {predictions_csv}: "
            f"{summarise_ids(overlap)} (the threshold would be picked on the test set)"
        )
    own = (read_label_column(validation_csv, OOF_LABEL) or {}) if picks else {}
    clash = sorted(i for i in set(own) & set(labels) if own[i] != labels[i])
    if clash:
        raise LabelsError(f"expected {validation_csv}'s {OOF_LABEL} column to agree with "
                          f"{labels_csv}, received other labels for {summarise_ids(clash)}")
    known = {**own, **labels}
    unlabelled = sorted(set(validation) - set(known))
    if unlabelled and picks:
        raise LabelsError(
            f"expected a label in {labels_csv} (or a {OOF_LABEL} column in {validation_csv}) "
            f"for every validation id, received {len(unlabelled)} of {len(validation)} without "
            f"one: {summarise_ids(unlabelled)}"
        )
    ids = sorted(set(validation) & set(known))
    y = np.array([known[i] for i in ids], dtype=np.float64)
    p = np.array([validation[i] for i in ids], dtype=np.float64)
    rest = {i: label for i, label in labels.items() if i not in validation}
    return y, p, rest


def within_clip(threshold: float, p: np.ndarray, clip: float = PROBABILITY_CLIP) -> float:
    """A threshold picked on unclipped validation predictions (oof.csv), for evaluated ones
    `p` that all lie in the clip [clip, 1 - clip] `kdsb predict` made them with: one beyond
    the clip moves to the nearest cut between clipped values (just above `clip`, or 1 -
    `clip`), with a log line. Found in review: out-of-fold negatives near 1e-6 put a Youden
    cut at 0.002, and every clipped prediction was called positive; and the clip is the one
    given (found in review: predictions made with `--clip 0.02` were taken for unclipped)."""
    low, high = clip, 1.0 - clip
    if clip == 0.0 or not (p.min() >= low and p.max() <= high) or low < threshold <= high:
        return threshold  # (no clip: nothing to move inside; found in review)
    moved = float(min(max(threshold, np.nextafter(low, 1.0)), high))
    logger.info("the threshold %.6g lies beyond the clip [%g, %g] of the evaluated predictions "
                "(kdsb predict's): %s, the nearest cut between clipped values", threshold,
                low, high, threshold_text(moved, p))
    return moved


def evaluate(
    predictions_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    *,
    plots_dir: str | os.PathLike | None = None,
    n_boot: int = 0,
    seed: int = 0,
    level: float = metrics.DEFAULT_LEVEL,
    threshold: str | float | None = None,
    validation_csv: str | os.PathLike | None = None,
    predicted_only: bool = False,
    clip: float = PROBABILITY_CLIP,
) -> dict[str, object]:
    """Score a submission CSV against labels; optionally write roc.png and calibration.png.

    Args:
        predictions_csv: `id,cancer` probabilities of the evaluated (test) patients.
        labels_csv: `id,cancer` 0/1 labels of the evaluated patients, and of the validation
            patients when `validation_csv` is given (no others, unless `predicted_only`).
        plots_dir: folder for the PNGs (created), or None for no plots.
        n_boot: bootstrap resamples for the intervals (`metrics.bootstrap_intervals`); 0 for
            none.
        seed: seed of the bootstrap.
        level: coverage of the intervals.
        threshold: None; a number in (0, 1) used as is; or "youden" / "f1", a rule of
            `metrics.pick_threshold` applied to the validation predictions (`within_clip`
            moves it inside the clip of evaluated predictions that `kdsb predict` clipped).
        clip: the clip `kdsb predict` made the evaluated predictions with (its `--clip`).
        validation_csv: predictions of validation or out-of-fold patients, separate from the
            evaluated ones (its `id` and `cancer` columns, and with a rule its own `label`
            column where it has one, as oof.csv does). Required by a rule.
        predicted_only: score the predicted patients even when the labels name more (`align`).

    Returns:
        `metrics.summary` (log_loss, brier, ece, ece_if_calibrated and ece_if_calibrated_95,
        roc_auc (NaN for one class), accuracy, base_rate_log_loss, n, n_positive), plus:

        - "intervals" when `n_boot` > 0: metric name → (low, high) for log_loss, roc_auc,
          accuracy and brier;
        - "threshold" when `threshold` is given: `metrics.Confusion.as_dict()` on the evaluated
          patients (threshold, tp, fp, tn, fn, sensitivity, specificity, ppv, npv), plus "rule"
          ("youden", "f1" or "given"), "picked_on" (the validation CSV and its patient count,
          or None) and "shown" (the threshold as text that calls these patients alike,
          `threshold_text`).

    Raises:
        UsageError: a bad threshold, `n_boot` or `clip`, a rule without `validation_csv`, or
            validation patients among the evaluated ones.
        LabelsError: a file is malformed, or the files name different patients.
    """
    if n_boot < 0:
        raise UsageError(f"expected --bootstrap 0 or more resamples, received {n_boot}")
    if not 0.0 <= clip < 0.5:
        raise UsageError(f"expected --clip in [0, 0.5), received {clip}")
    if threshold is not None:
        threshold = parse_threshold(threshold)
        if isinstance(threshold, str) and validation_csv is None:
            raise UsageError(
                f"expected --validation VAL_PRED_CSV with --threshold {threshold}: the threshold "
                "is picked on validation predictions, never on the evaluated patients"
            )
    predictions = read_predictions(predictions_csv)
    labels = read_labels(labels_csv)
    if validation_csv is not None:
        y_val, p_val, labels = _split_validation(
            validation_csv, predictions, predictions_csv, labels, labels_csv,
            picks=isinstance(threshold, str),
        )
        if not isinstance(threshold, str):
            logger.warning("--validation %s: its patients pick a --threshold youden or f1; "
                           "without one they are only left out of the labels", validation_csv)
    _, y, p = align(predictions, labels, predictions_path=predictions_csv, labels_path=labels_csv,
                    predicted_only=predicted_only)
    scores: dict[str, object] = dict(metrics.summary(y, p))
    certain = int(np.count_nonzero((p == 0.0) | (p == 1.0)))
    if certain:  # found by a user's trial: a wrong one's 34.5 nats were unexplained
        logger.warning("%s: %d prediction(s) of exactly 0 or 1; the log loss clips them to "
                       "[%g, 1 - %g], so a wrong one costs %.1f nats (kdsb predict clips to "
                       "[--clip, 1 - --clip])", predictions_csv, certain, metrics.LOG_LOSS_EPS,
                       metrics.LOG_LOSS_EPS, -math.log(metrics.LOG_LOSS_EPS))
    if math.isnan(scores["roc_auc"]):
        logger.warning("ROC AUC is undefined: every evaluated patient's label (%d patient(s) of "
                       "%s) is %d", y.size, labels_csv, int(y[0]))
    if n_boot > 0:
        scores["intervals"] = metrics.bootstrap_intervals(
            y, p, n_boot=n_boot, level=level, seed=seed
        )
    if threshold is not None:
        if isinstance(threshold, str):
            try:
                value = within_clip(metrics.pick_threshold(y_val, p_val, threshold), p, clip)
            except KdsbError as error:  # e.g. one class only: say which file
                raise KdsbError(f"--validation {validation_csv}: {error}") from None
            picked_on = f"{validation_csv}, {y_val.size} patients"
            logger.info("%s threshold %.6g picked on %s", threshold, value, picked_on)
        else:
            value, picked_on = threshold, None
        called = int(np.count_nonzero(p >= value))
        if called in (0, p.size):
            logger.warning(
                "at threshold %.6g every evaluated patient is predicted %d (their probabilities "
                "lie in [%.6g, %.6g])%s", value, int(called > 0), p.min(), p.max(),
                f"; the validation predictions it was picked on lie in [{p_val.min():.6g}, "
                f"{p_val.max():.6g}]: on another scale than these? (oof.csv holds each fold's "
                "own calibration, predict the ensemble's; predict clips to [--clip, 1 - --clip])"
                if picked_on else "",
            )
        scores["threshold"] = {
            **metrics.confusion_at(y, p, value).as_dict(),
            "rule": threshold if isinstance(threshold, str) else "given",
            "picked_on": picked_on,
            "shown": threshold_text(value, p),
        }
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        plot_roc(y, p, plots_dir / ROC_PNG)
        plot_calibration(y, p, plots_dir / CALIBRATION_PNG)
        logger.info("wrote %s and %s in %s", ROC_PNG, CALIBRATION_PNG, plots_dir)
    return scores
