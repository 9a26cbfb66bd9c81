"""A run from start to end: `begin` (strategy, config.json, seeds, precision), then `train` /
`fit` (build or resume the model, train with the callbacks, write the run folder)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdsb.errors import KdsbError, TrainingError, first_line
from kdsb.io.atomic import read_json, write_json
from kdsb.training.runs.callbacks import (
    best_epoch,
    best_so_far,
    callback_classes,
    epochs_since_best,
    epochs_under,
    higher_is_better,
    restore_best_model,
)
from kdsb.training.runs.devices import (
    configure_runtime,
    distribute_data,
    distribution_strategy,
    keras_verbosity,
    worker,
)
from kdsb.training.runs.folder import (
    CHECKPOINT_DIR,
    HISTORY_NAME,
    TENSORBOARD_DIR,
    check_run_dir,
    list_checkpoints,
    load_saved_model,
    remove_stale_files,
    truncate_history,
)
from kdsb.training.runs.options import OPTIONS_NAME, RUN_KIND_KEY, RunOptions

logger = logging.getLogger(__name__)

FINISHED_NAME = "finished.json"  # how a run's training ended: epochs run, stopped early


def begin(run_dir: str | os.PathLike, options: RunOptions, *, data_dir: str | os.PathLike,
          seed: int | None = None, resume: bool = False) -> None:
    """Create the distribution strategy, write the run's options (config.json, with `data_dir`,
    or when resuming the data folder the run began with; the chief only), then seed (`seed`,
    else `options.seed`) and set the precision.

    Call it once the data is checked, before building datasets or models and before any other
    TensorFlow op: a multi-worker strategy must start TensorFlow's collective ops first.
    """
    distribution_strategy(options.distribute)
    if worker(options.distribute).chief:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / OPTIONS_NAME,
                   {**options.to_saved(), RUN_KIND_KEY: options.RUN_KIND,
                    "data_dir": _begun_with(run_dir, data_dir)
                    if resume else str(Path(data_dir).resolve())})
        if not resume:
            # A former run's, in a folder whose checkpoints were deleted: a resume after this
            # start stopped (in the minutes before training) would take that run's model as
            # this one's, finished (found in review).
            (run_dir / FINISHED_NAME).unlink(missing_ok=True)
    configure_runtime(seed=options.seed if seed is None else seed, precision=options.precision)


def _begun_with(run_dir: Path, data_dir: str | os.PathLike) -> str:
    """The data folder config.json records: the one the run began with (a resumed run keeps
    it, so a resume refused after this point leaves the record true), else `data_dir`."""
    try:
        begun = json.loads((run_dir / OPTIONS_NAME).read_text()).get("data_dir")
    except (OSError, ValueError, AttributeError):
        begun = None
    return begun if isinstance(begun, str) else str(Path(data_dir).resolve())


def train(
    build_model: Callable[[], Any],
    train_data: Any,
    val_data: Any,
    run_dir: str | os.PathLike,
    options: RunOptions,
    *,
    resume: bool,
    best_name: str,
    steps_per_epoch: int,
    validation_steps: int | None = None,
    monitor: str = "val_loss",
    prepare_model: Callable[[Any], Any] | None = None,
    give_up_below: tuple[str, float] | None = None,
) -> Any:
    """`fit` with a run's options: epochs, patience, checkpoints kept, distribution strategy
    (`give_up_below` as in `fit`).

    Under multiworker, `train_data` is this worker's own stream (its share of the data, batches
    of its share of the global batch) and `val_data` the whole validation set, which every
    worker evaluates (the metrics then equal one worker's); `steps_per_epoch` counts this
    worker's batches.

    Returns:
        The `keras.callbacks.History` of the epochs run now.
    """
    return fit(
        build_model,
        train_data,
        val_data,
        run_dir,
        epochs=options.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        resume=resume,
        best_name=best_name,
        monitor=monitor,
        early_stopping_patience=options.patience,
        early_stopping_min_epochs=options.min_epochs,
        give_up_below=give_up_below,
        keep_checkpoints=options.keep_checkpoints,
        strategy=distribution_strategy(options.distribute),
        verbose=keras_verbosity(options.distribute),
        prepare_model=prepare_model,
    )


def fit(
    build_model: Callable[[], Any],
    train_data: Any,
    val_data: Any,
    run_dir: str | os.PathLike,
    *,
    epochs: int,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    resume: bool = False,
    best_name: str = "model.keras",
    monitor: str = "val_loss",
    early_stopping_patience: int | None = None,
    early_stopping_min_epochs: int = 0,
    give_up_below: tuple[str, float] | None = None,
    keep_checkpoints: int | None = None,
    strategy: Any = None,
    verbose: int | str = "auto",
    prepare_model: Callable[[Any], Any] | None = None,
) -> Any:
    """Train a model into a run folder, with per-epoch checkpoints, resume and a NaN guard.

    Args:
        build_model: called with no argument, returns a compiled Keras model. It runs inside
            `strategy.scope()`, and only when training starts afresh (a resumed run loads its
            model, compiled with its optimizer state, from the last checkpoint).
        train_data: what `keras.Model.fit` accepts as `x` (a tf.data.Dataset of (x, y) batches).
        val_data: validation data in the same form, or None.
        run_dir: the run folder (created if missing); its layout: the package docstring
            (`kdsb.training.runs`).
        epochs: the total number of epochs of the run (not the number still to do).
        steps_per_epoch: batches per epoch (needed for endless datasets).
        validation_steps: validation batches per epoch (needed for endless datasets).
        resume: continue from the newest checkpoint of `run_dir`: its model and optimizer
            state, epoch numbering (`initial_epoch`), best value so far and history.csv (rows
            of epochs after the checkpoint are dropped, so every epoch appears once), the best
            model made the kept rows' best epoch's again (`restore_best_model`). With no
            checkpoint yet (killed during the first epoch) training starts afresh, with a
            warning (the command line refuses `--resume` only where no run was begun).
        best_name: file name of the best model inside `run_dir`.
        monitor: logged quantity that picks the best model (and drives early stopping):
            larger is better for accuracy/AUC-like names (`HIGHER_IS_BETTER`), else smaller.
        early_stopping_patience: stop after this many epochs without improvement of
            `monitor` (None: never). Resumed, the patience counts on from the history's best
            epoch, as in an uninterrupted run (the resumed epochs' data are drawn anew).
        early_stopping_min_epochs: the patience ends no run before this many epochs in all
            (a model that learns late is not stopped on its early plateau); `give_up_below`
            still may.
        give_up_below: (logged name, floor): also stop once that value stayed under the floor
            for `early_stopping_patience` epochs in a row (a run that learns nothing; e.g. a
            classifier's `val_prediction_spread`, `kdsb.models.spread`; counted on across a
            resume too).
        keep_checkpoints: keep only the newest this many epoch checkpoints (None: all).
        strategy: a `tf.distribute` strategy (None: the default one); see
            `distribution_strategy`. Under multiworker, only the chief writes `run_dir`
            (`strategy.extended.should_checkpoint`); the others write into a temporary folder
            that is removed before returning, and all of them resume from `run_dir`.
        verbose: passed to `keras.Model.fit`.
        prepare_model: called with the model, built or loaded from a checkpoint, before it
            trains; returns the model. For how its steps are computed, not what is saved
            (`kdsb.models.slabs`): a loaded checkpoint computes the plain way again.

    Returns:
        The `keras.callbacks.History` of the epochs run now; `history.model` is the trained
        model (its latest weights; the best ones are in `run_dir/best_name`).

    Raises:
        UsageError: `run_dir` already holds checkpoints but `resume` is False.
        TrainingError: the loss or a metric became NaN or infinite; the message names the epoch,
            the batch and the last good checkpoint, which stays loadable.
    """
    import tensorflow as tf

    run_dir = Path(run_dir)
    strategy = strategy or tf.distribute.get_strategy()
    # The chief writes the run folder; another worker of a multi-worker run writes the same
    # files (every worker must save: saving may read variables collectively) into a temporary
    # folder of its own, removed at the end. All of them read the run folder to resume.
    chief = strategy.extended.should_checkpoint
    out_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="kdsb-worker-"))
    try:
        return _fit(build_model, train_data.element_spec, distribute_data(strategy, train_data),
                    distribute_data(strategy, val_data), run_dir, out_dir, strategy, epochs=epochs,
                    steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                    resume=resume, best_name=best_name, monitor=monitor,
                    early_stopping_patience=early_stopping_patience,
                    early_stopping_min_epochs=early_stopping_min_epochs,
                    give_up_below=give_up_below,
                    keep_checkpoints=keep_checkpoints, verbose=verbose,
                    prepare_model=prepare_model)
    finally:
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)


def _newest_loadable_checkpoint(run_dir: Path, strategy) -> tuple[int, Path, Any]:
    """(epoch, path, compiled model) of the newest checkpoint that loads: a damaged one (cut
    short by a copy or a disk fault: found by a user's check, Keras said "File not found" in a
    traceback) is passed over with a warning, and its epochs are trained again.

    Raises:
        TrainingError: no checkpoint of the run loads.
    """
    checkpoints = list_checkpoints(run_dir)
    reason = ""
    for number, (epoch, path) in enumerate(reversed(checkpoints)):
        try:
            with strategy.scope():
                return epoch, path, load_saved_model(path, compile=True)
        except TrainingError as error:
            reason = first_line(error.__cause__)
            older = number + 1 < len(checkpoints)
            logger.warning("%s: does not load (%s)%s", path, reason,
                           "; resuming from the checkpoint before it if that loads"
                           if older else "")
    raise TrainingError(f"{run_dir / CHECKPOINT_DIR}: expected a checkpoint that loads, "
                        f"received none that does (the last: {reason}): restore them, or "
                        "start afresh in a new folder")


def _build_training_state(model, batch_spec) -> None:
    """Create the optimizer's slots and the compiled metrics' and loss's variables before `fit`
    (`batch_spec`: the training dataset's element spec). Keras creates them inside the first
    training step otherwise, and a tf.function that creates variables is traced a second time:
    ~40 % of a small run's start-up (a tiny GMCAE's first epoch 10 → 6 s), paid again by every
    fold and restart. `_symbolic_build` is the Keras trainer's own (private) step for this,
    which Keras's TensorFlow `fit` runs itself only for a model made under a distribution
    strategy; a Keras without it trains the same, traced twice."""
    build = getattr(model, "_symbolic_build", None)
    if build is not None:
        build(data_batch=batch_spec)


def _fit(build_model, batch_spec, train_data, val_data, run_dir: Path, out_dir: Path, strategy, *,
         epochs, steps_per_epoch, validation_steps, resume, best_name, monitor,
         early_stopping_patience, early_stopping_min_epochs, give_up_below, keep_checkpoints,
         verbose, prepare_model):
    """`fit` reading the run from `run_dir` and writing into `out_dir`."""
    import keras

    chief = out_dir == run_dir
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_files(run_dir)
    higher = higher_is_better(monitor)
    history_path = out_dir / HISTORY_NAME
    last = check_run_dir(run_dir, resume)
    # A finished run whose checkpoints were deleted to save space keeps its best model.
    ended = last[1] if last is not None else run_dir / best_name if resume else None
    if (ended is not None and ended.is_file()
            and finished_training(run_dir, epochs, early_stopping_patience,
                                  early_stopping_min_epochs)):
        # Resumed after it ended (killed while its results were written): training more
        # epochs would give another model than the uninterrupted run.
        logger.info("%s had finished training (%s): nothing to train", run_dir, FINISHED_NAME)
        history = keras.callbacks.History()
        if last is not None:
            model = _newest_loadable_checkpoint(run_dir, strategy)[2]
        else:
            with strategy.scope():
                model = load_saved_model(ended, compile=True)
        history.set_model(model)
        history.on_train_begin()  # no epochs: `history.epoch` is empty
        return history
    if resume and last is None and (run_dir / HISTORY_NAME).is_file():
        # Only a run that trained epochs and lost their checkpoints is worth a warning (found
        # by a user's trial: every fold not yet begun, and every restart, warned so).
        logger.warning("no checkpoint in %s: starting afresh", run_dir / CHECKPOINT_DIR)
    if chief:
        (run_dir / FINISHED_NAME).unlink(missing_ok=True)  # a former attempt's, or one to extend
    if last is not None:
        initial_epoch, path, model = _newest_loadable_checkpoint(run_dir, strategy)
        logger.info("resuming from %s (epoch %d of %d)", path, initial_epoch, epochs)
        rows = truncate_history(run_dir / HISTORY_NAME, initial_epoch, write=chief)
        if chief:
            restore_best_model(run_dir, run_dir / best_name, rows, monitor, higher)
    else:
        initial_epoch = 0
        with strategy.scope():
            model = build_model()
        if chief:
            history_path.unlink(missing_ok=True)
        rows = []
    if prepare_model is not None:
        model = prepare_model(model)
    with strategy.scope():
        _build_training_state(model, batch_spec)

    (NonFiniteGuard, EpochCheckpoint, GiveUpBelow, ResumedEarlyStopping,
     AveragedWeights) = callback_classes()
    csv_logger = keras.callbacks.CSVLogger(str(history_path), append=True)
    # Order matters: the guard first (nothing is written for a non-finite model), then the
    # history row, then the checkpoint and the best model (the weights' average swapped in
    # before all of them, when the optimizer keeps one). A kill after the row leaves one row
    # too many, which resuming drops; the reverse order would lose a row for good.
    callbacks = [
        NonFiniteGuard(run_dir),
        csv_logger,
        EpochCheckpoint(
            out_dir,
            best_name,
            monitor,
            higher,
            best_so_far(rows, monitor, higher),
            best_epoch(rows, monitor, higher),
            keep_checkpoints,
        ),
    ]
    # (Mixed float16 wraps the optimizer in a loss-scale optimizer, whose own `use_ema` is off.)
    if getattr(getattr(model.optimizer, "inner_optimizer", model.optimizer), "use_ema", False):
        callbacks.insert(0, AveragedWeights(resumed=last is not None))
    # TensorBoard may be missing from a hand-made environment: the run then goes on unlogged.
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(
            keras.callbacks.TensorBoard(
                log_dir=str(out_dir / TENSORBOARD_DIR), update_freq="epoch", profile_batch=0
            )
        )
    elif chief:
        logger.warning("tensorboard is not installed: no TensorBoard logs in %s", run_dir)
    last_epoch = epochs
    if early_stopping_patience is not None:
        waited = epochs_since_best(rows, monitor, higher)
        under = 0 if give_up_below is None else epochs_under(rows, *give_up_below)
        callbacks.append(
            ResumedEarlyStopping(
                best_so_far(rows, monitor, higher), waited, early_stopping_min_epochs,
                monitor=monitor, patience=early_stopping_patience,
                mode="max" if higher else "min",
            )
        )
        if give_up_below is not None:
            callbacks.append(GiveUpBelow(*give_up_below, early_stopping_patience, under))
        if rows and (under >= early_stopping_patience
                     or (waited >= early_stopping_patience
                         and len(rows) >= early_stopping_min_epochs)):
            # Killed after the epoch that stopped it, before it could end: end it now.
            logger.info("%s had waited %d epochs of its patience %d: it stops here", run_dir,
                        max(waited, under), early_stopping_patience)
            last_epoch = initial_epoch

    if initial_epoch >= last_epoch:
        logger.info("run already has %d of %d epochs: nothing to do", initial_epoch, epochs)
    try:
        history = model.fit(
            train_data,
            validation_data=val_data,
            epochs=last_epoch,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # datasets shuffle themselves; Keras cannot shuffle a tf.data input
        )
    finally:
        csv_logger.on_train_end()  # closes history.csv also when the NaN guard fired
    if chief:
        epochs_run = initial_epoch + len(history.epoch)
        write_json(run_dir / FINISHED_NAME, {"epochs_run": epochs_run,
                                             "stopped_early": epochs_run < epochs,
                                             "patience": early_stopping_patience})
    return history


def finished_training(run_dir: Path, epochs: int, patience: int | None,
                      min_epochs: int = 0) -> bool:
    """Whether the run in `run_dir` ended its training (`FINISHED_NAME`) in a way that these
    settings would not continue: all `epochs` run, or stopped early with the same patience
    after at least `min_epochs` (more epochs after all were run, another patience after an
    early stop, or a larger `min_epochs` than the epochs it ran, train on)."""
    path = run_dir / FINISHED_NAME
    if not path.is_file():
        return False
    done = read_json(path)
    if not (isinstance(done, dict) and {"epochs_run", "stopped_early", "patience"} <= set(done)):
        raise KdsbError(f"{path}: expected a JSON record of epochs_run, stopped_early and "
                        f"patience, received {done!r:.80}: restore it, or start a new folder")
    if done["epochs_run"] >= epochs:
        return True
    if (done["stopped_early"] and done["patience"] == patience
            and done["epochs_run"] >= min_epochs):
        logger.warning("%s stopped early after %d epochs (patience %s): more --epochs alone do "
                       "not train it on; give another --patience to", run_dir,
                       done["epochs_run"], patience)
        return True
    return False
