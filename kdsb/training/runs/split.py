"""Which patients a model trains on, validates on (and holds out): recorded before it trains
(`SPLIT_NAME`), and compared when it resumes. With volumes or labels changed since, a resumed
model would train on its validation patients, or score patients it trained on as unseen. The
volume files as they were when the run began (`VOLUMES_NAME`): one written again since (say,
preprocessed again after a lung-mask fix) is warned of on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from kdsb.errors import KdsbError, UsageError
from kdsb.io.atomic import read_json, write_json
from kdsb.io.tables import summarise_ids

logger = logging.getLogger(__name__)

SPLIT_NAME = "split.json"
VOLUMES_NAME = "volumes.json"  # id → `kdsb.io.journal.volume_stamp` of each volume file


def check_split(model_dir: str | os.PathLike, split: dict[str, list[str]], resume: bool,
                fallback: str | None = None) -> None:
    """Refuse to resume a model on other patients than those it was begun on. Starting afresh
    (`resume` off) nothing is compared: the record is replaced.

    Args:
        model_dir: the model's folder (a run folder, or a fold's).
        split: key ("train_ids", "val_ids", "held_out") → patient ids, as this run makes them.
        resume: whether the model resumes.
        fallback: a record of an earlier version holding the same keys, read when there is no
            `SPLIT_NAME` (a classifier fold's fold.json).

    Raises:
        UsageError: the model was begun on another split.
        KdsbError: its record is unreadable.
    """
    model_dir = Path(model_dir)
    path = model_dir / SPLIT_NAME
    record = path if path.is_file() or fallback is None else model_dir / fallback
    if not (resume and record.is_file()):
        return
    begun = read_json(record)
    for key, ids in split.items():
        if begun.get(key) != ids:
            other = sorted(set(begun.get(key, [])) ^ set(ids)) or ids
            raise UsageError(
                f"expected {model_dir} to resume on the patients it began with, received "
                f"other {key} (e.g. {other[0]}): the volumes or labels changed since; "
                "start a new run folder"
            )


def pin_split(model_dir: str | os.PathLike, split: dict[str, list[str]], resume: bool,
              chief: bool = True, fallback: str | None = None) -> None:
    """`check_split`, then record `split` (the chief only; a resumed model keeps its record)."""
    check_split(model_dir, split, resume, fallback)
    path = Path(model_dir) / SPLIT_NAME
    if chief and not (path.is_file() and resume):
        write_json(path, split)


def note_volumes(run_dir: str | os.PathLike, volumes: Mapping[str, Path], resume: bool,
                 chief: bool = True) -> None:
    """Record the run's volume files as they are (bytes, modification time, inode:
    `volume_stamp`); resuming, warn of
    those written since the run began: its finished epochs, folds or cached bags were made of
    the former ones (found in review: a cross-validated run resumed after `preprocess
    --overwrite` mixed both without a word). A warning, not a refusal: a copy of the volumes
    that did not keep modification times changes them too.
    """
    from kdsb.io.journal import volume_stamp

    path = Path(run_dir) / VOLUMES_NAME
    now = {patient_id: volume_stamp(volume) for patient_id, volume in volumes.items()}
    if resume and path.is_file():
        try:
            begun = read_json(path)
        except KdsbError:
            begun = {}
        changed = sorted(i for i in now if i in begun and begun[i] != now[i])
        if changed:
            logger.warning("%d volume file(s) written again since %s began: %s; what it has "
                           "trained, scored or cached already was made of the former ones "
                           "(start a new run folder to train on these alone)", len(changed),
                           run_dir, summarise_ids(changed))
        return
    if chief:
        write_json(path, now)
