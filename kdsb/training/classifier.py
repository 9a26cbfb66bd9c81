"""Training the SPP3D cancer classifier (`kdsb train-classifier`): labels + volumes + a GMCAE.

Steps: read and check the labels against the volumes (`kdsb.io.tables`); split patients into
training and validation, stratified by label (`kdsb.data.datasets.split_patients`); check every
volume and record their spacing (`kdsb.data.inputs.VolumeInput.fit_to`); stream whole volumes
one at a time, training volumes under a random cube symmetry (48-fold augmentation); build the
classifier on the GMCAE's encoder (`kdsb.models.classifier`); fit on the spine of
`kdsb.training.runs` (config.json, checkpoints/, history.csv, logs/, resume) with early stopping
on the validation log loss; then score the best model on the validation patients and write
`metrics.json`. A resumed run offsets the seed of the training stream by the epochs done, so it
draws orders and symmetries it has not replayed.

Variable volume sizes and `--batch-size`: every step sees one whole volume (the shapes differ,
and padding would feed the pyramid pooling fake air). A batch size N > 1 is realised by
gradient accumulation (`gradient_accumulation_steps` of the Keras optimizer): the weights move
once every N volumes, along the mean of their N gradients, which is what a batch of N would do
for this model (it has no batch normalisation).

Class imbalance: with `--loss bce` each training volume carries a sample weight
n / (2 · n_class) ("balanced" class weights, the `class_weight` rule of scikit-learn), so both
classes pull equally; `--class-weight none` turns this off and keeps the probabilities
calibrated to the training prevalence, which log loss rewards. `--loss focal` uses
`keras.losses.BinaryFocalCrossentropy` and no weights. Validation metrics are never weighted.

The input of the network (spacing, HU normalisation, lung masking, downscaling) is a
`kdsb.data.inputs.VolumeInput`, written as `classifier.json` beside `classifier.keras` (the best
model by validation log loss), so `kdsb predict` feeds the model the same way.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.data.inputs import DEFAULT_LUNG_DILATION_MM, VolumeInput
from kdsb.errors import UsageError
from kdsb.evaluation import metrics
from kdsb.io.atomic import write_json
from kdsb.io.tables import check_labels_match, read_labels
from kdsb.io.volumes import list_volumes
from kdsb.preprocessing.hu import PARENCHYMA_HU
from kdsb.training import runs
from kdsb.training.runs import RunOptions, option

logger = logging.getLogger(__name__)

BEST_NAME = "classifier.keras"
METRICS_NAME = "metrics.json"
# The metric picking the best model: the `log_loss` metric compiled below, on validation data.
MONITOR = "val_log_loss"
LOSSES = ("bce", "focal")
POOLINGS = ("max", "average")
CLASS_WEIGHTS = ("balanced", "none")
FOCAL_GAMMA = 2.0
# Gradient clipping by the global norm (of all gradients together, so the update keeps its
# direction): whole-volume steps are few and noisy.
GLOBAL_CLIPNORM = 1.0


@dataclass(frozen=True, kw_only=True)
class ClassifierOptions(RunOptions):
    """Options of a classifier run (the command-line options of `kdsb train-classifier`).

    Attributes (beyond `RunOptions`):
        gmcae: the trained GMCAE (`gmcae.keras`) whose encoder starts the classifier.
        freeze_blocks: encoder blocks (from the input side) kept frozen, 0..3.
        loss: "bce" (binary cross-entropy) or "focal" (binary focal cross-entropy, gamma 2).
        class_weight: "balanced" or "none" (bce only).
        mask_outside_lungs, lung_dilation_mm, outside_hu, downscale: the `VolumeInput` fields.
        levels: spatial pyramid levels (bins per axis); (1,) is global pooling.
        pooling: "max" or "average" pooling in the pyramid.
        dense_units: units of the hidden dense layer.
        dropout: dropout rate of the head.
        augment: random cube symmetry per training volume.
        allow_unlabelled: skip volumes without a label instead of failing.
    """

    gmcae: str = option(help="trained GMCAE whose encoder starts the classifier",
                        metavar="GMCAE.keras", path=True)
    batch_size: int = option(1, "volumes per weight update (one volume per step, gradients "
                                "accumulated over N volumes: sizes vary)", type=int)
    lr: float = option(1e-4, "Adam learning rate", type=float)
    patience: int | None = option(
        5, "early stopping: epochs without a better validation log loss", type=int
    )
    distribute: str = option(
        "none", "none only for now: every step trains on one whole volume (sizes vary), which "
        "a data-parallel strategy cannot split over devices", choices=runs.STRATEGIES,
    )
    freeze_blocks: int = option(0, "freeze the first K encoder blocks", type=int)
    loss: str = option("bce", "binary cross-entropy or focal", choices=LOSSES)
    class_weight: str = option("balanced", "sample weights against class imbalance (bce only)",
                               choices=CLASS_WEIGHTS)
    mask_outside_lungs: bool = option(
        True, "replace everything outside the (dilated) lung mask by --outside-hu: the "
        "classifier then sees only lung tissue, vessels and nodules (recommended; the lung "
        "masks keep juxtapleural nodules)", action=argparse.BooleanOptionalAction,
    )
    lung_dilation_mm: float = option(
        DEFAULT_LUNG_DILATION_MM, "with --mask-outside-lungs, keep this margin (mm) around the "
        "lungs; a wide margin brings back chest wall and ribs", type=float,
    )
    outside_hu: float = option(
        float(PARENCHYMA_HU),
        "with --mask-outside-lungs, the HU of masked voxels: lung parenchyma by default, so "
        "the mask border is no edge (air would be the strongest response of every patient for "
        "max pooling)", type=float,
    )
    downscale: int = option(1, "integer downscaling of every axis", type=int)
    levels: tuple[int, ...] = option(
        (1, 2, 4), "spatial pyramid levels (bins per axis); 1 alone: global max", type=int,
        nargs="+",
    )
    pooling: str = option("max", "reduction inside each pyramid bin", choices=POOLINGS)
    dense_units: int = option(64, "units of the hidden dense layer", type=int)
    dropout: float = option(0.5, "dropout of the dense head", type=float)
    augment: bool = option(True, "no random cube symmetry on training volumes",
                           flag="--no-augment", action="store_false")
    allow_unlabelled: bool = option(False, "skip volumes without a label instead of failing",
                                    action="store_true")

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        super().__post_init__()
        self.volume_input()
        if not Path(self.gmcae).is_file():
            raise UsageError(
                f"expected --gmcae, a trained GMCAE .keras file, received a missing path: "
                f"{self.gmcae}"
            )

    def checks(self) -> list[tuple[bool, str, Any]]:
        from kdsb.models.gmcae import ENCODER_BLOCKS

        return [
            *super().checks(),
            (self.distribute == "none",
             "--distribute none (one whole volume per step cannot be split over devices)",
             self.distribute),
            (self.loss in LOSSES, f"--loss in {LOSSES}", self.loss),
            (self.pooling in POOLINGS, f"--pooling in {POOLINGS}", self.pooling),
            (self.class_weight in CLASS_WEIGHTS, f"--class-weight in {CLASS_WEIGHTS}",
             self.class_weight),
            (0 <= self.freeze_blocks <= ENCODER_BLOCKS, f"--freeze-blocks in 0..{ENCODER_BLOCKS}",
             self.freeze_blocks),
            (self.dense_units >= 1, "--dense-units >= 1", self.dense_units),
            (0.0 <= self.dropout < 1.0, "--dropout in [0, 1)", self.dropout),
            (len(self.levels) > 0 and min(self.levels) >= 1, "--levels of integers >= 1",
             self.levels),
        ]

    def volume_input(self) -> VolumeInput:
        """The network input these options ask for (any spacing, until training fits it)."""
        return VolumeInput(
            mask_outside_lungs=self.mask_outside_lungs,
            lung_dilation_mm=self.lung_dilation_mm,
            outside_hu=self.outside_hu,
            downscale=self.downscale,
        )


def balanced_class_weights(labels: list[int]) -> dict[int, float]:
    """Class weights n / (2 · n_class), so both classes carry equal total weight."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) if counts[c] else 0.0 for c in (0, 1)}


def _compile(model: Any, options: ClassifierOptions) -> Any:
    import keras

    optimizer = keras.optimizers.Adam(
        learning_rate=options.lr,
        global_clipnorm=GLOBAL_CLIPNORM,
        gradient_accumulation_steps=options.batch_size if options.batch_size > 1 else None,
    )
    if options.loss == "focal":
        loss = keras.losses.BinaryFocalCrossentropy(gamma=FOCAL_GAMMA)
    else:
        loss = keras.losses.BinaryCrossentropy()
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[
            keras.metrics.BinaryCrossentropy(name="log_loss"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
        ],
    )
    return model


def _build_model_fn(options: ClassifierOptions):
    def build():
        from kdsb.models.classifier import build_classifier, load_encoder_from_gmcae

        model = build_classifier(
            load_encoder_from_gmcae(options.gmcae),
            freeze_blocks=options.freeze_blocks,
            levels=options.levels,
            pooling=options.pooling,
            dense_units=options.dense_units,
            dropout=options.dropout,
        )
        return _compile(model, options)

    return build


def _with_weights(dataset: Any, weights: dict[int, float]) -> Any:
    import tensorflow as tf

    table = tf.constant([weights[0], weights[1]], dtype=tf.float32)

    def add_weight(x, y):
        return x, y, tf.gather(table, tf.cast(tf.reshape(y, (-1,)), tf.int32))

    return dataset.map(add_weight)


def score_patients(model: Any, paths: list[Path], volume_input: VolumeInput) -> np.ndarray:
    """p(cancer) of a trained model for each volume file, one volume at a time."""
    from kdsb.models.classifier import predict_probability

    return np.array(
        [
            predict_probability(model, volume_input.read(path))
            for path in tqdm(paths, desc="validate", unit="patient", disable=None)
        ]
    )


def train_dataset(
    paths: list[Path],
    labels: list[int],
    options: ClassifierOptions,
    volume_input: VolumeInput,
    *,
    seed: int,
) -> Any:
    """The endless, shuffled (and augmented) training stream, with class weights if asked.

    Returns:
        tf.data.Dataset of (x, y) or, with `--loss bce --class-weight balanced`, of
        (x, y, sample weight).
    """
    from kdsb.data.datasets import volume_dataset

    data = volume_dataset(
        paths,
        [float(v) for v in labels],
        volume_input=volume_input,
        augment=options.augment,
        seed=seed,
        shuffle=True,
        repeat=True,
    )
    if options.loss == "bce" and options.class_weight == "balanced":
        weights = balanced_class_weights(labels)
        logger.info("class weights %s", weights)
        data = _with_weights(data, weights)
    return data


def _split(labels: dict[str, int], usable: list[str], options: ClassifierOptions):
    from kdsb.data.datasets import split_patients

    train_ids, val_ids = split_patients(
        usable, val_fraction=options.val_fraction, seed=options.seed, labels=labels
    )
    if not val_ids or not train_ids:
        raise UsageError(
            f"expected training and validation patients, received {len(train_ids)} and "
            f"{len(val_ids)} from {len(usable)} patients with --val-fraction "
            f"{options.val_fraction}"
        )
    logger.info(
        "%d training patients (%d positive), %d validation patients (%d positive)",
        len(train_ids), sum(labels[i] for i in train_ids), len(val_ids),
        sum(labels[i] for i in val_ids),
    )
    return train_ids, val_ids


def train_classifier(
    data_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    run_dir: str | os.PathLike,
    options: ClassifierOptions | dict[str, Any],
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the classifier into `run_dir` and return the contents of its metrics.json.

    Args:
        data_dir: folder of `<id>.h5` volumes.
        labels_csv: `id,cancer` labels (0/1) for those volumes.
        run_dir: the run folder.
        options: the run's options, or the options given on the command line (a dict of some
            fields, `gmcae` among them: the others keep their default, or their saved value
            when resuming).
        resume: continue from the newest checkpoint of `run_dir` with its saved options.

    Returns:
        metrics.json as a dict: "validation" (`kdsb.evaluation.metrics.summary` of the best
        model on the validation patients: log_loss, roc_auc (None when undefined), accuracy,
        base_rate_log_loss, n, n_positive), train_base_rate, n_train, n_val, train_ids,
        val_ids, val_predictions, epochs_run, epochs_this_session and the options.

    Raises:
        LabelsError: the labels CSV is malformed or disagrees with the volumes.
        StoreError: a volume file is unreadable, too small for `downscale` or of another
            spacing than the others.
        UsageError: an option is out of range, the run folder holds checkpoints and `resume`
            is off, or resuming changes an option that may not change.
        TrainingError: the loss became NaN.
    """
    run_dir = Path(run_dir)
    options, start_epoch = runs.resolve_options(
        ClassifierOptions, options, run_dir, resume=resume, data_dir=data_dir
    )
    labels = read_labels(labels_csv)
    volumes = list_volumes(data_dir)
    usable = check_labels_match(
        labels, volumes, labels_path=labels_csv, data_dir=data_dir,
        allow_unlabelled=options.allow_unlabelled,
    )
    train_ids, val_ids = _split(labels, usable, options)
    volume_input = options.volume_input().fit_to([volumes[i] for i in usable])

    from kdsb.data.datasets import volume_dataset
    from kdsb.models.classifier import load_classifier

    runs.begin(run_dir, options, data_dir=data_dir)
    volume_input.save(run_dir, gmcae=str(options.gmcae))
    train_data = train_dataset(
        [volumes[i] for i in train_ids], [labels[i] for i in train_ids], options, volume_input,
        seed=options.seed + start_epoch,
    )
    val_data = volume_dataset(
        [volumes[i] for i in val_ids], [labels[i] for i in val_ids], volume_input=volume_input
    )
    history = runs.train(
        _build_model_fn(options), train_data, val_data, run_dir, options, resume=resume,
        best_name=BEST_NAME, monitor=MONITOR, steps_per_epoch=len(train_ids),
        validation_steps=len(val_ids),
    )
    best = load_classifier(run_dir / BEST_NAME)
    p_val = score_patients(best, [volumes[i] for i in val_ids], volume_input)
    scores = metrics.summary([labels[i] for i in val_ids], p_val)
    result = {
        "validation": {**scores, "roc_auc": _finite_or_none(scores["roc_auc"])},
        "train_base_rate": float(np.mean([labels[i] for i in train_ids])),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "train_ids": train_ids,
        "val_ids": val_ids,
        "val_predictions": {i: float(p) for i, p in zip(val_ids, p_val, strict=True)},
        "epochs_run": len(runs.read_history(run_dir / runs.HISTORY_NAME)),
        "epochs_this_session": len(history.epoch),
        "options": options.to_saved(),
    }
    path = run_dir / METRICS_NAME
    write_json(path, result)
    logger.info("wrote %s", path)
    return result


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value
