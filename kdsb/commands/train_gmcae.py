"""`kdsb train-gmcae DATA_DIR RUN_DIR`: train the GMCAE (see `kdsb.training.gmcae`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdsb.training.gmcae import GmcaeOptions
from kdsb.training.runs import add_options, given_options, resumable_flags

HELP = "train the GMCAE on 3D lung patches (unsupervised, Gaussian mixture NLL)"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of kdsb volume files (<id>.h5)")
    parser.add_argument("run_dir", type=Path, help="folder for the model, checkpoints and plots")
    add_options(parser, GmcaeOptions)
    parser.add_argument(
        "--resume", action="store_true",
        help="continue RUN_DIR from its last checkpoint with its saved options (only "
             f"{resumable_flags(GmcaeOptions)} may change); refused when the patients or the "
             "volumes' spacing have changed",
    )


def run(args: argparse.Namespace) -> int:
    from kdsb.io.paths import require_output_dir, require_volume_dir
    from kdsb.training.gmcae import MODEL_NAME, train_gmcae

    require_volume_dir(args.data_dir)
    require_output_dir(args.run_dir, "RUN_DIR, a folder for the run")
    summary = train_gmcae(
        args.data_dir, args.run_dir, given_options(args, GmcaeOptions), resume=args.resume
    )
    if summary is None:
        print(f"worker done: the chief writes {args.run_dir}")
        return 0
    print(
        f"validation NLL per voxel: GMCAE {summary['best_val_nll_per_voxel']:.4f} "
        f"(best, epoch {summary['best_epoch']}; final {summary['final_val_nll_per_voxel']:.4f}), "
        f"single Gaussian {summary['single_gaussian_val_nll_per_voxel']:.4f}"
    )
    print(f"model: {args.run_dir / MODEL_NAME}")
    if summary["best_val_nll_per_voxel"] > summary["single_gaussian_val_nll_per_voxel"]:
        # Found by a user's trial: a model worse than the baseline went by unremarked.
        logger.warning("the GMCAE models the validation patches worse than a single Gaussian "
                       "fitted to them: train it longer (--epochs, --steps-per-epoch), or check "
                       "its volumes and options, before using its features")
    return 0
