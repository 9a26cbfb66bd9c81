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

The run folder's files, one split or K folds: `kdsb.training.run_layout`.

`oof.csv` (`id,cancer,fold,label,uncalibrated`) holds every labelled patient once: the
prediction of the fold model that never saw it, calibrated by a map fitted on the other folds'
predictions (cross-fitted, so the reported calibration is honest); the saved models carry the
map fitted on all of them. A finished fold (its fold.json) is not retrained on `--resume`.
`kdsb predict DATA_DIR RUN_DIR` averages the K fold models.

Restarts: a model whose validation predictions carry next to no information about the labels
never left the plateau at the base rate (its encoder's pooled features died early, or its
predictions only wobble around the base rate: seen in a quarter of the SPP folds at 24 and 96
patients). The test is `kdsb.training.plateau.explained_fraction`: shifted by the logit
offset that fits the validation patients best (class weights offset every prediction), the
predictions explain less than `LEARNED_FRACTION` of the labels' entropy. Such a model is
trained again from the start with another seed (`attempts.RESTART_SEED_STRIDE` further), up to
`--restarts` times; when every attempt was stuck, the least stuck (largest explained
fraction) is kept. The folder keeps each abandoned attempt's model and history
(`collapsed_N_*`, `kdsb.training.attempts`) and `restarts.json`.
The validation patients decide, as they do for early stopping; with folds the held-out fold (the
out-of-fold predictions) plays no part in it.

Class imbalance: with `--loss bce` and `--class-weight balanced` (the default) each training
volume carries a sample weight n / (2 · n_class) (the `class_weight` rule of scikit-learn), so
both classes pull equally; the Platt map (`--calibration platt`, the default) then moves the
probabilities back to the observed rate (temperature scaling has no intercept and `none` no map:
their outputs keep the balanced weights' offset where the classes are unequal). `--loss focal`
uses no weights. Validation metrics are never weighted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from kdsb.data.inputs import INPUT_NAME, VolumeInput
from kdsb.errors import LabelsError, UsageError
from kdsb.evaluation import metrics
from kdsb.io.atomic import atomic_path, read_json, write_json
from kdsb.io.journal import file_digest
from kdsb.io.tables import check_labels_match, probability_text, read_labels
from kdsb.io.volumes import list_volumes
from kdsb.training import attempts, runs
from kdsb.training.classifier_options import ClassifierOptions
from kdsb.training.plateau import (
    CONSTANT_SPREAD,
    GIVE_UP_MONITOR,
    LEARNED_FRACTION,
    explained_fraction,
    prediction_spread,
    warn_if_constant,
)
from kdsb.training.run_layout import (
    BAGS_DIR,
    BEST_NAME,
    CALIBRATION_PNG,
    FOLD_NAME,
    FOLD_PREFIX,
    METRICS_NAME,
    OOF_FIELDS,
    OOF_NAME,
    UNCALIBRATED_NAME,
)

logger = logging.getLogger(__name__)

# Out-of-fold log loss a cross-fitted calibration may add before it is warned of (nats).
CALIBRATION_HURT_NATS = 0.005
# The metric picking the best model: the `log_loss` metric compiled below, on validation data.
MONITOR = "val_log_loss"
# The heads that read an option only some heads read (the others ignore it).
READ_BY_HEADS = {"levels": ("spp",), "pooling": ("spp",), "freeze_blocks": ("spp",),
                 "mil_pooling": ("mil", "nll"), "mil_block": ("mil",),
                 "bag_symmetries": ("mil", "nll")}


def _warn_of_other_heads_options(given: Any, head: str) -> None:
    """Warn of options given on the command line that `head` does not read (`--levels` with
    `--head mil`); the library path (a whole options object) names none."""
    if not isinstance(given, dict):
        return
    ignored = [key for key, heads in READ_BY_HEADS.items() if key in given and head not in heads]
    if ignored:
        logger.warning("--head %s ignores %s", head,
                       ", ".join("--" + key.replace("_", "-") for key in ignored))


def _restarts_apply(options: ClassifierOptions) -> bool:
    """Whether a stuck model is trained again: not in a distributed run (its workers would have
    to agree)."""
    return options.distribute == "none"


def _warn_of_unused_restarts(given: Any, options: ClassifierOptions) -> None:
    """Warn of `--restarts` given with `--distribute multiworker`, which never restarts."""
    if isinstance(given, dict) and given.get("restarts") and not _restarts_apply(options):
        logger.warning("--restarts %d is not used with --distribute %s: a stuck model is kept",
                       options.restarts, options.distribute)


def _check_accumulation_unchanged(run_dir: Path, options: ClassifierOptions) -> None:
    """Refuse a resumed SPP run of `--batch-size` > 1 whose `--distribute` changed: its
    checkpoints' optimizer accumulates gradients over the batch without a strategy and not
    under one (`spp.compile_classifier`), so the resumed epochs would update otherwise than the
    run's first ones (found in review).

    Raises:
        UsageError: naming both settings.
    """
    saved = read_json(run_dir / runs.OPTIONS_NAME).get("distribute", "none")
    if options.head == "spp" and options.batch_size > 1 and saved != options.distribute:
        raise UsageError(
            f"expected --distribute {saved} when resuming {run_dir} (--head spp, --batch-size "
            f"{options.batch_size}: its checkpoints' optimizer "
            f"{'accumulates' if saved == 'none' else 'does not accumulate'} gradients over the "
            f"batch), received --distribute {options.distribute}")


def _warn_of_another_gmcae_spacing(gmcae: str, volume_input: VolumeInput) -> None:
    """Warn when the GMCAE learned its features on another grid than the one the classifier's
    encoder is fed (the volumes' spacing times `--downscale`): it then sees every structure at
    another scale in voxels."""
    from kdsb.data.inputs import gmcae_spacing_of, same_spacing

    learned = gmcae_spacing_of(gmcae)
    fed = tuple(s * volume_input.downscale for s in volume_input.spacing_mm)
    if learned is not None and not same_spacing(learned, fed):
        logger.warning("GMCAE %s learned on volumes of %s mm spacing, the classifier's encoder "
                       "is fed %s mm (volumes of %s mm, --downscale %d): its features see "
                       "every structure at another scale", gmcae, tuple(learned), fed,
                       tuple(volume_input.spacing_mm), volume_input.downscale)


def balanced_class_weights(labels: list[int]) -> dict[int, float]:
    """Class weights n / (2 · n_class), so both classes carry equal total weight."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) if counts[c] else 0.0 for c in (0, 1)}


def class_weights_for(options: ClassifierOptions, labels: list[int]) -> dict[int, float] | None:
    """The training sample weights per class: balanced for `--loss bce --class-weight
    balanced`, else None (no weights)."""
    if options.loss != "bce" or options.class_weight != "balanced":
        return None
    weights = balanced_class_weights(labels)
    logger.info("class weights %s", weights)
    return weights


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


Cohort = dict[str, tuple[Path, int]]  # patient id → (volume file, 0/1 label)


def _split(cohort: Cohort, ids: list[str], options: ClassifierOptions, what: str,
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


@dataclass(frozen=True)
class _Context:
    """What every model of a run shares."""

    cohort: Cohort
    options: ClassifierOptions
    volume_input: VolumeInput
    data_dir: Path
    bag_files: dict[str, Path] | None
    resume: bool


class _Fitted(NamedTuple):
    """A trained model of a run (or of a fold)."""

    p_val: np.ndarray  # raw p(cancer) of the validation patients
    model: Any  # the best uncalibrated model
    collapsed_seeds: list[int]  # seeds of the attempts abandoned on the base-rate plateau


def _fit_model(model_dir: Path, train_ids: list[str], val_ids: list[str],
               ctx: _Context) -> _Fitted | None:
    """Train one model into `model_dir`, again with another seed while its validation
    predictions explain next to nothing (`explained_fraction` under `LEARNED_FRACTION`) or are
    constant (spread under `CONSTANT_SPREAD`; the only test with one class among the validation
    patients), up to `--restarts` times; when every attempt was stuck, the least stuck is kept
    (`kdsb.training.attempts`). None on a worker other than the chief (it only trains)."""
    from kdsb.training.mil import HEAD_NAME

    models = (UNCALIBRATED_NAME, HEAD_NAME)
    restarts_path = model_dir / attempts.RESTARTS_NAME
    records = read_json(restarts_path) if restarts_path.is_file() else []
    if attempts.kept_index(records) is not None:  # settled before a kill or a --resume
        return _kept_attempt(model_dir, records, models)
    y_val = [ctx.cohort[i][1] for i in val_ids]
    while True:
        seed = ctx.options.seed + len(records) * attempts.RESTART_SEED_STRIDE
        fitted = _fit_once(model_dir, train_ids, val_ids, ctx,
                           dataclasses.replace(ctx.options, seed=seed))
        if fitted is None:
            return None
        explained = explained_fraction(y_val, fitted.p_val)
        # One validation patient has no spread (found in review: every attempt counted as
        # stuck, and restarted, whatever it learned).
        spread = prediction_spread(fitted.p_val)
        # With one class among the validation patients nothing is explained (NaN): only
        # constant predictions then count as stuck.
        stuck = spread < CONSTANT_SPREAD or explained < LEARNED_FRACTION
        if not stuck or not _restarts_apply(ctx.options):
            return fitted._replace(collapsed_seeds=[r["seed"] for r in records])
        record = {"seed": seed,
                  "explained_fraction": None if math.isnan(explained) else explained,
                  "validation_spread": spread,
                  "validation_predictions": [float(p) for p in fitted.p_val],
                  "epochs": len(runs.read_history(model_dir / runs.HISTORY_NAME))}
        if len(records) >= ctx.options.restarts:
            if not records:  # --restarts 0: the only attempt stands, as trained (and resumable)
                return fitted._replace(collapsed_seeds=[])
            records.append(record)
            best = attempts.least_stuck(records)
            records[best][attempts.KEPT_KEY] = True
            write_json(restarts_path, records)
            fraction = records[best]["explained_fraction"]
            logger.warning("%s: every attempt stayed on the base-rate plateau; keeping seed %d's "
                           "(explained fraction %s), the least stuck", model_dir,
                           records[best]["seed"], "n/a" if fraction is None else f"{fraction:.3f}")
            return _kept_attempt(model_dir, records, models)
        records.append(record)
        if spread < CONSTANT_SPREAD:  # the first test: whatever their ranking, one answer
            verdict = (f"all lie within {spread:.1e} of one another (seed {seed}: one answer "
                       "for every patient)")
        elif explained < -0.0005:  # (one that rounds to -0.000 is not worse)
            verdict = (f"do worse than the base rate (explained fraction {explained:.3f}, "
                       f"seed {seed})")
        else:
            verdict = (f"explain {max(explained, 0.0):.3f} of the labels' entropy (seed {seed} "
                       "never left the base-rate plateau)")
        logger.warning("%s: the validation predictions %s: training again with seed %d "
                       "(restart %d of %d)", model_dir, verdict,
                       seed + attempts.RESTART_SEED_STRIDE, len(records), ctx.options.restarts)
        # Set aside before the record is written: a kill in between retrains the same attempt.
        attempts.set_aside(model_dir, len(records), models)
        write_json(restarts_path, records)


def _kept_attempt(model_dir: Path, records: list[dict], models: tuple[str, ...]) -> _Fitted:
    """The attempt kept when every one was stuck, its files made the live ones again."""
    from kdsb.models.classifier import load_classifier

    attempts.restore_kept(model_dir, records, models)
    kept = records[attempts.kept_index(records)]
    return _Fitted(np.asarray(kept["validation_predictions"]),
                   load_classifier(model_dir / UNCALIBRATED_NAME),
                   [r["seed"] for r in records if r is not kept])


def _fit_once(model_dir: Path, train_ids: list[str], val_ids: list[str], ctx: _Context,
              options: ClassifierOptions) -> _Fitted | None:
    """Train (or resume) one attempt with `options` (the run's, or a restart's other seed);
    None on a worker other than the chief. config.json keeps the run's options (restarts.json
    the seeds)."""
    from kdsb.models.classifier import load_classifier

    cohort = ctx.cohort
    last = runs.last_checkpoint(model_dir)
    runs.begin(model_dir, ctx.options, data_dir=ctx.data_dir, seed=options.seed,
               resume=ctx.resume)
    train = {i: cohort[i] for i in train_ids}
    val = {i: cohort[i] for i in val_ids}
    weights = class_weights_for(options, [y for _, y in train.values()])
    common = dict(resume=ctx.resume, start_epoch=last[0] if last else 0,
                  best_name=UNCALIBRATED_NAME, monitor=MONITOR, class_weights=weights,
                  # One validation patient's predictions have no spread to watch
                  # (`prediction_spread`).
                  give_up_below=(GIVE_UP_MONITOR, CONSTANT_SPREAD) if len(val_ids) > 1 else None)
    if options.head in ("mil", "nll"):
        from kdsb.training.mil import train_mil

        train_mil(model_dir, train, val, options, ctx.bag_files, **common)
    else:
        from kdsb.training.spp import train_spp

        train_spp(model_dir, train, val, options, ctx.volume_input, **common)
    if not runs.worker(options.distribute).chief:
        return None
    best = load_classifier(model_dir / UNCALIBRATED_NAME)
    p_val = score_patients(best, [cohort[i][0] for i in val_ids], ctx.volume_input, "validate")
    return _Fitted(p_val, best, [])


def _save_calibrated(model_dir: Path, calibration, volume_input: VolumeInput) -> Any:
    """Write `classifier.keras`: the uncalibrated model, its calibration and the record of how
    it reads a volume (the model-input contract: it travels with the file); returns it."""
    from kdsb.models.calibration import with_calibration
    from kdsb.models.classifier import load_classifier
    from kdsb.models.input_record import with_input_record

    model = with_calibration(load_classifier(model_dir / UNCALIBRATED_NAME), calibration)
    model = with_input_record(model, volume_input.to_config())
    runs.save_model_atomically(model, model_dir / BEST_NAME)
    return model


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


def scores_with_intervals(y, p, seed: int) -> dict[str, Any]:
    """`metrics.summary` (NaN AUC as None) plus bootstrap 95 % intervals under "intervals"."""
    scores = {k: _finite_or_none(v) if isinstance(v, float) else v
              for k, v in metrics.summary(y, p).items()}
    intervals = metrics.bootstrap_intervals(y, p, n_boot=metrics.DEFAULT_BOOTSTRAP, seed=seed)
    scores["intervals"] = {k: [float(lo), float(hi)] for k, (lo, hi) in intervals.items()}
    return scores


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
        UsageError: an option is out of range, the run folder holds checkpoints and `resume`
            is off, or resuming changes an option that may not change, or resumes on other
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
    _warn_of_other_heads_options(given, options.head)
    _warn_of_unused_restarts(given, options)
    if resume:
        _check_accumulation_unchanged(run_dir, options)
    worker = runs.worker(options.distribute)
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
        _check_fold_training_unchanged(run_dir, options)
    from kdsb.preprocessing.cohort import MANIFEST_NAME, failed_patients

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
    _warn_of_another_gmcae_spacing(options.gmcae, volume_input)
    if options.folds >= 2:
        from kdsb.data.datasets import stratified_folds

        folds = stratified_folds(usable, labels, options.folds, seed=options.seed)
        for k, held_out in enumerate(folds, start=1):  # every fold splits, before any work
            rest = [i for i in sorted(cohort) if i not in set(held_out)]
            train_ids, val_ids = _split(cohort, rest, options, f"fold {k}", log=False)
            runs.check_split(run_dir / f"{FOLD_PREFIX}{k}", {"held_out": held_out,
                             "train_ids": train_ids, "val_ids": val_ids}, resume, FOLD_NAME)
    else:
        train_ids, val_ids = _split(cohort, sorted(cohort), options, "all patients", log=False)
        runs.check_split(run_dir, {"train_ids": train_ids, "val_ids": val_ids}, resume)
    gmcae_sha256 = file_digest(options.gmcae)
    if resume:
        _check_input_unchanged(run_dir, volume_input, options.gmcae, gmcae_sha256)
    runs.begin(run_dir, options, data_dir=data_dir, resume=resume)
    if worker.chief:
        volume_input.save(run_dir, gmcae=str(options.gmcae), gmcae_sha256=gmcae_sha256)
    bag_files = None
    if options.head in ("mil", "nll"):
        from kdsb.training.bags import encode_bags

        symmetries = bag_symmetries(options.seed, options.bag_symmetries,
                                    volume_input.spacing_mm)
        bag_files = encode_bags({i: volumes[i] for i in usable}, options.gmcae, volume_input,
                                symmetries, run_dir / BAGS_DIR, head=options.head,
                                block=options.mil_block)
    ctx = _Context(cohort, options, volume_input, Path(data_dir), bag_files, resume)
    if options.folds >= 2:
        result = _cross_validate(run_dir, folds, ctx)
    else:
        result = _one_split(run_dir, ctx)
    if result is not None:
        result["options"] = options.to_saved()
        path = run_dir / METRICS_NAME
        write_json(path, result)
        logger.debug("wrote %s", path)  # the command prints it
    runs.wait_for_workers(options.distribute)
    return result


def _one_split(run_dir: Path, ctx: _Context) -> dict[str, Any] | None:
    from kdsb.models.calibration import fit_calibration, method_for

    cohort, options = ctx.cohort, ctx.options
    train_ids, val_ids = _split(cohort, sorted(cohort), options, "all patients")
    _pin_split(run_dir, {"train_ids": train_ids, "val_ids": val_ids}, ctx)
    fitted = _fit_model(run_dir, train_ids, val_ids, ctx)
    if fitted is None:
        return None
    p_val = fitted.p_val
    y_val = [cohort[i][1] for i in val_ids]
    # A class of one patient stays in training (`split_patients`), so the validation
    # patients may be of one class (found in review: a Platt map fitted on them).
    method = method_for(len(val_ids), options.calibration, one_class=len(set(y_val)) < 2)
    calibration = fit_calibration(y_val, p_val, method)
    _save_calibrated(run_dir, calibration, ctx.volume_input)
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


def _cross_validate(run_dir: Path, folds: list[list[str]], ctx: _Context) -> dict[str, Any] | None:
    """Train one model per fold on the other folds; score, calibrate and save them all (a
    worker other than the chief only trains, and returns None)."""
    from kdsb.models.calibration import fit_calibration, method_for

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
            train_ids, val_ids = _split(cohort, rest, options, f"fold {k}")
            _pin_split(fold_dir, {"held_out": held_out, "train_ids": train_ids,
                                  "val_ids": val_ids}, ctx)
            fitted = _fit_model(fold_dir, train_ids, val_ids, ctx)
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
    p_cal = np.empty_like(p_raw)
    for k in range(1, len(folds) + 1):
        inside = fold == k
        p_cal[inside] = fit_calibration(y[~inside], p_raw[~inside], method).apply(
            p_raw[inside]
        )
    members = [_save_calibrated(run_dir / f"{FOLD_PREFIX}{k}", calibration, ctx.volume_input)
               for k in range(1, len(folds) + 1)]
    _save_ensemble(run_dir, members, ctx.volume_input)
    _write_oof(run_dir / OOF_NAME, ids, p_cal, fold, y, p_raw)
    _warn_if_calibration_hurt(y, p_raw, p_cal, method)
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


def _warn_if_calibration_hurt(y: np.ndarray, p_raw: np.ndarray, p_cal: np.ndarray,
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


def _check_fold_training_unchanged(run_dir: Path, options: ClassifierOptions) -> None:
    """Folds already finished were trained with the epochs and patience in config.json (as
    the run last saved it): the remaining folds must be too, or the ensemble and its
    metrics.json would mix trainings.

    Raises:
        UsageError: --epochs or --patience differs from config.json.
    """
    try:
        saved = json.loads((run_dir / runs.OPTIONS_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return  # resolve_options has said what it could of a missing or broken config.json
    for key in ("epochs", "patience"):
        if key in saved and saved[key] != getattr(options, key):
            raise UsageError(f"expected --{key} {saved[key]} as the finished folds of {run_dir} "
                             f"were trained, received {getattr(options, key)}: a "
                             "cross-validated run's folds share their training")


def _pin_split(model_dir: Path, split: dict[str, list[str]], ctx: _Context) -> None:
    """`runs.pin_split` of a model of this run (a fold's falls back on its fold.json)."""
    runs.pin_split(model_dir, split, ctx.resume, runs.worker(ctx.options.distribute).chief,
                   FOLD_NAME)


def _check_input_unchanged(run_dir: Path, volume_input: VolumeInput, gmcae: str | os.PathLike,
                           gmcae_sha256: str) -> None:
    """Refuse to resume a run whose models read their volumes otherwise than this run would
    (the volumes preprocessed again at another spacing: its finished models would then be
    declared to read the new grid), or whose GMCAE file `gmcae` has other content than the run
    began with (it may have moved; a record without the GMCAE's digest, of an earlier version,
    is not checked for content, and then the GMCAE may not move)."""
    path = run_dir / INPUT_NAME
    if not path.is_file():
        # Killed before it was written (or a run of an earlier version): no digest, so the
        # GMCAE may not move (found in review: any --gmcae then slipped through).
        began_with = read_json(run_dir / runs.OPTIONS_NAME).get("gmcae", gmcae)
        if os.path.realpath(str(began_with)) != os.path.realpath(str(gmcae)):
            raise UsageError(
                f"expected --resume with the GMCAE the run began with, {began_with}, received "
                f"{gmcae}: the run has no {INPUT_NAME} with its digest to tell a moved file "
                f"from another one")
        return
    saved = read_json(path)
    before = VolumeInput.from_config(saved, str(path))
    if before != volume_input:
        changed = {key: (value, volume_input.to_config()[key])
                   for key, value in before.to_config().items()
                   if value != volume_input.to_config()[key]}
        raise UsageError(
            "expected --resume on volumes read as the run began, received "
            + "; ".join(f"{key} {old} then, {new} now" for key, (old, new) in changed.items())
            + f" ({path}): preprocess as before or start a new RUN_DIR"
        )
    if saved.get("gmcae_sha256") not in (None, gmcae_sha256):
        raise UsageError(
            f"expected --resume with the GMCAE the run began with ({saved.get('gmcae')}), "
            f"received {gmcae}, whose content differs ({path}): start a new RUN_DIR"
        )
    moved = os.path.realpath(str(saved.get("gmcae", gmcae))) != os.path.realpath(str(gmcae))
    if moved and saved.get("gmcae_sha256") is None:
        raise UsageError(
            f"expected --resume with the GMCAE the run began with, {saved.get('gmcae')}, "
            f"received {gmcae}: this run's record ({path}) has no digest to tell a moved file "
            f"from another one"
        )


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


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value
