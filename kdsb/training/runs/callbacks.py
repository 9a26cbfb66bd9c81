"""The kdsb Keras callbacks (NaN guard, epoch checkpoints and best model, giving up on a run that
learns nothing) and which way a monitored value improves."""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import Any

from kdsb.errors import TrainingError
from kdsb.training.runs.folder import (
    checkpoint_path,
    copy_model_atomically,
    last_checkpoint,
    list_checkpoints,
    save_model_atomically,
)

logger = logging.getLogger(__name__)


# Monitored quantities whose larger values are better ("auto" mode); everything else is a loss.
HIGHER_IS_BETTER = ("acc", "accuracy", "auc", "precision", "recall")


# Shared by both training commands: --clipnorm and --variance-floor are train-gmcae's only.
NAN_ADVICE = "try a lower --lr (train-gmcae: or a lower --clipnorm, a larger --variance-floor)"


def higher_is_better(monitor: str) -> bool:
    name = monitor.removeprefix("val_")
    return any(name == key or name.endswith(f"_{key}") for key in HIGHER_IS_BETTER)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number (a string, an array): nothing to check


def best_so_far(rows: list[dict[str, str]], monitor: str, higher_is_better: bool) -> float | None:
    values = [float(row[monitor]) for row in rows if _finite(row.get(monitor, "nan"))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    return max(values) if higher_is_better else min(values)


def best_row(rows: list[dict[str, str]], monitor: str, higher_is_better: bool) -> int | None:
    """The index of the row whose model is the best of these rows: the first at `best_so_far`,
    or the last row when none logged a finite value (`EpochCheckpoint` then keeps the latest
    model); None without rows."""
    return len(rows) - 1 - epochs_since_best(rows, monitor, higher_is_better) if rows else None


def best_epoch(rows: list[dict[str, str]], monitor: str, higher_is_better: bool) -> int | None:
    """The epoch (from 1, as checkpoints count) of `best_row`; None without rows."""
    row = best_row(rows, monitor, higher_is_better)
    return None if row is None else int(rows[row]["epoch"]) + 1


def restore_best_model(run_dir: Path, best_path: Path, rows: list[dict[str, str]], monitor: str,
                       higher_is_better: bool) -> None:
    """On resume, make the best model the model of the best epoch among the rows kept
    (`rows`), copied from its checkpoint where that is still on disk.

    `EpochCheckpoint` writes the best model as a copy of the epoch's checkpoint, after it: a
    kill between the two leaves a better epoch's checkpoint without its copy, and a newest
    checkpoint that no longer loads drops the epochs after the one resumed while the best
    model may hold one of them (found in review: the best model and its reported epoch then
    disagreed). Either way the kept rows' best epoch is the truth. (`EpochCheckpoint` keeps
    that epoch's checkpoint whatever `--keep-checkpoints`; a run folder of an earlier version
    may lack it, and then the best model is left as it is.)
    """
    epoch = best_epoch(rows, monitor, higher_is_better)
    if epoch is None:
        return
    source = checkpoint_path(run_dir, epoch)
    if not source.is_file():
        return
    if not _whole_archive(source):  # damaged since: the best model is left as it is
        logger.warning("%s: does not open (damaged?): %s is left as it is", source, best_path)
        return
    copy_model_atomically(source, best_path)


def _whole_archive(path: Path) -> bool:
    """Whether a saved model (.keras, a zip archive) reads back whole: every member's CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def epochs_since_best(rows: list[dict[str, str]], monitor: str, higher_is_better: bool) -> int:
    """Epochs logged after the first one at `best_so_far` (how long early stopping has waited
    when a run resumes after these rows); 0 without a finite value."""
    best = best_so_far(rows, monitor, higher_is_better)
    if best is None:
        return 0
    first = next(i for i, row in enumerate(rows)
                 if _finite(row.get(monitor, "nan")) and float(row[monitor]) == best)
    return len(rows) - 1 - first


def epochs_under(rows: list[dict[str, str]], name: str, floor: float) -> int:
    """The number of last rows in a row whose logged `name` lies under `floor`."""
    count = 0
    for row in reversed(rows):
        if not (_finite(row.get(name, "nan")) and float(row[name]) < floor):
            break
        count += 1
    return count


def callback_classes():
    """The kdsb callbacks; defined lazily because they subclass a Keras class."""
    import keras

    class NonFiniteGuard(keras.callbacks.Callback):
        """Raise `TrainingError` at the first batch or epoch whose logs hold a NaN or an Inf.

        Placed first among the callbacks, so no checkpoint, best model or history row of a
        non-finite model is written after it fires. Checking every batch reads the loss back
        from the device each step; that costs little next to a 3D convolution step, and it
        stops a diverged run at once instead of an epoch later.
        """

        def __init__(self, run_dir: Path):
            super().__init__()
            self.run_dir = run_dir
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def _check(self, logs, where: str) -> None:
            bad = sorted(k for k, v in (logs or {}).items() if not _finite(v))
            if not bad:
                return
            last = last_checkpoint(self.run_dir)
            good = f"{last[1]} (epoch {last[0]})" if last else "none (no epoch completed)"
            raise TrainingError(
                f"training stopped: {bad[0]} became NaN or infinite at epoch {self.epoch + 1} "
                f"{where}; last good checkpoint: {good}; {NAN_ADVICE}"
            )

        def on_train_batch_end(self, batch, logs=None):
            self._check(logs, f"batch {batch + 1}")

        def on_epoch_end(self, epoch, logs=None):
            self._check(logs, "(validation)")

    class EpochCheckpoint(keras.callbacks.Callback):
        """After every epoch: save `checkpoints/epoch_NNNN.keras` and then, when better, copy it
        as the best model.

        Both writes are atomic; a kill between them is mended on resume
        (`restore_best_model`). `keep` bounds how many epoch checkpoints stay on disk (the
        newest ones, and the best epoch's, which `restore_best_model` copies from; None keeps
        all). `best` is the best monitored value of earlier epochs and `best_epoch` its epoch
        (from 1), so a resumed run only replaces the best model with a better one.
        """

        def __init__(
            self,
            run_dir: Path,
            best_name: str,
            monitor: str,
            higher_is_better: bool,
            best: float | None,
            best_epoch: int | None,
            keep: int | None,
        ):
            super().__init__()
            self.run_dir = run_dir
            self.best_path = run_dir / best_name
            self.monitor = monitor
            self.higher_is_better = higher_is_better
            self.best, self.best_epoch = best, best_epoch
            self.keep = keep
            self._warned = False

        def on_epoch_end(self, epoch, logs=None):
            # The checkpoint before the best model: a best model never comes from an epoch a
            # resumed run drops (the one after its newest checkpoint).
            logs = logs or {}
            value = logs.get(self.monitor)
            if value is None:
                if not self._warned:
                    logger.warning("%s not logged: saving the latest model as best", self.monitor)
                    self._warned = True
                improved = True
            else:
                value = float(value)
                improved = self.best is None or (
                    value > self.best if self.higher_is_better else value < self.best
                )
            checkpoint = save_model_atomically(self.model, checkpoint_path(self.run_dir, epoch + 1))
            if improved:
                if value is not None:
                    logger.info("epoch %d: %s improved to %.6g", epoch + 1, self.monitor, value)
                    self.best = value
                copy_model_atomically(checkpoint, self.best_path)
                self.best_epoch = epoch + 1
            self._prune()

        def _prune(self) -> None:
            if self.keep is None:
                return
            found = list_checkpoints(self.run_dir)
            for number, path in found[: max(0, len(found) - self.keep)]:
                if number != self.best_epoch:
                    path.unlink(missing_ok=True)

    class GiveUpBelow(keras.callbacks.Callback):
        """Stop training once the logged value `name` stayed under `floor` for `patience`
        epochs in a row (`under`: the epochs so far, of the rows before a resume)."""

        def __init__(self, name: str, floor: float, patience: int, under: int = 0):
            super().__init__()
            self.name, self.floor, self.patience = name, floor, patience
            self.under = under

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.name)
            self.under = self.under + 1 if value is not None and value < self.floor else 0
            if self.under >= self.patience:
                logger.info("epoch %d: %s under %g for %d epochs: the run learns nothing, "
                            "stopped", epoch + 1, self.name, self.floor, self.under)
                self.model.stop_training = True

    class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
        """Keras's early stopping, which on a resumed run goes on from the best value and the
        wait of the rows before it (Keras's own starts afresh: the first resumed epoch always
        counted as the best, and the patience restarted, so a resumed run could train past
        the point where the uninterrupted one stopped and keep another model), and which
        stops no run before `min_epochs` epochs: the run then ends at the later of its
        patience's end and `min_epochs`. (Keras's `start_from_epoch` is another rule: it
        ignores the epochs before it, best ones too.)"""

        def __init__(self, best: float | None, wait: int, min_epochs: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.resumed_best, self.resumed_wait = best, wait
            self.min_epochs = min_epochs

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self.resumed_best is not None:
                self.best, self.wait = self.resumed_best, self.resumed_wait

        def on_epoch_end(self, epoch, logs=None):
            stopping = self.model.stop_training  # another callback's decision stands
            super().on_epoch_end(epoch, logs)
            if not stopping and self.model.stop_training and epoch + 1 < self.min_epochs:
                self.model.stop_training = False

    class AveragedWeights(keras.callbacks.SwapEMAWeights):
        """For an optimizer that keeps a moving average of the weights (`use_ema`): the model
        holds the average while it is validated and from the end of each epoch to the start
        of the next, so the history, the best model and the checkpoints are the average's.

        A checkpoint thus holds the average as the model's weights and the raw weights in the
        optimizer's average slots: `resumed` (the model was loaded from one) swaps them back
        before the first epoch. Unlike Keras's callback, the last epoch does not copy the
        average over the raw weights, so a run given more epochs later goes on from the
        weights it trained, as an uninterrupted run would (`history.model` ends with the raw
        weights: Keras copies the slots over the model's variables when `fit` ends).
        """

        def __init__(self, resumed: bool):
            super().__init__(swap_on_epoch=True)
            self._ema_weights_in_model = resumed  # Keras's record of which side the model holds

        def on_epoch_end(self, epoch, logs=None):
            if not self._ema_weights_in_model:
                self._swap_variables()
                self._ema_weights_in_model = True

    return NonFiniteGuard, EpochCheckpoint, GiveUpBelow, ResumedEarlyStopping, AveragedWeights
