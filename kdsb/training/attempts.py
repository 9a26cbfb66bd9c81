"""The attempts of a model restarted on the base-rate plateau (`kdsb.training.model_fitting`):
each abandoned attempt's files kept aside, and the least stuck attempt restored when every one
was stuck.

A model folder holds the live attempt (its models, `history.csv`, checkpoints) and, for the
N-th abandoned attempt (from 1), `collapsed_N_<model>` and `collapsed_N_history.csv`.
`restarts.json` lists the abandoned attempts' records in order ({"seed", "explained_fraction",
"validation_spread", "validation_predictions", "epochs"}). When the last attempt is stuck too,
its record is added and the least stuck record gets "kept": true; that attempt's files are then
the live ones again and the last attempt's are set aside in its place, its checkpoints removed
(nothing moves when the last is the least stuck). A run resumed after that trains nothing.
With `--restarts 0` nothing is recorded: the only attempt stands, and resumes, as trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kdsb.training import runs

if TYPE_CHECKING:
    from kdsb.training.classifier_options import ClassifierOptions

KEPT_KEY = "kept"
RESTARTS_NAME = "restarts.json"
# A restart's seed lies this far from the previous attempt's (beyond any epoch offset of a
# resumed data stream).
RESTART_SEED_STRIDE = 100_000


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` (0: the run's own): `RESTART_SEED_STRIDE` further each
    time, wrapping below `MAX_SEED` (found in review: a seed near 2**31 failed the options'
    check at its first restart, after a whole attempt had trained)."""
    from kdsb.training.runs.options import MAX_SEED

    return (seed + attempt * RESTART_SEED_STRIDE) % MAX_SEED


def restarts_apply(options: ClassifierOptions) -> bool:
    """Whether a stuck model is trained again: not in a distributed run (its workers would have
    to agree)."""
    return options.distribute == "none"


def aside_prefix(number: int) -> str:
    """The prefix of abandoned attempt `number`'s files (from 1)."""
    return f"collapsed_{number}_"


def set_aside(model_dir: str | os.PathLike, number: int, models: Sequence[str]) -> None:
    """Set the live attempt's `models` and history aside as abandoned attempt `number` and
    clear its checkpoints, so the folder is ready for a fresh start."""
    runs.discard_training(model_dir, aside_prefix(number), tuple(models))


def least_stuck(records: Sequence[dict]) -> int:
    """Index of the record to keep when every attempt was stuck: the largest explained fraction
    (None, one class among the validation patients, ranks lowest), then the widest validation
    spread; the latest of equals. Records written before attempts were set aside (without
    "validation_predictions": no model to restore) are not candidates; the last record always
    is."""
    def rank(index: int) -> tuple[float, float, int]:
        explained = records[index]["explained_fraction"]
        return (-math.inf if explained is None else explained,
                records[index]["validation_spread"], index)

    candidates = [i for i, record in enumerate(records)
                  if "validation_predictions" in record or i == len(records) - 1]
    return max(candidates, key=rank)


def kept_index(records: Sequence[dict]) -> int | None:
    """Index of the record marked kept, or None while attempts go on."""
    return next((i for i, record in enumerate(records) if record.get(KEPT_KEY)), None)


def restore_kept(model_dir: str | os.PathLike, records: Sequence[dict],
                 models: Sequence[str]) -> None:
    """Make the kept attempt's files the live ones, each live file (the last attempt's) set
    aside first. File by file, so a run killed half-way finishes on `--resume`: a file whose
    kept copy is gone is done."""
    model_dir = Path(model_dir)
    number = kept_index(records) + 1
    if number == len(records):
        return  # the last attempt is the least stuck: its files, checkpoints too, stay live
    kept, last = aside_prefix(number), aside_prefix(len(records))
    runs.remove_checkpoints(model_dir)  # the last attempt's
    for name in (*models, runs.HISTORY_NAME):
        stored = model_dir / f"{kept}{name}"
        if not stored.is_file():
            continue
        if (model_dir / name).is_file():
            (model_dir / name).replace(model_dir / f"{last}{name}")
        stored.replace(model_dir / name)
