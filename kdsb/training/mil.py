"""Training the MIL heads on bags of frozen GMCAE features (`kdsb.models.mil`, `.bags`):
encoder cells (`--head mil`) or per-patch NLL (`--head nll`).

The GMCAE is frozen, so only the head trains, on features computed once per volume and
symmetry (`kdsb.training.bags`): an epoch is one pass over the training patients, each bag
under one of its cube symmetries drawn at random, in batches of `--batch-size` bags. It runs on
the training spine (`kdsb.training.runs`: checkpoints of the head, resume, early stopping on
the validation log loss); the best head is then joined to the frozen features into the full
classifier (volume in, p(cancer) out), which is what gets saved and scored.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from kdsb.training import bags, runs
from kdsb.training.classifier_options import ClassifierOptions
from kdsb.training.spp import compile_classifier

logger = logging.getLogger(__name__)

HEAD_NAME = "head.keras"


def _build(options: ClassifierOptions, mean, variance) -> tuple[Any, Any]:
    from kdsb.models.mil import build_mil_classifier

    return build_mil_classifier(
        bags.instance_features(options.gmcae, options.head, options.mil_block),
        feature_mean=mean,
        feature_variance=variance,
        units=options.dense_units,
        pooling=options.mil_pooling,
        dropout=options.dropout,
    )


def train_mil(
    run_dir: Path,
    train: dict[str, tuple[Path, int]],
    val: dict[str, tuple[Path, int]],
    options: ClassifierOptions,
    bag_files: dict[str, Path],
    *,
    resume: bool,
    start_epoch: int,
    best_name: str,
    monitor: str,
    class_weights: dict[int, float] | None,
    give_up_below: tuple[str, float] | None = None,
) -> Any:
    """Fit the MIL head into `run_dir` and save the full classifier as `run_dir/best_name`.

    Args:
        run_dir: the run folder.
        train, val: patient id → (volume file, label).
        options: the run's options (`head` "mil" or "nll").
        bag_files: patient id → bag file (`kdsb.training.bags.encode_bags`) of every patient
            in `train` and `val`.
        resume, start_epoch: continue from the newest checkpoint; epochs already done.
        best_name: file name of the full classifier (the head with the best `monitor`).
        monitor: the logged quantity picking the best head.
        class_weights: class → sample weight, or None.
        give_up_below: as `kdsb.training.runs.fit`'s.

    Returns:
        The `keras.callbacks.History` of this session's epochs.
    """
    train_files = [bag_files[i] for i in train]
    mean, variance = bags.feature_statistics(train_files)
    train_data = bags.bag_dataset(
        train_files, [y for _, y in train.values()], batch_size=options.batch_size,
        weights=class_weights, seed=options.seed + start_epoch, augment=options.augment,
        shuffle=True, repeat=True,
    )
    val_data = bags.bag_dataset(
        [bag_files[i] for i in val], [y for _, y in val.values()], batch_size=options.batch_size,
    )

    def build():
        _, head = _build(options, mean, variance)
        return compile_classifier(head, options)

    history = runs.train(
        build, train_data, val_data, run_dir, options, resume=resume, best_name=HEAD_NAME,
        monitor=monitor, steps_per_epoch=math.ceil(len(train) / options.batch_size),
        validation_steps=math.ceil(len(val) / options.batch_size), give_up_below=give_up_below,
    )
    classifier, head = _build(options, mean, variance)
    best_head = runs.load_saved_model(run_dir / HEAD_NAME, compile=False)
    head.set_weights(best_head.get_weights())
    runs.save_model_atomically(classifier, run_dir / best_name)
    return history
