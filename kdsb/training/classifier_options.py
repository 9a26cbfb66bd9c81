"""The options of a classifier run: `ClassifierOptions`, the command-line options of
`kdsb train-classifier`, with their checks and the network input they ask for."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kdsb.data.inputs import DEFAULT_LUNG_DILATION_MM, VolumeInput
from kdsb.errors import UsageError
from kdsb.hu import PARENCHYMA_HU
from kdsb.training import runs
from kdsb.training.runs import RUN_KIND_KEY, RunOptions, option

HEADS = ("spp", "mil", "nll")
# Of `runs.STRATEGIES`: "mirrored" cannot split one whole volume (sizes vary) over the devices.
DISTRIBUTIONS = tuple(name for name in runs.STRATEGIES if name != "mirrored")
LOSSES = ("bce", "focal")
# Copies of the models' sets (a test checks they agree): the models import Keras, which
# `kdsb --help` must not.
POOLINGS = ("max", "average")  # kdsb.models.layers.POOLING_MODES
MIL_POOLINGS = ("attention", "max")  # kdsb.models.mil.POOLINGS
CALIBRATIONS = ("platt", "temperature", "none")  # kdsb.models.calibration.METHODS
CLASS_WEIGHTS = ("balanced", "none")
# What runs saved before an option existed (no key for it in config.json) trained with.
LEGACY_DEFAULTS = {"label_smoothing": 0.0, "restarts": 0, "ema_momentum": 0.0}


@dataclass(frozen=True, kw_only=True)
class ClassifierOptions(RunOptions):
    """Options of a classifier run (the command-line options of `kdsb train-classifier`).

    Attributes (beyond `RunOptions`):
        gmcae: the trained GMCAE (`gmcae.keras`) whose encoder starts the classifier.
        head: "spp" (trained end to end), "mil" (MIL pooling of the frozen encoder's cells) or
            "nll" (the same MIL head on each patch's GMCAE NLL: the likelihood as a detector).
        folds: 0 for one training/validation split, K >= 2 for K-fold cross-validation.
        restarts: times a model whose validation predictions explain next to nothing (the
            base-rate plateau) is trained again with another seed.
        calibration: "platt", "temperature" or "none" (see `kdsb.models.calibration`).
        mil_pooling: "attention" or "max" (heads "mil", "nll").
        mil_block: the encoder block whose output cells are the instances (head "mil").
        bag_symmetries: cube symmetries encoded per volume for heads "mil", "nll"
            (augmentation).
        freeze_blocks: encoder blocks (from the input side) kept frozen, 0..3.
        loss: "bce" (binary cross-entropy) or "focal" (binary focal cross-entropy, gamma 2).
        label_smoothing: eps in [0, 1): training labels eps/2 and 1 - eps/2 (the logged and
            monitored log loss stays on the true labels).
        class_weight: "balanced" or "none" (bce only).
        mask_outside_lungs, lung_dilation_mm, outside_hu, downscale: the `VolumeInput` fields.
        levels: spatial pyramid levels (bins per axis); (1,) is global pooling.
        pooling: "max" or "average" pooling in the pyramid.
        dense_units: units of the hidden dense layer.
        dropout: dropout rate of the head.
        log_pooled: the dense head reads log(1 + f) of each pooled feature f (head spp).
        ema_momentum: momentum per step of the weights' exponential moving average, which
            replaces the weights for validation and saving (`runs.fit`); 0: none.
        augment: random cube symmetry per training volume.
        allow_unlabelled: skip volumes without a label instead of failing.
        allow_missing_volumes: skip labelled patients without a volume instead of failing.
        tile_z: 0, or the z-slab (input voxels, even) in which training computes the encoder's
            first block (`kdsb.models.slabs`; head spp).
    """

    gmcae: str = option(help="trained GMCAE whose encoder starts the classifier",
                        metavar="GMCAE.keras", path=True)
    batch_size: int = option(1, "volumes per weight update (head spp: one volume per step, "
                                "gradients accumulated over N volumes: sizes vary; heads mil "
                                "and nll: a batch of N padded bags)", type=int)
    lr: float = option(1e-4, "Adam learning rate", type=float)
    patience: int | None = option(
        5, "early stopping: epochs without a better validation log loss", type=int
    )
    distribute: str = option(
        "none", "none, or multiworker (head spp): the processes that TF_CONFIG lists train "
        "together, each on a volume of its own every step (--batch-size = their number); "
        "mirrored cannot split one whole volume (sizes vary) over devices",
        choices=DISTRIBUTIONS,
    )
    head: str = option(
        "spp", "spp: encoder + spatial pyramid pooling trained end to end on whole volumes; "
        "mil: multiple-instance learning (--mil-pooling) on the frozen encoder's cells (trains in "
        "seconds on precomputed features); nll: the same on each patch's GMCAE likelihood "
        "(how unusual it is), the unsupervised model as a detector", choices=HEADS,
    )
    folds: int = option(
        0, "K >= 2: patient-level stratified K-fold cross-validation (oof.csv, K fold models, "
        "ensembled by predict: mean logit); 0: one training/validation split", type=int,
    )
    calibration: str = option(
        "platt", "calibration fitted on validation (or out-of-fold) predictions and saved in "
        "the model", choices=CALIBRATIONS,
    )
    mil_pooling: str = option(
        "max", "MIL pooling of instance embeddings (heads mil, nll): max (it beat attention in "
        "benchmarks/classifier.py) or attention", choices=MIL_POOLINGS)
    mil_block: int = option(
        2, "encoder block whose output cells are the MIL instances (1..3; head mil)", type=int
    )
    bag_symmetries: int = option(
        1, "cube symmetries encoded per volume for heads mil and nll (training draws one per "
        "visit unless --no-augment; 1: the volume as it is, which fitted better: the frozen "
        "encoder is not symmetry invariant)", type=int,
    )
    freeze_blocks: int = option(0, "freeze the first K encoder blocks (head spp)", type=int)
    loss: str = option("bce", "binary cross-entropy or focal", choices=LOSSES)
    label_smoothing: float = option(
        0.02, "train toward labels eps/2 and 1 - eps/2 instead of 0 and 1: the loss stops "
        "rewarding confidence beyond them, which keeps logits (and the damage of a wrong "
        "patient) bounded; 0 trains on the labels themselves", type=float,
    )
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
        (1, 2, 4), "spatial pyramid levels (bins per axis); 1 alone: global pooling", type=int,
        nargs="+",
    )
    pooling: str = option("max", "reduction inside each pyramid bin", choices=POOLINGS)
    dense_units: int = option(
        64, "units of the hidden dense layer (spp) or of the instance embedding (mil)", type=int
    )
    dropout: float = option(0.5, "dropout of the dense head", type=float)
    log_pooled: bool = option(
        False, "head spp: the dense head reads log(1 + f) of each pooled feature f, so a "
        "feature that grows steeply with a nodule's size weighs in about its ratio, not its "
        "difference", action="store_true",
    )
    ema_momentum: float = option(
        0.0, "keep an exponential moving average of the weights with this momentum per step "
        "(e.g. 0.97; Polyak averaging): validation, the best model and the saved models use "
        "the average, which smooths the swings of one-volume steps; 0: off", type=float,
    )
    restarts: int = option(
        2, "train a model again with another seed, up to this many times, when its validation "
        "predictions, shifted to fit them best, explain under 5 %% of the labels' entropy (it "
        "never left the base-rate plateau; when every attempt was, the least stuck is kept); "
        "not with --distribute multiworker", type=int,
    )
    augment: bool = option(True, "no random cube symmetry on training volumes",
                           flag="--no-augment", action="store_false")
    allow_unlabelled: bool = option(False, "skip volumes without a label instead of failing",
                                    action="store_true")
    allow_missing_volumes: bool = option(
        False, "skip labelled patients without a volume instead of failing (a whole cohort's "
        "labels, e.g. Kaggle's stage1_labels.csv, beside a preprocessed part of it)",
        action="store_true")
    tile_z: int = option(
        0, "head spp: compute the encoder's first block in z-slabs of this many voxels (even, "
        "e.g. 32), recomputed in the backward pass: a width-64 step on a 1 mm lung then needs "
        "~7 GiB instead of ~28 (float32), for slower steps (recomputation); same results and "
        "saved model; 0: the whole volume at once", type=int, metavar="VOXELS",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        super().__post_init__()
        self.volume_input()
        gmcae = Path(self.gmcae)
        if not gmcae.is_file():
            state = "a folder" if gmcae.is_dir() else "a missing path"
            from kdsb.training.gmcae import MODEL_NAME

            inside = gmcae / MODEL_NAME  # train-gmcae's RUN_DIR: name its model
            hint = f" (its model is {inside})" if inside.is_file() else ""
            raise UsageError(f"expected --gmcae, a trained GMCAE .keras file, received {state}: "
                             f"{gmcae}{hint}")
        from kdsb.io.paths import require_keras_file

        require_keras_file(gmcae, "--gmcae, a trained GMCAE .keras file")

    def checks(self) -> list[tuple[bool, str, Any]]:
        from kdsb.data.patches import CUBE_SYMMETRIES
        from kdsb.models.gmcae import ENCODER_BLOCKS

        return [
            *super().checks(),
            (self.distribute in DISTRIBUTIONS,
             "--distribute none or multiworker (one whole volume per step cannot be split over "
             "the devices of one machine)", self.distribute),
            (self.distribute == "none" or self.head == "spp",
             "--head spp with --distribute multiworker (the MIL heads train in seconds on "
             "precomputed bags, on one worker)", self.head),
            (self.loss in LOSSES, f"--loss in {LOSSES}", self.loss),
            (0.0 <= self.label_smoothing < 1.0, "--label-smoothing in [0, 1)",
             self.label_smoothing),
            (self.head in HEADS, f"--head in {HEADS}", self.head),
            (self.folds == 0 or self.folds >= 2, "--folds 0 or >= 2", self.folds),
            (self.calibration in CALIBRATIONS, f"--calibration in {CALIBRATIONS}",
             self.calibration),
            (self.mil_pooling in MIL_POOLINGS, f"--mil-pooling in {MIL_POOLINGS}",
             self.mil_pooling),
            (1 <= self.mil_block <= ENCODER_BLOCKS, f"--mil-block in 1..{ENCODER_BLOCKS}",
             self.mil_block),
            (1 <= self.bag_symmetries <= len(CUBE_SYMMETRIES),
             f"--bag-symmetries in 1..{len(CUBE_SYMMETRIES)}", self.bag_symmetries),
            (self.pooling in POOLINGS, f"--pooling in {POOLINGS}", self.pooling),
            (self.class_weight in CLASS_WEIGHTS, f"--class-weight in {CLASS_WEIGHTS}",
             self.class_weight),
            (0 <= self.freeze_blocks <= ENCODER_BLOCKS, f"--freeze-blocks in 0..{ENCODER_BLOCKS}",
             self.freeze_blocks),
            (self.restarts >= 0, "--restarts >= 0", self.restarts),
            (self.dense_units >= 1, "--dense-units >= 1", self.dense_units),
            (0.0 <= self.dropout < 1.0, "--dropout in [0, 1)", self.dropout),
            (0.0 <= self.ema_momentum < 1.0, "--ema-momentum in [0, 1)", self.ema_momentum),
            (len(self.levels) > 0 and all(int(n) == n >= 1 for n in self.levels),
             "--levels of integers >= 1", self.levels),
            (self.tile_z == 0 or (self.tile_z >= 2 and self.tile_z % 2 == 0),
             "--tile-z 0 or an even number of voxels >= 2", self.tile_z),
            (self.tile_z == 0 or self.head == "spp",
             "--head spp with --tile-z (the MIL heads train on precomputed features)",
             self.head),
        ]

    RUN_KIND: ClassVar[str] = "classifier"

    @classmethod
    def kind_of_saved(cls, saved):
        """As `RunOptions.kind_of_saved`; a record without the kind, without a `head` and with
        the GMCAE's `mixtures` is a GMCAE run's."""
        if RUN_KIND_KEY not in saved and "head" not in saved and "mixtures" in saved:
            return "GMCAE"
        return super().kind_of_saved(saved)

    @classmethod
    def from_saved(cls, saved):
        """Options from a config.json; one saved before `--label-smoothing`, `--restarts` or
        `--ema-momentum` existed used none of them (`LEGACY_DEFAULTS`): resumed, it must not
        begin to."""
        return super().from_saved({**LEGACY_DEFAULTS, **saved})

    def volume_input(self) -> VolumeInput:
        """The network input these options ask for (any spacing, until training fits it)."""
        return VolumeInput(
            mask_outside_lungs=self.mask_outside_lungs,
            lung_dilation_mm=self.lung_dilation_mm,
            outside_hu=self.outside_hu,
            downscale=self.downscale,
        )
