"""Score a submission CSV against a labels CSV: metrics table, ROC and calibration plots."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kdsb.errors import LabelsError
from kdsb.evaluation import metrics
from kdsb.io.tables import read_labels, read_predictions, summarise_ids

logger = logging.getLogger(__name__)

ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"
PLOT_SIZE_INCHES = (4.5, 4.5)
PLOT_DPI = 120

# Row order and labels of the printed table.
TABLE_ROWS = (
    ("log_loss", "log loss"),
    ("base_rate_log_loss", "base-rate log loss"),
    ("roc_auc", "ROC AUC"),
    ("accuracy", "accuracy"),
)


def align(
    predictions: Mapping[str, float],
    labels: Mapping[str, int],
    *,
    predictions_path: str | os.PathLike = "predictions",
    labels_path: str | os.PathLike = "labels",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair predictions with labels by id; both must name exactly the same patients.

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
    if only_labelled:
        problems.append(
            f"{len(only_labelled)} labelled id(s) without a prediction in {predictions_path}: "
            f"{summarise_ids(only_labelled)}"
        )
    if problems:
        raise LabelsError(
            "expected predictions and labels for the same patients, received " + "; ".join(problems)
        )
    ids = sorted(predictions)
    y = np.array([labels[i] for i in ids], dtype=np.float64)
    p = np.array([predictions[i] for i in ids], dtype=np.float64)
    return ids, y, p


def format_table(scores: Mapping[str, float], title: str = "") -> str:
    """A small aligned text table of the headline metrics (NaN shown as 'n/a')."""
    width = max(len(name) for _, name in TABLE_ROWS)
    lines = [title] if title else []
    for key, name in TABLE_ROWS:
        value = scores.get(key, math.nan)
        text = "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
        lines.append(f"  {name:<{width}}  {text}")
    if "n" in scores:
        positives = scores.get("n_positive", "?")
        lines.append(f"  {'patients':<{width}}  {scores['n']} ({positives} positive)")
    return "\n".join(lines)


def plot_roc(y: np.ndarray, p: np.ndarray, path: str | os.PathLike) -> Path:
    """Write the ROC curve with its AUC and the chance diagonal as a PNG."""
    from matplotlib.figure import Figure

    fpr, tpr = metrics.roc_curve(y, p)
    auc = metrics.roc_auc(y, p)
    fig = Figure(figsize=PLOT_SIZE_INCHES)
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label=f"model (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    return Path(path)


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
    ax.plot(bins.mean_predicted[filled], bins.observed_rate[filled], "o-", lw=2, label="model")
    ax.axhline(y.mean(), color="tab:orange", lw=1, label=f"base rate {y.mean():.2f}")
    for x, rate, count in zip(
        bins.mean_predicted[filled], bins.observed_rate[filled], bins.counts[filled], strict=True
    ):
        ax.annotate(str(count), (x, rate), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="mean predicted probability", ylabel="observed cancer rate",
           title="Calibration (patients per bin)", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    return Path(path)


def evaluate(
    predictions_csv: str | os.PathLike,
    labels_csv: str | os.PathLike,
    *,
    plots_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Score a submission CSV against labels; optionally write roc.png and calibration.png.

    Args:
        predictions_csv: `id,cancer` probabilities.
        labels_csv: `id,cancer` 0/1 labels for the same patients.
        plots_dir: folder for the PNGs (created), or None for no plots.

    Returns:
        `metrics.summary`: log_loss, roc_auc (NaN for one class), accuracy, base_rate_log_loss,
        n and n_positive.

    Raises:
        LabelsError: a file is malformed, or the two files name different patients.
    """
    predictions = read_predictions(predictions_csv)
    labels = read_labels(labels_csv)
    _, y, p = align(predictions, labels, predictions_path=predictions_csv, labels_path=labels_csv)
    scores = metrics.summary(y, p)
    if math.isnan(scores["roc_auc"]):
        logger.warning("ROC AUC is undefined: every label in %s is %d", labels_csv, int(y[0]))
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        plot_roc(y, p, plots_dir / ROC_PNG)
        plot_calibration(y, p, plots_dir / CALIBRATION_PNG)
        logger.info("wrote %s and %s in %s", ROC_PNG, CALIBRATION_PNG, plots_dir)
    return scores
