"""What the models of one classifier run share: its patients (`Cohort`) and settings
(`RunContext`), the stratified split of a model's patients (pinned in its folder on resume),
scoring volumes with a model, and metrics with bootstrap intervals."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.data.inputs import VolumeInput
from kdsb.errors import UsageError
from kdsb.evaluation import metrics
from kdsb.io.run_layout import FOLD_NAME
from kdsb.training import runs
from kdsb.training.classifier_options import ClassifierOptions

logger = logging.getLogger(__name__)

Cohort = dict[str, tuple[Path, int]]  # patient id → (volume file, 0/1 label)


@dataclass(frozen=True)
class RunContext:
    """What every model of a run shares."""

    cohort: Cohort
    options: ClassifierOptions
    volume_input: VolumeInput
    data_dir: Path
    bag_files: dict[str, Path] | None
    resume: bool


def split_ids(cohort: Cohort, ids: list[str], options: ClassifierOptions, what: str,
              log: bool = True):
    """Training and validation ids among `ids`, stratified; both must be non-empty."""
    from kdsb.data.datasets import split_patients

    labels = {i: cohort[i][1] for i in ids}
    train_ids, val_ids = split_patients(
        ids, val_fraction=options.val_fraction, seed=options.seed, labels=labels
    )
    if not val_ids or not train_ids:
        # A class of one patient always stays in training (`split_patients`).
        hint = ("; a class needs 2 patients in each fold's training part: use fewer --folds"
                if options.folds >= 2 and options.val_fraction > 0 else "")
        raise UsageError(
            f"expected training and validation patients, received {len(train_ids)} and "
            f"{len(val_ids)} from {len(ids)} patients ({what}) with --val-fraction "
            f"{options.val_fraction}{hint}"
        )
    if log:
        logger.info(
            "%s: %d training patients (%d positive), %d validation patients (%d positive)",
            what, len(train_ids), sum(labels[i] for i in train_ids), len(val_ids),
            sum(labels[i] for i in val_ids),
        )
    return train_ids, val_ids


def pin_model_split(model_dir: Path, split: dict[str, list[str]], ctx: RunContext) -> None:
    """`runs.pin_split` of a model of this run (a fold's falls back on its fold.json)."""
    runs.pin_split(model_dir, split, ctx.resume, runs.worker(ctx.options.distribute).chief,
                   FOLD_NAME)


def score_patients(model: Any, paths: list[Path], volume_input: VolumeInput,
                   desc: str = "score") -> np.ndarray:
    """p(cancer) of a trained model for each volume file, one volume at a time."""
    from kdsb.models.classifier import predict_probability

    return np.array(
        [
            predict_probability(model, volume_input.read(path))
            for path in tqdm(paths, desc=desc, unit="patient", disable=None)
        ]
    )


def scores_with_intervals(y, p, seed: int) -> dict[str, Any]:
    """`metrics.summary` plus bootstrap 95 % intervals under "intervals"; NaN (an AUC of one
    class, and its interval) as None, so metrics.json stays standard JSON (found in review)."""
    scores = {k: _finite_or_none(v) if isinstance(v, float) else v
              for k, v in metrics.summary(y, p).items()}
    intervals = metrics.bootstrap_intervals(y, p, n_boot=metrics.DEFAULT_BOOTSTRAP, seed=seed)
    scores["intervals"] = {k: [_finite_or_none(float(lo)), _finite_or_none(float(hi))]
                           for k, (lo, hi) in intervals.items()}
    return scores


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value
