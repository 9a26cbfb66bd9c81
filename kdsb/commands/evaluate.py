"""`kdsb evaluate PRED_CSV LABELS_CSV`: log loss, Brier score, ECE, ROC AUC, accuracy and the
base-rate log loss with bootstrap intervals, and a confusion matrix at a chosen threshold."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = ("score an id,cancer prediction CSV against labels: log loss, Brier, ECE, ROC AUC, "
        "accuracy with bootstrap intervals, confusion matrix, plots")
# As metrics.DEFAULT_BOOTSTRAP (a test checks they agree); repeated here so `kdsb --help`
# imports no SciPy (metrics imports scipy.stats, ~0.3 s).
DEFAULT_BOOTSTRAP = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", type=Path, help="id,cancer CSV of probabilities")
    parser.add_argument("labels", type=Path,
                        help="id,cancer CSV of 0/1 labels (of the --validation patients too)")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write roc.png and calibration.png here")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="N",
                        help="resamples of patients for 95%% percentile intervals; 0: none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--threshold", default=None, metavar="youden|f1|VALUE",
                        help="print the confusion matrix at this threshold: a number in (0, 1), "
                             "or picked on --validation by Youden's J or F1")
    parser.add_argument("--validation", type=Path, default=None, metavar="VAL_PRED_CSV",
                        help="id,cancer predictions of validation / out-of-fold patients "
                             "(not the evaluated ones) to pick a youden or f1 threshold on")
    parser.add_argument("--clip", type=float, default=None,
                        help="the clip kdsb predict made PRED_CSV with (its --clip; default: "
                             "its default, 0.005): a youden or f1 threshold picked beyond "
                             "[CLIP, 1 - CLIP] moves to the nearest cut between clipped values")
    parser.add_argument("--predicted-only", action="store_true",
                        help="score the predicted patients even when LABELS_CSV names more (a "
                             "held-out part of a cohort against its whole labels file); "
                             "without it both files must name the same patients")


def run(args: argparse.Namespace) -> int:
    from kdsb.errors import UsageError
    from kdsb.evaluation.evaluate import (
        CALIBRATION_PNG,
        ROC_PNG,
        evaluate,
        format_confusion,
        format_table,
        parse_threshold,
    )
    from kdsb.evaluation.metrics import DEFAULT_LEVEL
    from kdsb.io.paths import require_file, require_output_dir

    require_file(args.predictions, "PRED_CSV, an id,cancer CSV of probabilities")
    require_file(args.labels, "LABELS_CSV, an id,cancer CSV of 0/1 labels")
    if args.validation is not None:
        require_file(args.validation, "VAL_PRED_CSV, an id,cancer CSV of probabilities")
    if args.plots is not None:
        require_output_dir(args.plots, "--plots DIR, a folder for the plots")
    if args.seed < 0:
        raise UsageError(f"expected --seed of 0 or more, received {args.seed}")
    picked = args.threshold is not None and isinstance(parse_threshold(args.threshold), str)
    if args.clip is not None and not picked:
        # Found in review: parsed, checked and ignored without a word.
        logging.getLogger(__name__).warning(
            "--clip moves only a threshold picked by youden or f1 on --validation: ignored "
            "with %s", "no --threshold" if args.threshold is None else "--threshold VALUE")
    scores = evaluate(args.predictions, args.labels, plots_dir=args.plots, n_boot=args.bootstrap,
                      seed=args.seed, threshold=args.threshold, validation_csv=args.validation,
                      predicted_only=args.predicted_only,
                      **({} if args.clip is None else {"clip": args.clip}))
    intervals = scores.get("intervals")
    print(format_table(scores, title=f"{args.predictions} vs {args.labels}", intervals=intervals))
    if intervals is not None:
        print(f"[low, high]: {DEFAULT_LEVEL:.0%} percentile bootstrap intervals, "
              f"{args.bootstrap} resamples of patients (seed {args.seed})")
    if "threshold" in scores:
        print(format_confusion(scores["threshold"]))
    if args.plots is not None:
        print(f"plots: {args.plots / ROC_PNG}, {args.plots / CALIBRATION_PNG}")
    return 0
