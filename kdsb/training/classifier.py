"""`kdsb train-classifier`: labels + volumes + a trained GMCAE → the SPP3D cancer classifier.

Steps: read and check the labels against the volumes (`kdsb.io.tables`); split patients into
training and validation, stratified by label (`kdsb.data.datasets.split_patients`); stream whole
volumes one at a time, training volumes under a random cube symmetry (48-fold augmentation);
build the classifier on the GMCAE's encoder (`kdsb.models.classifier`); fit with per-epoch
checkpoints,
resume and early stopping on the validation log loss (`kdsb.training.runs.fit`); then score the best
model on the validation patients and write `metrics.json`.

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

Lung masking (`--mask-outside-lungs`, the default): everything farther than
`--lung-dilation-mm` (2 mm) from the lung mask becomes lung parenchyma (`PARENCHYMA_HU`). The
label is a property of the lungs, and the encoder's global maxima must land on nodules: with an
air fill and a wide margin they sat on the air and on the chest wall beside it, identical in
every patient, and the classifier did not learn (training log loss stuck at ln 2).

The run folder (see `kdsb.training.runs` for checkpoints/, history.csv, logs/) also gets
`config.json` (the run's options), `classifier.keras` (the best model by validation log loss),
`classifier.json` (the input preparation `kdsb predict` applies, see `kdsb.evaluation.predict`) and
`metrics.json`. Resuming keeps the saved options: only `--epochs` and `--patience` may change
(the checkpoint was trained on inputs prepared with the others, and `kdsb predict` must prepare
them the same way). A resumed run offsets the seed of the training stream by the epochs done,
so it draws orders and symmetries it has not replayed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, UsageError
from kdsb.evaluation import metrics
from kdsb.io.atomic import write_json
from kdsb.io.tables import check_labels_match, read_labels
from kdsb.io.volumes import list_volumes

logger = logging.getLogger(__name__)

BEST_NAME = "classifier.keras"
METRICS_NAME = "metrics.json"
RUN_CONFIG_NAME = "config.json"
# Options that may differ from the saved ones when resuming (they do not change the model or
# its inputs); `resume` itself is not an option of the run.
RESUMABLE_CHANGES = ("epochs", "patience")
NOT_SAVED = ("resume",)
MONITOR = "val_log_loss"
LOSSES = ("bce", "focal")
POOLINGS = ("max", "average")
CLASS_WEIGHTS = ("balanced", "none")
FOCAL_GAMMA = 2.0
# Gradient clipping by the global norm (of all gradients together, so the update keeps its
# direction): whole-volume steps are few and noisy.
GLOBAL_CLIPNORM = 1.0
# The HU value given to voxels masked out by --mask-outside-lungs: healthy lung parenchyma
# (about -850 HU), so the mask border is no edge at all. Air (-1000 HU) would be the strongest
# response of the GMCAE's "dark" channels everywhere outside the lungs, and the chest wall kept
# by a dilated mask next to it the strongest edge of every patient: global max pooling would
# then see the same mask border in every patient instead of the nodules.
PARENCHYMA_HU = -850.0


@dataclass
class ClassifierConfig:
    """Options of a classifier run (the command-line options of `kdsb train-classifier`).

    Attributes:
        gmcae: the trained GMCAE (`gmcae.keras`) whose encoder starts the classifier.
        epochs: total epochs (each visits every training patient once).
        batch_size: volumes per weight update (gradient accumulation, see the module docstring).
        lr: Adam learning rate.
        freeze_blocks: encoder blocks (from the input side) kept frozen, 0..3.
        val_fraction: fraction of patients held out for validation, stratified by label.
        loss: "bce" (binary cross-entropy) or "focal" (binary focal cross-entropy, gamma 2).
        class_weight: "balanced" or "none" (bce only).
        seed: seed of the split, augmentation, order and weight initialisation.
        resume: continue the run from its newest checkpoint.
        mask_outside_lungs: set voxels farther than `lung_dilation_mm` from the lungs to
            `outside_hu`.
        lung_dilation_mm: dilation of the lung mask in mm.
        outside_hu: HU of the masked voxels (default `PARENCHYMA_HU`).
        downscale: integer downscaling factor of every axis (block mean).
        patience: early stopping after this many epochs without a better validation log loss
            (None: never).
        precision: "float32", "mixed_bfloat16" or "mixed_float16".
        levels: spatial pyramid levels (bins per axis); (1,) is global pooling.
        pooling: "max" or "average" pooling in the pyramid.
        dense_units: units of the hidden dense layer.
        dropout: dropout rate of the head.
        augment: random cube symmetry per training volume.
        allow_unlabelled: skip volumes without a label instead of failing.
    """

    gmcae: str
    epochs: int = 20
    batch_size: int = 1
    lr: float = 1e-4
    freeze_blocks: int = 0
    val_fraction: float = 0.2
    loss: str = "bce"
    class_weight: str = "balanced"
    seed: int = 0
    resume: bool = False
    mask_outside_lungs: bool = True
    lung_dilation_mm: float = 2.0
    outside_hu: float = PARENCHYMA_HU
    downscale: int = 1
    patience: int | None = 5
    precision: str = "float32"
    levels: tuple[int, ...] = (1, 2, 4)
    pooling: str = "max"
    dense_units: int = 64
    dropout: float = 0.5
    augment: bool = True
    allow_unlabelled: bool = False

    def validate(self) -> None:
        """Raise `UsageError` for out-of-range options."""
        checks = (
            (self.epochs >= 1, "--epochs >= 1", self.epochs),
            (self.batch_size >= 1, "--batch-size >= 1", self.batch_size),
            (self.lr > 0, "--lr > 0", self.lr),
            (0.0 < self.val_fraction < 1.0, "--val-fraction in (0, 1)", self.val_fraction),
            (self.loss in LOSSES, f"--loss in {LOSSES}", self.loss),
            (self.pooling in POOLINGS, f"--pooling in {POOLINGS}", self.pooling),
            (self.class_weight in CLASS_WEIGHTS, f"--class-weight in {CLASS_WEIGHTS}",
             self.class_weight),
            (self.downscale >= 1, "--downscale >= 1", self.downscale),
            (self.lung_dilation_mm >= 0, "--lung-dilation-mm >= 0", self.lung_dilation_mm),
            (math.isfinite(self.outside_hu), "a finite --outside-hu", self.outside_hu),
            (0 <= self.freeze_blocks <= 3, "--freeze-blocks in 0..3", self.freeze_blocks),
            (self.dense_units >= 1, "--dense-units >= 1", self.dense_units),
            (0.0 <= self.dropout < 1.0, "--dropout in [0, 1)", self.dropout),
            (self.patience is None or self.patience >= 1, "--patience >= 1", self.patience),
            (len(self.levels) > 0 and min(self.levels) >= 1, "--levels of integers >= 1",
             self.levels),
        )
        for ok, expected, received in checks:
            if not ok:
                raise UsageError(f"expected {expected}, received {received!r}")
        if not Path(self.gmcae).is_file():
            raise UsageError(
                f"expected --gmcae, a trained GMCAE .keras file, received a missing path: "
                f"{self.gmcae}"
            )

    def saved_options(self) -> dict[str, Any]:
        """The options written to config.json (every field but `resume`, lists for tuples)."""
        options = {k: v for k, v in asdict(self).items() if k not in NOT_SAVED}
        options["levels"] = list(self.levels)
        return options

    def input_config(self) -> dict[str, Any]:
        """The options `kdsb.data.datasets.load_volume_array` needs, as stored in
        classifier.json."""
        return {
            "mask_outside_lungs": bool(self.mask_outside_lungs),
            "lung_dilation_mm": float(self.lung_dilation_mm),
            "downscale": int(self.downscale),
            "outside_hu": float(self.outside_hu),
        }


def balanced_class_weights(labels: list[int]) -> dict[int, float]:
    """Class weights n / (2 · n_class), so both classes carry equal total weight."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) if counts[c] else 0.0 for c in (0, 1)}


def _compile(model: Any, config: ClassifierConfig) -> Any:
    import keras

    optimizer = keras.optimizers.Adam(
        learning_rate=config.lr,
        global_clipnorm=GLOBAL_CLIPNORM,
        gradient_accumulation_steps=config.batch_size if config.batch_size > 1 else None,
    )
    if config.loss == "focal":
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


def _with_weights(dataset: Any, weights: dict[int, float]) -> Any:
    import tensorflow as tf

    table = tf.constant([weights[0], weights[1]], dtype=tf.float32)

    def add_weight(x, y):
        return x, y, tf.gather(table, tf.cast(tf.reshape(y, (-1,)), tf.int32))

    return dataset.map(add_weight)


def score_patients(model: Any, paths: list[Path], config: ClassifierConfig) -> np.ndarray:
    """p(cancer) of a trained model for each volume file, one volume at a time."""
    from kdsb.data.datasets import load_volume_array
    from kdsb.evaluation.predict import predict_volume

    return np.array(
        [
            predict_volume([model], load_volume_array(path, **config.input_config()))
            for path in tqdm(paths, desc="validate", unit="patient", disable=None)
        ]
    )


def check_resumed_options(run_dir: str | os.PathLike, config: ClassifierConfig) -> None:
    """Refuse options that differ from the saved run's, except `RESUMABLE_CHANGES`.

    Args:
        run_dir: the run folder being resumed (holding checkpoints).
        config: the options given now.

    Raises:
        UsageError: an option differs from `config.json`; the message names the saved value.
        KdsbError: config.json is not valid JSON.
    """
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        logger.warning("no %s in %s: cannot check the options against the run's", path.name,
                       run_dir)
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise KdsbError(f"{path}: expected JSON, received invalid text ({error})") from None
    given = config.saved_options()
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            continue
        old = saved.get(key)
        same = (
            os.path.realpath(str(old)) == os.path.realpath(value) if key == "gmcae"
            else old == value
        )
        if not same:
            flag = "--" + key.replace("_", "-")
            changeable = ", ".join("--" + k for k in RESUMABLE_CHANGES)
            raise UsageError(
                f"expected {flag} {old!r} as saved in {path} when resuming, received {value!r}; "
                f"only {changeable} may change"
            )


def train_dataset(
    paths: list[Path], labels: list[int], config: ClassifierConfig, *, seed: int
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
        augment=config.augment,
        seed=seed,
        shuffle=True,
        repeat=True,
        **config.input_config(),
    )
    if config.loss == "bce" and config.class_weight == "balanced":
        weights = balanced_class_weights(labels)
        logger.info("class weights %s", weights)
        data = _with_weights(data, weights)
    return data


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def train_classifier(
    data_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: ClassifierConfig,
) -> dict[str, Any]:
    """Train the classifier into `run_dir` and return the contents of its metrics.json.

    Args:
        data_dir: folder of `<id>.h5` volumes.
        labels_csv: `id,cancer` labels (0/1) for those volumes.
        run_dir: the run folder.
        config: the run's options.

    Returns:
        metrics.json as a dict: val_log_loss, val_auc, val_accuracy, val_base_rate_log_loss
        (the best constant predictor on the validation patients), train_base_rate, n_train,
        n_val, train_ids, val_ids, epochs_run, and the options.

    Raises:
        LabelsError: the labels CSV is malformed or disagrees with the volumes.
        UsageError: an option is out of range, or the run folder holds checkpoints and
            `resume` is off.
        TrainingError: the loss became NaN.
    """
    from kdsb.training import runs

    config.validate()
    run_dir = Path(run_dir)
    last = runs.check_run_dir(run_dir, config.resume)
    if last is not None:
        check_resumed_options(run_dir, config)
    labels = read_labels(labels_csv)
    volumes = list_volumes(data_dir)
    usable = check_labels_match(
        labels,
        volumes,
        labels_path=labels_csv,
        data_dir=data_dir,
        allow_unlabelled=config.allow_unlabelled,
    )

    from kdsb.data.datasets import check_volume_files, split_patients, volume_dataset
    from kdsb.evaluation.predict import write_input_config
    from kdsb.models.classifier import build_classifier, load_classifier, load_encoder_from_gmcae

    train_ids, val_ids = split_patients(
        usable, val_fraction=config.val_fraction, seed=config.seed, labels=labels
    )
    if not val_ids or not train_ids:
        raise UsageError(
            f"expected training and validation patients, received {len(train_ids)} and "
            f"{len(val_ids)} from {len(usable)} patients with --val-fraction {config.val_fraction}"
        )
    y_train = [labels[i] for i in train_ids]
    y_val = np.array([labels[i] for i in val_ids], dtype=np.float64)
    logger.info(
        "%d training patients (%d positive), %d validation patients (%d positive)",
        len(train_ids), sum(y_train), len(val_ids), int(y_val.sum()),
    )

    check_volume_files(
        [volumes[i] for i in usable], min_edge=config.downscale,
        why=f"for --downscale {config.downscale}",
    )
    runs.configure_runtime(seed=config.seed, precision=config.precision)
    input_config = config.input_config()
    start_epoch = last[0] if last is not None else 0
    train_data = train_dataset(
        [volumes[i] for i in train_ids], y_train, config, seed=config.seed + start_epoch
    )
    val_data = volume_dataset(
        [volumes[i] for i in val_ids], list(y_val), augment=False, **input_config
    )

    def build_model():
        encoder = load_encoder_from_gmcae(config.gmcae)
        model = build_classifier(
            encoder,
            freeze_blocks=config.freeze_blocks,
            levels=tuple(config.levels),
            pooling=config.pooling,
            dense_units=config.dense_units,
            dropout=config.dropout,
        )
        return _compile(model, config)

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RUN_CONFIG_NAME, config.saved_options())
    write_input_config(run_dir, {**input_config, "gmcae": str(config.gmcae)})
    history = runs.fit(
        build_model,
        train_data,
        val_data,
        run_dir,
        epochs=config.epochs,
        steps_per_epoch=len(train_ids),
        validation_steps=len(val_ids),
        resume=config.resume,
        best_name=BEST_NAME,
        monitor=MONITOR,
        early_stopping_patience=config.patience,
        verbose=2 if logger.isEnabledFor(logging.INFO) else 0,
    )

    best = load_classifier(run_dir / BEST_NAME)
    p_val = score_patients(best, [volumes[i] for i in val_ids], config)
    scores = metrics.summary(y_val, p_val)
    result = {
        "val_log_loss": scores["log_loss"],
        "val_auc": _finite_or_none(scores["roc_auc"]),
        "val_accuracy": scores["accuracy"],
        "val_base_rate_log_loss": scores["base_rate_log_loss"],
        "train_base_rate": float(np.mean(y_train)),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "n_val_positive": int(y_val.sum()),
        "train_ids": train_ids,
        "val_ids": val_ids,
        "val_predictions": {i: float(p) for i, p in zip(val_ids, p_val, strict=True)},
        "epochs_run": len(runs.read_history(run_dir / runs.HISTORY_NAME)),
        "epochs_this_session": len(history.epoch),
        "options": asdict(config),
    }
    path = run_dir / METRICS_NAME
    write_json(path, result)
    logger.info("wrote %s", path)
    return result
