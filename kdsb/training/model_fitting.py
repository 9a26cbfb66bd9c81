"""Training one classifier model (of a single split, or of a fold): its class weights, its
restarts on the base-rate plateau, its scores on the validation patients and its calibrated
model file.

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

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kdsb.data.inputs import VolumeInput
from kdsb.evaluation.metrics import CONSTANT_SPREAD, prediction_spread
from kdsb.io.atomic import read_json, write_json
from kdsb.io.run_layout import BEST_NAME, UNCALIBRATED_NAME
from kdsb.training import attempts, runs
from kdsb.training.classifier_options import ClassifierOptions
from kdsb.training.plateau import GIVE_UP_MONITOR, LEARNED_FRACTION, explained_fraction
from kdsb.training.run_context import RunContext, score_patients

logger = logging.getLogger(__name__)

# The metric picking the best model: the `log_loss` metric of `spp.compile_classifier`, on
# validation data.
MONITOR = "val_log_loss"


class Fitted(NamedTuple):
    """A trained model of a run (or of a fold)."""

    p_val: np.ndarray  # raw p(cancer) of the validation patients
    model: Any  # the best uncalibrated model
    collapsed_seeds: list[int]  # seeds of the attempts abandoned on the base-rate plateau


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


def fit_model(model_dir: Path, train_ids: list[str], val_ids: list[str],
              ctx: RunContext) -> Fitted | None:
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
        logger.info("%s had finished training (every attempt stuck, the least stuck kept: %s): "
                    "nothing to train; its scores are computed again", model_dir,
                    attempts.RESTARTS_NAME)
        return _kept_attempt(model_dir, records, models)
    y_val = [ctx.cohort[i][1] for i in val_ids]
    while True:
        seed = attempts.attempt_seed(ctx.options.seed, len(records))
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
        if not stuck or not attempts.restarts_apply(ctx.options):
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
                       attempts.attempt_seed(ctx.options.seed, len(records)), len(records),
                       ctx.options.restarts)
        # Set aside before the record is written: a kill in between retrains the same attempt.
        attempts.set_aside(model_dir, len(records), models)
        write_json(restarts_path, records)


def _kept_attempt(model_dir: Path, records: list[dict], models: tuple[str, ...]) -> Fitted:
    """The attempt kept when every one was stuck, its files made the live ones again."""
    from kdsb.models.classifier import load_classifier

    attempts.restore_kept(model_dir, records, models)
    kept = records[attempts.kept_index(records)]
    return Fitted(np.asarray(kept["validation_predictions"]),
                  load_classifier(model_dir / UNCALIBRATED_NAME),
                  [r["seed"] for r in records if r is not kept])


def _fit_once(model_dir: Path, train_ids: list[str], val_ids: list[str], ctx: RunContext,
              options: ClassifierOptions) -> Fitted | None:
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
    return Fitted(p_val, best, [])


def save_calibrated(model_dir: Path, calibration, volume_input: VolumeInput) -> Any:
    """Write `classifier.keras`: the uncalibrated model, its calibration and the record of how
    it reads a volume (the model-input contract: it travels with the file); returns it."""
    from kdsb.models.calibration import with_calibration
    from kdsb.models.classifier import load_classifier
    from kdsb.models.input_record import with_input_record

    model = with_calibration(load_classifier(model_dir / UNCALIBRATED_NAME), calibration)
    model = with_input_record(model, volume_input.to_config())
    runs.save_model_atomically(model, model_dir / BEST_NAME)
    return model
