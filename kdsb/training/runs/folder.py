"""The run folder's files: epoch checkpoints, history.csv, TensorBoard logs, atomic model saves,
and the rule that a fresh start never overwrites a run's checkpoints."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdsb.errors import TrainingError, UsageError, first_line
from kdsb.io.atomic import atomic_path, remove_stale_temporaries, sole_writer

logger = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoints"


CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{4,})\.keras$")


HISTORY_NAME = "history.csv"


TENSORBOARD_DIR = "logs"


RUN_LOCK_NAME = ".kdsb-train.lock"  # held by the run writing RUN_DIR (`sole_run`)


@contextmanager
def sole_run(run_dir: str | os.PathLike, command: str, chief: bool = True) -> Iterator[None]:
    """Hold `run_dir` against a second training run writing it: two resumes of one run (a
    requeued Slurm job beside the one still running) would delete each other's temporaries and
    append their epochs to one history.csv (found in review). Only the chief writes RUN_DIR, so
    the other workers of a multi-worker run hold nothing. As the run ends its lock file goes,
    and so does a RUN_DIR it created and left empty (a run refused before any work).

    Raises:
        UsageError: another run holds `run_dir`.
    """
    if not chief:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / RUN_LOCK_NAME
    try:
        with sole_writer(lock, command, "use another RUN_DIR", remove=True):
            yield
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """The checkpoint written after `epoch` (counted from 1) in `run_dir`."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch_{epoch:04d}.keras"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run as (epoch counted from 1, path), oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := CHECKPOINT_PATTERN.match(path.name))
    )


def last_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint of a run as (epoch counted from 1, path), or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def discard_training(run_dir: str | os.PathLike, prefix: str, models: tuple[str, ...]) -> None:
    """Clear a run folder for a fresh start, keeping its results aside: the `models` it saved
    and its history.csv are renamed `prefix` + name (replacing an earlier copy), its checkpoints
    and TensorBoard logs removed; config.json and other files stay."""
    run_dir = Path(run_dir)
    # Checkpoints first: a kill in between leaves a run that starts afresh, never one that
    # resumes the discarded weights without their history.
    remove_checkpoints(run_dir)
    for name in (*models, HISTORY_NAME):
        if (run_dir / name).is_file():
            (run_dir / name).replace(run_dir / f"{prefix}{name}")


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Remove a run's checkpoints and TensorBoard logs."""
    for folder in (CHECKPOINT_DIR, TENSORBOARD_DIR):
        shutil.rmtree(Path(run_dir) / folder, ignore_errors=True)


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> tuple[int, Path] | None:
    """Refuse to start afresh over a run's checkpoints; returns the newest one (or None).

    `resolve_options` calls it before anything is written into `run_dir`, `fit` again before
    training.

    Raises:
        UsageError: `run_dir` already holds checkpoints but `resume` is False.
    """
    last = last_checkpoint(run_dir)
    if last is not None and not resume:
        raise UsageError(
            f"expected an empty run folder or --resume, received {run_dir} which already holds "
            f"checkpoints up to epoch {last[0]}"
        )
    return last


def save_model_atomically(model: Any, path: str | os.PathLike) -> Path:
    """Save a Keras model to `path` (.keras) through a hidden temporary file and a rename.

    A reader, or a run resumed after a kill, sees either the previous file or the new one,
    never a half-written archive.
    """
    with atomic_path(path) as temp:
        model.save(temp)
    return Path(path)


def copy_model_atomically(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a saved model (.keras) to `path` through a hidden temporary file and a rename."""
    with atomic_path(path) as temp:
        shutil.copyfile(source, temp)
    return Path(path)


def load_saved_model(path: str | os.PathLike, *, compile: bool) -> Any:
    """A model a run saved (a checkpoint, its best model or head), loaded in safe mode.

    Raises:
        TrainingError: the file does not load (cut short by a copy, a disk fault: found in
            review, Keras's traceback said "File not found"), naming it.
    """
    import keras

    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except MemoryError:  # not the file's fault: the command's memory advice says what to do
        raise
    except Exception as error:  # Keras raises many types for a damaged archive
        raise TrainingError(f"{path}: expected a model this run saved, received one that does "
                            f"not load ({first_line(error)}): restore it, or start a new "
                            "folder") from error



def remove_stale_files(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        if folder.is_dir():
            remove_stale_temporaries(folder)


def read_history(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a history.csv written by `fit` (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def truncate_history(path: Path, epochs_done: int, write: bool = True) -> list[dict[str, str]]:
    """Keep the rows of epochs already checkpointed (a kill may have logged one more); rewrite
    the file without the others when `write`."""
    rows = read_history(path)
    kept = [row for row in rows if row["epoch"].isdigit() and int(row["epoch"]) < epochs_done]
    if write and len(kept) != len(rows):
        logger.info("dropping %d history row(s) not covered by a checkpoint", len(rows) - len(kept))
        with atomic_path(path) as temp, temp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(kept)
    return kept
