"""`kdsb evaluate PRED_CSV LABELS_CSV`: log loss, ROC AUC, accuracy and the base-rate log loss."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "score an id,cancer prediction CSV against labels: log loss, ROC AUC, accuracy, plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", type=Path, help="id,cancer CSV of probabilities")
    parser.add_argument("labels", type=Path, help="id,cancer CSV of 0/1 labels")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write roc.png and calibration.png here")


def run(args: argparse.Namespace) -> int:
    from kdsb.commands import require_file
    from kdsb.evaluation.evaluate import CALIBRATION_PNG, ROC_PNG, evaluate, format_table

    require_file(args.predictions, "PRED_CSV, an id,cancer CSV of probabilities")
    require_file(args.labels, "LABELS_CSV, an id,cancer CSV of 0/1 labels")
    scores = evaluate(args.predictions, args.labels, plots_dir=args.plots)
    print(format_table(scores, title=f"{args.predictions} vs {args.labels}"))
    if args.plots is not None:
        print(f"plots: {args.plots / ROC_PNG}, {args.plots / CALIBRATION_PNG}")
    return 0
