"""Training the SPP head end to end: the encoder and spatial pyramid pooling on whole volumes.

Every step sees one whole volume (the shapes differ, and padding would feed the pyramid pooling
fake air), training volumes under a random cube symmetry (48-fold augmentation on an isotropic
grid). A batch size N > 1 is realised by gradient accumulation (`gradient_accumulation_steps`
of the Keras optimizer): the weights move once every N volumes, along the mean of their N
gradients, which is what a batch of N would do for this model (it has no batch
normalisation). A resumed run offsets the seed of the training stream by the epochs done, so it
draws orders and symmetries it has not replayed. With `--tile-z` the encoder's first block is
computed in z-slabs (`kdsb.models.slabs`): less memory per step, the same model and results.

Losses: `bce` with optional per-volume sample weights (`class_weights`), or `focal`
(`keras.losses.BinaryFocalCrossentropy`, gamma 2, no weights). Validation metrics are never
weighted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from kdsb.data.inputs import VolumeInput
from kdsb.errors import UsageError
from kdsb.training import runs
from kdsb.training.classifier_options import ClassifierOptions

logger = logging.getLogger(__name__)

FOCAL_GAMMA = 2.0
# Gradient clipping by the global norm (of all gradients together, so the update keeps its
# direction): whole-volume steps are few and noisy.
GLOBAL_CLIPNORM = 1.0


def compile_classifier(model: Any, options: ClassifierOptions) -> Any:
    """Compile a classifier (or MIL head) with Adam, the chosen loss and the logged metrics."""
    import keras

    from kdsb.models.spread import PredictionSpread

    optimizer = keras.optimizers.Adam(
        learning_rate=options.lr,
        global_clipnorm=GLOBAL_CLIPNORM,
        # --ema-momentum: the optimizer keeps the average, `runs.fit` swaps it in.
        use_ema=options.ema_momentum > 0,
        ema_momentum=options.ema_momentum or 0.99,  # (Keras's default, unused when off)
        # One volume per worker and step under multiworker (--batch-size = the workers), where
        # Keras's accumulation cannot run.
        gradient_accumulation_steps=(
            options.batch_size
            if options.batch_size > 1 and options.head == "spp" and options.distribute == "none"
            else None
        ),
    )
    if options.loss == "focal":
        loss = keras.losses.BinaryFocalCrossentropy(
            gamma=FOCAL_GAMMA, label_smoothing=options.label_smoothing
        )
    else:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=options.label_smoothing)
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[
            keras.metrics.BinaryCrossentropy(name="log_loss"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
            PredictionSpread(),
        ],
    )
    return model


def _with_weights(dataset: Any, weights: dict[int, float]) -> Any:
    import tensorflow as tf

    table = tf.constant([weights[0], weights[1]], dtype=tf.float32)

    def add_weight(x, y):
        return x, y, tf.gather(table, tf.cast(tf.reshape(y, (-1,)), tf.int32))

    return dataset.map(add_weight)


def train_dataset(
    paths: list[Path],
    labels: list[int],
    options: ClassifierOptions,
    volume_input: VolumeInput,
    *,
    seed: int,
    class_weights: dict[int, float] | None = None,
) -> Any:
    """The endless, shuffled (and augmented) stream of whole training volumes.

    Returns:
        tf.data.Dataset of (x, y) or, with `class_weights`, of (x, y, sample weight).
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
    return data if class_weights is None else _with_weights(data, class_weights)


def train_spp(
    run_dir: Path,
    train: dict[str, tuple[Path, int]],
    val: dict[str, tuple[Path, int]],
    options: ClassifierOptions,
    volume_input: VolumeInput,
    *,
    resume: bool,
    start_epoch: int,
    best_name: str,
    monitor: str,
    class_weights: dict[int, float] | None,
    give_up_below: tuple[str, float] | None = None,
) -> Any:
    """Fit the SPP classifier into `run_dir` (id → (volume, label) for training and validation).

    Under multiworker, each worker trains on its share of the training patients (every
    `count`-th in id order from its index on) with its own seed, one volume per step, and
    validates on all validation patients; an epoch is one pass over the training patients.

    Returns:
        The `keras.callbacks.History` of this session's epochs.
    """
    from kdsb.data.datasets import volume_dataset

    def build():
        from kdsb.models.classifier import build_classifier, load_encoder_from_gmcae

        model = build_classifier(
            load_encoder_from_gmcae(options.gmcae),
            freeze_blocks=options.freeze_blocks,
            levels=options.levels,
            pooling=options.pooling,
            dense_units=options.dense_units,
            dropout=options.dropout,
            log_pooled=options.log_pooled,
        )
        return compile_classifier(model, options)

    def in_slabs(model):
        from kdsb.models.slabs import compute_first_block_in_slabs

        return compute_first_block_in_slabs(model, options.tile_z)

    worker = runs.worker(options.distribute)
    own = sorted(train.items())[worker.index::worker.count]
    if not own:
        raise UsageError(
            f"expected at least as many training patients as the {worker.count} workers, "
            f"received {len(train)}"
        )
    train_data = train_dataset(
        [p for _, (p, _) in own], [y for _, (_, y) in own], options, volume_input,
        seed=worker.seed(options.seed + start_epoch), class_weights=class_weights,
    )
    val_data = volume_dataset(
        [p for p, _ in val.values()], [float(y) for _, y in val.values()],
        volume_input=volume_input,
    )
    return runs.train(
        build, train_data, val_data, run_dir, options, resume=resume, best_name=best_name,
        monitor=monitor, steps_per_epoch=math.ceil(len(train) / worker.count),
        validation_steps=len(val), give_up_below=give_up_below,
        prepare_model=in_slabs if options.tile_z else None,
    )
