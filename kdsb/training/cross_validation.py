"""Patient-level K-fold cross-validation of the classifier (`--folds K`): a model per fold,
trained on the other folds, scored on its held-out patients.

`oof.csv` (`id,cancer,fold,label,uncalibrated`) holds every labelled patient once: the
prediction of the fold model that never saw it, calibrated by a map fitted on the other folds'
predictions (cross-fitted, so the reported calibration is honest); the saved models carry the
map fitted on all of them. A finished fold (its fold.json) is not retrained on `--resume`.
`kdsb predict DATA_DIR RUN_DIR` averages the K fold models.
The run folder also gets the K fold models as one `classifier.keras` (`kdsb.models.ensemble`)
and their histories as one `history.csv`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from kdsb.data.inputs import VolumeInput
from kdsb.evaluation import metrics
from kdsb.io.atomic import atomic_path, read_json, write_json
from kdsb.io.run_layout import (
    BEST_NAME,
    CALIBRATION_PNG,
    FOLD_NAME,
    FOLD_PREFIX,
    OOF_FIELDS,
    OOF_NAME,
    UNCALIBRATED_NAME,
)
from kdsb.io.tables import probability_text
from kdsb.training import runs
from kdsb.training.model_fitting import fit_model, save_calibrated
from kdsb.training.plateau import warn_if_constant
from kdsb.training.run_context import (
    RunContext,
    pin_model_split,
    score_patients,
    scores_with_intervals,
    split_ids,
)

logger = logging.getLogger(__name__)

# Out-of-fold log loss a cross-fitted calibration may add before it is warned of (nats).
CALIBRATION_HURT_NATS = 0.005


def cross_validate(run_dir: Path, folds: list[list[str]], ctx: RunContext) -> dict[str, Any] | None:
    """Train one model per fold on the other folds; score, calibrate and save them all (a
    worker other than the chief only trains, and returns None)."""
    from kdsb.models.calibration import fit_calibration, method_for, warn_if_flattening

    cohort, options = ctx.cohort, ctx.options
    if runs.worker(options.distribute).chief:  # a killed run's temporaries (each fold's: `fit`)
        runs.remove_stale_files(run_dir)
    raw: dict[str, float] = {}
    fold_of: dict[str, int] = {}
    epochs, collapsed = [], []
    for k, held_out in enumerate(folds, start=1):
        fold_dir = run_dir / f"{FOLD_PREFIX}{k}"
        done = _read_fold(fold_dir, held_out)
        if done is None:
            logger.info("fold %d of %d: %d held-out patients", k, len(folds), len(held_out))
            rest = [i for i in sorted(cohort) if i not in set(held_out)]
            train_ids, val_ids = split_ids(cohort, rest, options, f"fold {k}")
            pin_model_split(fold_dir, {"held_out": held_out, "train_ids": train_ids,
                                       "val_ids": val_ids}, ctx)
            fitted = fit_model(fold_dir, train_ids, val_ids, ctx)
            if fitted is None:
                continue
            p = score_patients(fitted.model, [cohort[i][0] for i in held_out],
                               ctx.volume_input, f"fold {k}")
            warn_if_constant(p, f"fold {k}")
            done = {"held_out": held_out, "train_ids": train_ids, "val_ids": val_ids,
                    "predictions": dict(zip(held_out, map(float, p), strict=True)),
                    "collapsed_seeds": fitted.collapsed_seeds}
            write_json(fold_dir / FOLD_NAME, done)
        else:
            logger.info("fold %d of %d: trained by the run resumed, kept (%s)", k, len(folds),
                        fold_dir / FOLD_NAME)
        raw.update(done["predictions"])
        fold_of.update({i: k for i in held_out})
        epochs.append(len(runs.read_history(fold_dir / runs.HISTORY_NAME)))
        collapsed.append(done.get("collapsed_seeds", []))
    if not runs.worker(options.distribute).chief:
        return None
    ids = sorted(raw)
    y = np.array([cohort[i][1] for i in ids])
    p_raw = np.array([raw[i] for i in ids])
    fold = np.array([fold_of[i] for i in ids])
    # One method for every map (the saved one and the cross-fitted ones the report rests on),
    # judged by the fewest patients a cross-fitted map sees.
    method = method_for(len(ids) - max(len(f) for f in folds), options.calibration)
    calibration = fit_calibration(y, p_raw, method)
    warn_if_flattening(calibration, len(y), method)
    p_cal = np.empty_like(p_raw)
    for k in range(1, len(folds) + 1):
        inside = fold == k
        p_cal[inside] = fit_calibration(y[~inside], p_raw[~inside], method).apply(
            p_raw[inside]
        )
    members = [save_calibrated(run_dir / f"{FOLD_PREFIX}{k}", calibration, ctx.volume_input)
               for k in range(1, len(folds) + 1)]
    _save_ensemble(run_dir, members, ctx.volume_input)
    _write_oof(run_dir / OOF_NAME, ids, p_cal, fold, y, p_raw)
    warn_if_calibration_hurt(y, p_raw, p_cal, method)
    from kdsb.evaluation.evaluate import plot_calibration

    plot_calibration(y, p_cal, run_dir / CALIBRATION_PNG)
    return {
        "head": options.head,
        "folds": len(folds),
        "calibration": {"method": method, **calibration.__dict__},
        "out_of_fold": scores_with_intervals(y, p_cal, options.seed),
        "out_of_fold_uncalibrated": scores_with_intervals(y, p_raw, options.seed),
        "fold_ids": folds,
        "epochs_run": epochs,
        "collapsed_seeds": collapsed,
    }


def warn_if_calibration_hurt(y: np.ndarray, p_raw: np.ndarray, p_cal: np.ndarray,
                             method: str) -> None:
    """Warn when the cross-fitted maps raised the out-of-fold log loss (found by a user's
    check: maps fitted on a fold model's near-constant predictions threw the other fold's to
    0.9, log loss 0.69 → 1.21, unremarked)."""
    before, after = metrics.log_loss(y, p_raw), metrics.log_loss(y, p_cal)
    if after > before + CALIBRATION_HURT_NATS:
        logger.warning("out of fold, the %s maps raised the log loss from %.3f to %.3f (each "
                       "fold's map fitted on the other folds): the fold models did not learn "
                       "alike; try --calibration none, more patients or other training options",
                       method, before, after)


def _read_fold(fold_dir: Path, held_out: list[str]) -> dict[str, Any] | None:
    """A finished fold's record (fold.json) if it holds these patients, else None."""
    path = fold_dir / FOLD_NAME
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("held_out") != held_out or not (fold_dir / UNCALIBRATED_NAME).is_file():
        return None
    return record


def _write_oof(path: Path, ids, p_cal, fold, y, p_raw) -> None:
    with atomic_path(path) as temp, temp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(OOF_FIELDS)
        for row in zip(ids, p_cal, fold, y, p_raw, strict=True):
            writer.writerow([row[0], probability_text(row[1]), int(row[2]), int(row[3]),
                             probability_text(row[4])])


def _save_ensemble(run_dir: Path, members: list[Any], volume_input: VolumeInput) -> None:
    """The run folder's own `classifier.keras` and `history.csv` (the command contract): the
    fold models `members` (fold 1 first) as one model (`kdsb.models.ensemble`, the mean logit
    `kdsb predict RUN_DIR` takes) and the folds' histories one after the other, with a `fold`
    column."""
    from kdsb.models.ensemble import ensemble_of
    from kdsb.models.input_record import with_input_record

    fold_dirs = [run_dir / f"{FOLD_PREFIX}{k}" for k in range(1, len(members) + 1)]
    model = with_input_record(ensemble_of(members), volume_input.to_config())
    runs.save_model_atomically(model, run_dir / BEST_NAME)
    rows = [{"fold": k, **row} for k, folder in enumerate(fold_dirs, start=1)
            for row in runs.read_history(folder / runs.HISTORY_NAME)]
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["fold"]
    with atomic_path(run_dir / runs.HISTORY_NAME) as temp, \
            temp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


