"""`kdsb predict DATA_DIR MODEL.keras [MORE.keras ...] --out OUT_CSV`: a Kaggle submission CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdsb.evaluation.predict import PROBABILITY_CLIP, TTA_ALL

HELP = "write an id,cancer CSV of p(cancer) per patient; several models are ensembled (mean logit)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of <id>.h5 volumes")
    parser.add_argument("models", type=Path, nargs="+", metavar="MODEL.keras|RUN_DIR",
                        help="trained classifier(s), or run folders of train-classifier (every "
                             "fold model of a cross-validated run); the ensemble's logit is "
                             "the mean of theirs")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_CSV",
                        help="the id,cancer CSV to write")
    parser.add_argument("--ids", type=Path, default=None, metavar="IDS_CSV",
                        help="score these ids in this order (a CSV with an id column, e.g. a "
                             "sample submission); default: every volume in DATA_DIR, sorted by id")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: the ensemble's mean logit over cube "
                             "symmetries of the input too")
    parser.add_argument("--tta-count", type=int, default=None, metavar="K",
                        help=f"with --tta, the first K cube symmetries (of {TTA_ALL} on an "
                             "isotropic grid, fewer on an anisotropic one; default: all)")
    parser.add_argument("--clip", type=float, default=None,
                        help="clip probabilities to [CLIP, 1 - CLIP] (default: "
                             f"{PROBABILITY_CLIP:g})")
    parser.add_argument("--fill-missing", type=float, default=None, metavar="P",
                        help="give a volume file that cannot be read (damaged), and with "
                             "--ids an id without a volume (a scan that failed preprocessing), "
                             "probability P, each named in a warning, instead of failing (e.g. "
                             "the training cohort's cancer rate)")


def run(args: argparse.Namespace) -> int:
    from kdsb.errors import UsageError
    from kdsb.evaluation.predict import PROBABILITY_CLIP, predict_cohort
    from kdsb.io.paths import require_file, require_output_file, require_volume_dir
    from kdsb.io.tables import read_ids
    from kdsb.preprocessing.out_dir import MANIFEST_NAME

    require_volume_dir(args.data_dir)
    require_output_file(args.out, "--out OUT_CSV, a CSV file to write")
    if args.tta_count is not None and not args.tta:
        raise UsageError(f"expected --tta with --tta-count, received --tta-count "
                         f"{args.tta_count} alone")
    if args.ids is not None:
        require_file(args.ids, "--ids, a CSV with an id column")
        if args.out.exists() and args.out.samefile(args.ids):  # found by a user's trial
            raise UsageError(f"expected --out OUT_CSV apart from --ids {args.ids}, received "
                             "the same file: the predictions would replace it")
    if args.out.suffix.lower() in (".h5", ".keras"):  # a volume or a model (review)
        raise UsageError(f"expected --out OUT_CSV, a CSV file to write, received {args.out}, "
                         "the name of a volume or model file: the predictions would replace it")
    manifest = args.data_dir / MANIFEST_NAME
    if args.out.exists() and manifest.exists() and args.out.samefile(manifest):
        raise UsageError(f"expected --out OUT_CSV apart from {manifest}, kdsb preprocess's "
                         "record of DATA_DIR: the predictions would replace it")
    ids = read_ids(args.ids) if args.ids is not None else None
    predictions = predict_cohort(
        args.data_dir,
        args.models,
        out_csv=args.out,
        ids=ids,
        ids_source=str(args.ids),
        tta=args.tta,
        tta_count=args.tta_count,
        clip=PROBABILITY_CLIP if args.clip is None else args.clip,
        fill_missing=args.fill_missing,
    )
    print(f"wrote {len(predictions)} prediction(s) to {args.out}")
    return 0
