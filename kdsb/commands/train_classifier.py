"""`kdsb train-classifier DATA_DIR LABELS_CSV RUN_DIR --gmcae GMCAE.keras` (see
`kdsb.training.classifier`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdsb.training.classifier_options import ClassifierOptions
from kdsb.training.runs import add_options, given_options, resumable_flags

HELP = ("train the cancer classifier on a GMCAE's encoder (SPP or MIL head), calibrated, "
        "optionally cross-validated")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of <id>.h5 volumes")
    parser.add_argument("labels", type=Path, help="id,cancer CSV of 0/1 labels")
    parser.add_argument("run_dir", type=Path, help="run folder: classifier.keras, metrics.json …")
    add_options(parser, ClassifierOptions)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint with the run's saved options "
                             f"(only {resumable_flags(ClassifierOptions)} may change); refused "
                             "when the patients, the volumes' spacing or the GMCAE's content "
                             "have changed")


def run(args: argparse.Namespace) -> int:
    from kdsb.evaluation.evaluate import format_table
    from kdsb.io.paths import require_file, require_output_dir, require_volume_dir
    from kdsb.io.run_layout import METRICS_NAME, OOF_NAME
    from kdsb.training.classifier import train_classifier

    require_volume_dir(args.data_dir)
    require_file(args.labels, "LABELS_CSV, an id,cancer CSV of 0/1 labels")
    require_output_dir(args.run_dir, "RUN_DIR, a folder for the run")
    result = train_classifier(
        args.data_dir, args.labels, args.run_dir, given_options(args, ClassifierOptions),
        resume=args.resume,
    )
    if result is None:
        print(f"worker done: the chief writes {args.run_dir}")
    elif "out_of_fold" in result:
        mapped = "calibrated" if _mapped(result) else "no calibration map"
        print(format_table(result["out_of_fold"],
                           title=f"out-of-fold ({result['folds']} folds, {mapped})"))
        print(f"wrote {args.run_dir / OOF_NAME} and {args.run_dir / METRICS_NAME}")
    else:
        mapped = "calibrated on it" if _mapped(result) else "no calibration map"
        print(format_table(result["validation"], title=f"validation ({mapped})"))
        print(f"wrote {args.run_dir / METRICS_NAME}")
    return 0


def _mapped(result: dict) -> bool:
    """Whether the run fitted a calibration map (not `--calibration none`, enough patients)."""
    return result["calibration"]["method"] != "none"
