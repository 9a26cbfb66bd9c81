"""Training the cancer classifier (`kdsb train-classifier`): labels + volumes + a GMCAE.

Options: `kdsb.training.classifier_options.ClassifierOptions`.

Steps: read and check the labels against the volumes (`kdsb.io.tables`); check every volume and
record their spacing (`kdsb.data.inputs.VolumeInput.fit_to`, saved as `classifier.json`); then
either one split into training and validation patients, stratified by label
(`kdsb.data.datasets.split_patients`), or, with `--folds K`, patient-level stratified K-fold
cross-validation (`kdsb.data.datasets.stratified_folds`). Each model trains on the spine of
`kdsb.training.runs` (config.json, checkpoints/, history.csv, logs/, resume) with early stopping
on the validation log loss, with one of three heads:

- `spp` (`kdsb.training.spp`): the GMCAE encoder, spatial pyramid pooling and a dense head,
  trained end to end on whole volumes;
- `mil` (`kdsb.training.mil`): the frozen encoder's cells pooled by MIL (`--mil-pooling`: max
  by default, or attention; `kdsb.models.mil`), trained on features computed once per volume
  (`kdsb.training.bags`);
- `nll` (`kdsb.models.nll`): the same MIL head on each patch's GMCAE negative log-likelihood.

Calibration (`kdsb.models.calibration`): Platt or temperature scaling fitted on predictions of
patients the model did not train on (the validation patients; with folds, every patient's
out-of-fold prediction) and appended to the saved model as a layer, so `classifier.keras`
carries it. The spine's best model stays beside it as `uncalibrated.keras`.

The run folder's files, one split or K folds: `kdsb.io.run_layout`.
The parts: `kdsb.training.run_checks` (options and resume checks), `kdsb.training.run_context`
(what the run's models share: patients, split, scoring, metrics), `kdsb.training.model_fitting`
(one model, its restarts and calibrated file), `kdsb.training.cross_validation` (`--folds K`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdsb.errors import LabelsError, UsageError
from kdsb.io.atomic import write_json
from kdsb.io.journal import file_digest
from kdsb.io.run_layout import (
    BAGS_DIR,
    FOLD_NAME,
    FOLD_PREFIX,
    METRICS_NAME,
    remove_results,
)
from kdsb.io.tables import check_labels_match, read_labels
from kdsb.io.volumes import list_volumes
from kdsb.training import attempts, runs
from kdsb.training.classifier_options import ClassifierOptions
from kdsb.training.cross_validation import cross_validate
from kdsb.training.model_fitting import fit_model, save_calibrated
from kdsb.training.run_checks import (
    check_accumulation_unchanged,
    check_fold_training_unchanged,
    check_input_unchanged,
    warn_of_another_gmcae_spacing,
    warn_of_other_heads_options,
    warn_of_unused_options,
)
from kdsb.training.run_context import RunContext, pin_model_split, scores_with_intervals, split_ids

logger = logging.getLogger(__name__)


def bag_symmetries(seed: int, count: int, spacing: Sequence[float]) -> list[int]:
    """The cube symmetries each volume's bag is encoded under: the identity, then `count` - 1
    more drawn by `seed` from those that keep the volumes' `spacing` (z, y, x) mm (all 48 on
    an isotropic grid; fewer than `count` there are, with a warning)."""
    from kdsb.data.patches import symmetries_for

    allowed = symmetries_for(spacing)
    if count > len(allowed):
        logger.warning("--bag-symmetries %d: only %d cube symmetries keep the volumes' spacing "
                       "of %s mm; encoding those", count, len(allowed),
                       " × ".join(f"{s:g}" for s in spacing))
    drawn = [allowed[i] for i in np.random.default_rng(seed).permutation(len(allowed))]
    return [0, *[int(s) for s in drawn if s != 0]][:count]


def train_classifier(
    data_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    run_dir: str | os.PathLike,
    options: ClassifierOptions | dict[str, Any],
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the classifier (one split, or K folds) into `run_dir`; returns its metrics.json.

    Args:
        data_dir: folder of `<id>.h5` volumes.
        labels_csv: `id,cancer` labels (0/1) for those volumes.
        run_dir: the run folder.
        options: the run's options, or the options given on the command line (a dict of some
            fields, `gmcae` among them unless resuming: the others keep their default, or
            their saved value when resuming).
        resume: continue from the newest checkpoints of `run_dir` with its saved options.

    Under `--distribute multiworker` every worker runs this with the same arguments; the chief
    writes `run_dir` (and scores, calibrates, reports), the others only train (and return None).

    Returns:
        metrics.json as a dict (None on a worker other than the chief). Always: "calibration"
        (method, slope, intercept), "head", "epochs_run", "options". One split: "validation"
        (calibrated: `scores_with_intervals`; the calibration was fitted on these patients) and
        "validation_uncalibrated", train_base_rate, n_train, n_val, train_ids, val_ids,
        val_predictions (calibrated). Folds: "folds" (K), "out_of_fold"
        (cross-fitted calibrated predictions of every patient) and "out_of_fold_uncalibrated",
        "fold_ids". Both: "collapsed_seeds" (the seeds of attempts restarted on the base-rate
        plateau; per fold with folds).

    Raises:
        LabelsError: the labels CSV is malformed or disagrees with the volumes, or a class has
            fewer patients than folds.
        StoreError: a volume file is unreadable, too small for `downscale` or of another
            spacing than the others.
        UsageError: an option is out of range, another run writes `run_dir`, the run folder
            holds checkpoints and `resume` is off, `resume` in a run folder of another kind
            (config.json), or resuming changes an option that may not change, or resumes on other
            patients (split.json), volumes read otherwise or a changed GMCAE (classifier.json);
            under multiworker, a missing or malformed TF_CONFIG, or a batch size other than the
            number of workers.
        TrainingError: the loss became NaN.
    """
    run_dir = Path(run_dir)
    given = options
    options, _ = runs.resolve_options(
        ClassifierOptions, options, run_dir, resume=resume, data_dir=data_dir
    )
    worker = runs.worker(options.distribute)
    with runs.sole_run(run_dir, "kdsb train-classifier", worker.chief):
        return _train_held(data_dir, labels_csv, run_dir, given, options, resume, worker)


def _train_held(data_dir: str | os.PathLike, labels_csv: str | os.PathLike, run_dir: Path,
                given: ClassifierOptions | dict[str, Any], options: ClassifierOptions,
                resume: bool, worker: runs.Worker) -> dict[str, Any] | None:
    """`train_classifier` once its options are resolved and `run_dir` is this run's alone."""
    warn_of_other_heads_options(given, options.head)
    warn_of_unused_options(given, options)
    # Before any record is written or looked for beside it (found by a user's trial: a
    # classifier given as --gmcae began the run, its split and records written, then failed),
    # and without loading it: a multi-worker run may start TensorFlow only in `runs.begin`.
    from kdsb.models.classifier import check_gmcae_archive

    check_gmcae_archive(options.gmcae)
    if resume:
        check_accumulation_unchanged(run_dir, options)
    if options.distribute == "multiworker" and options.batch_size != worker.count:
        raise UsageError(
            f"expected --batch-size {worker.count} with --distribute multiworker over "
            f"{worker.count} workers (one volume per worker and step: Keras's gradient "
            f"accumulation does not run under a distribution strategy), received "
            f"{options.batch_size}"
        )
    # What an earlier run leaves besides checkpoints (which `resolve_options` looked for): its
    # folds, and the attempts of a model whose every attempt was stuck (restarts.json: the
    # kept attempt's checkpoints are gone, and a fresh start would take its model as settled).
    started = [path for pattern in (f"{FOLD_PREFIX}*/{FOLD_NAME}",
                                    f"{FOLD_PREFIX}*/{runs.CHECKPOINT_DIR}",
                                    f"{FOLD_PREFIX}*/{attempts.RESTARTS_NAME}",
                                    attempts.RESTARTS_NAME)
               for path in sorted(run_dir.glob(pattern))]
    if started and not resume:
        raise UsageError(
            f"expected an empty run folder or --resume, received {run_dir} which already holds "
            f"an earlier run's results ({started[0].relative_to(run_dir)} …)"
        )
    if resume and options.folds >= 2 and list(run_dir.glob(f"{FOLD_PREFIX}*/{FOLD_NAME}")):
        check_fold_training_unchanged(run_dir, options)
    from kdsb.preprocessing.out_dir import MANIFEST_NAME, failed_patients

    labels = read_labels(labels_csv)
    volumes = list_volumes(data_dir)
    usable = check_labels_match(
        labels, volumes, labels_path=labels_csv, data_dir=data_dir,
        allow_unlabelled=options.allow_unlabelled,
        allow_missing_volumes=options.allow_missing_volumes, failed=failed_patients(data_dir),
        failed_in=Path(data_dir) / MANIFEST_NAME,
    )
    cohort = {i: (volumes[i], labels[i]) for i in usable}
    classes = sorted({label for _, label in cohort.values()})
    if len(classes) < 2:  # found in review: a single split trained on it without a word
        raise LabelsError(f"{labels_csv}: expected patients of both classes (0 and 1) to learn "
                          f"from, received {len(cohort)} patient(s) all labelled "
                          f"{classes[0] if classes else 'nothing'}")
    volume_input = options.volume_input().fit_to([volumes[i] for i in usable])
    warn_of_another_gmcae_spacing(options.gmcae, volume_input)
    if options.folds >= 2:
        from kdsb.data.datasets import stratified_folds

        folds = stratified_folds(usable, labels, options.folds, seed=options.seed)
        for k, held_out in enumerate(folds, start=1):  # every fold splits, before any work
            rest = [i for i in sorted(cohort) if i not in set(held_out)]
            train_ids, val_ids = split_ids(cohort, rest, options, f"fold {k}", log=False)
            runs.check_split(run_dir / f"{FOLD_PREFIX}{k}", {"held_out": held_out,
                             "train_ids": train_ids, "val_ids": val_ids}, resume, FOLD_NAME)
    else:
        train_ids, val_ids = split_ids(cohort, sorted(cohort), options, "all patients", log=False)
        runs.check_split(run_dir, {"train_ids": train_ids, "val_ids": val_ids}, resume)
    gmcae_sha256 = file_digest(options.gmcae)
    if resume:
        check_input_unchanged(run_dir, volume_input, options.gmcae, gmcae_sha256)
    runs.begin(run_dir, options, data_dir=data_dir, resume=resume)
    runs.note_volumes(run_dir, {i: volumes[i] for i in usable}, resume, worker.chief)
    if worker.chief:
        volume_input.save(run_dir, gmcae=str(options.gmcae), gmcae_sha256=gmcae_sha256)
        remove_results(run_dir)  # a former run's, or this one's of fewer epochs
    bag_files = None
    if options.head in ("mil", "nll"):
        from kdsb.training.bags import encode_bags

        symmetries = bag_symmetries(options.seed, options.bag_symmetries,
                                    volume_input.spacing_mm)
        bag_files = encode_bags({i: volumes[i] for i in usable}, options.gmcae, volume_input,
                                symmetries, run_dir / BAGS_DIR, head=options.head,
                                block=options.mil_block)
    ctx = RunContext(cohort, options, volume_input, Path(data_dir), bag_files, resume)
    if options.folds >= 2:
        result = cross_validate(run_dir, folds, ctx)
    else:
        result = _one_split(run_dir, ctx)
    if result is not None:
        result["options"] = options.to_saved()
        path = run_dir / METRICS_NAME
        write_json(path, result)
        logger.debug("wrote %s", path)  # the command prints it
    runs.wait_for_workers(options.distribute)
    return result


def _one_split(run_dir: Path, ctx: RunContext) -> dict[str, Any] | None:
    from kdsb.models.calibration import fit_calibration, method_for, warn_if_flattening

    cohort, options = ctx.cohort, ctx.options
    train_ids, val_ids = split_ids(cohort, sorted(cohort), options, "all patients")
    pin_model_split(run_dir, {"train_ids": train_ids, "val_ids": val_ids}, ctx)
    fitted = fit_model(run_dir, train_ids, val_ids, ctx)
    if fitted is None:
        return None
    p_val = fitted.p_val
    y_val = [cohort[i][1] for i in val_ids]
    # A class of one patient stays in training (`split_patients`), so the validation
    # patients may be of one class (found in review: a Platt map fitted on them).
    method = method_for(len(val_ids), options.calibration, one_class=len(set(y_val)) < 2)
    calibration = fit_calibration(y_val, p_val, method)
    warn_if_flattening(calibration, len(y_val), method)
    save_calibrated(run_dir, calibration, ctx.volume_input)
    p_cal = calibration.apply(p_val)
    return {
        "head": options.head,
        "calibration": {"method": method, **calibration.__dict__},
        "validation": scores_with_intervals(y_val, p_cal, options.seed),
        "validation_uncalibrated": scores_with_intervals(y_val, p_val, options.seed),
        "train_base_rate": float(np.mean([cohort[i][1] for i in train_ids])),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "train_ids": train_ids,
        "val_ids": val_ids,
        "val_predictions": {i: float(p) for i, p in zip(val_ids, p_cal, strict=True)},
        "epochs_run": len(runs.read_history(run_dir / runs.HISTORY_NAME)),  # the kept model's
        "collapsed_seeds": fitted.collapsed_seeds,
    }


