"""`kdsb train-classifier DATA_DIR LABELS_CSV RUN_DIR --gmcae GMCAE.keras`."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train the SPP3D cancer classifier on whole volumes, starting from a GMCAE's encoder"

# Defaults repeated from kdsb.training.classifier.ClassifierConfig (importing it here would
# slow down `kdsb --help`); tests check that the two agree.
DEFAULTS = {
    "epochs": 20,
    "batch_size": 1,
    "lr": 1e-4,
    "freeze_blocks": 0,
    "val_fraction": 0.2,
    "loss": "bce",
    "class_weight": "balanced",
    "seed": 0,
    "mask_outside_lungs": True,
    "lung_dilation_mm": 2.0,
    "outside_hu": -850.0,
    "downscale": 1,
    "patience": 5,
    "precision": "float32",
    "levels": (1, 2, 4),
    "pooling": "max",
    "dense_units": 64,
    "dropout": 0.5,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of <id>.h5 volumes")
    parser.add_argument("labels", type=Path, help="id,cancer CSV of 0/1 labels")
    parser.add_argument("run_dir", type=Path, help="run folder: classifier.keras, metrics.json …")
    parser.add_argument("--gmcae", type=Path, required=True, metavar="GMCAE.keras",
                        help="trained GMCAE whose encoder starts the classifier")
    parser.set_defaults(**DEFAULTS)
    parser.add_argument("--epochs", type=int, help="total epochs (one pass over the patients)")
    parser.add_argument("--batch-size", type=int,
                        help="volumes per weight update (one volume per step, gradients "
                             "accumulated over N volumes: sizes vary)")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--freeze-blocks", type=int, choices=range(4),
                        help="freeze the first K encoder blocks")
    parser.add_argument("--val-fraction", type=float,
                        help="patients held out for validation (stratified by label)")
    parser.add_argument("--loss", choices=("bce", "focal"), help="binary cross-entropy or focal")
    parser.add_argument("--class-weight", choices=("balanced", "none"),
                        help="sample weights against class imbalance (bce only)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint; repeat the run's options "
                             "(only --epochs and --patience may change)")
    parser.add_argument("--mask-outside-lungs", action=argparse.BooleanOptionalAction,
                        help="replace everything outside the (dilated) lung mask by "
                             "--outside-hu: the classifier then sees only lung tissue, "
                             "vessels and nodules (recommended; the lung masks keep "
                             "juxtapleural nodules)")
    parser.add_argument("--lung-dilation-mm", type=float,
                        help="with --mask-outside-lungs, keep this margin (mm) around the "
                             "lungs; a wide margin brings back chest wall and ribs")
    parser.add_argument("--outside-hu", type=float,
                        help="with --mask-outside-lungs, the HU of masked voxels: lung "
                             "parenchyma by default, so the mask border is no edge (air would "
                             "be the strongest response of every patient for max pooling)")
    parser.add_argument("--downscale", type=int, help="integer downscaling of every axis")
    parser.add_argument("--patience", type=int,
                        help="early stopping: epochs without a better validation log loss")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16", "mixed_float16"),
                        help="numeric precision of the layers")
    parser.add_argument("--levels", type=int, nargs="+",
                        help="spatial pyramid levels (bins per axis); 1 alone: global max")
    parser.add_argument("--pooling", choices=("max", "average"),
                        help="reduction inside each pyramid bin")
    parser.add_argument("--dense-units", type=int, help="units of the hidden dense layer")
    parser.add_argument("--dropout", type=float, help="dropout of the dense head")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no random cube symmetry on training volumes")
    parser.add_argument("--allow-unlabelled", action="store_true",
                        help="skip volumes without a label instead of failing")


def config_from_args(args: argparse.Namespace):
    """The `ClassifierConfig` of parsed command-line arguments."""
    from dataclasses import fields

    from kdsb.training.classifier import ClassifierConfig

    # Every option is named after its ClassifierConfig field.
    values = {field.name: getattr(args, field.name) for field in fields(ClassifierConfig)}
    return ClassifierConfig(**{**values, "gmcae": str(args.gmcae), "levels": tuple(args.levels)})


def run(args: argparse.Namespace) -> int:
    from kdsb.commands import require_dir, require_file
    from kdsb.evaluation.evaluate import format_table
    from kdsb.training.classifier import METRICS_NAME, train_classifier

    require_dir(args.data_dir, "DATA_DIR, a folder of kdsb volume files")
    require_file(args.labels, "LABELS_CSV, an id,cancer CSV of 0/1 labels")
    result = train_classifier(args.data_dir, args.labels, args.run_dir, config_from_args(args))
    scores = {
        "log_loss": result["val_log_loss"],
        "base_rate_log_loss": result["val_base_rate_log_loss"],
        "roc_auc": result["val_auc"],
        "accuracy": result["val_accuracy"],
        "n": result["n_val"],
        "n_positive": result["n_val_positive"],
    }
    print(format_table(scores, title="validation"))
    print(f"wrote {args.run_dir / METRICS_NAME}")
    return 0
