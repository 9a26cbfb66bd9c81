"""`kdsb embed DATA_DIR GMCAE.keras OUT_DIR`: patient embeddings, unusual patients, neighbours."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdsb.evaluation.embed import DEFAULT_NEIGHBOURS, DEFAULT_PATCHES, DEFAULT_TOP

HELP = ("GMCAE features per patient (embeddings.csv), the most unusual patients (outliers.csv), "
        "the most similar ones (neighbours.csv) and a 2D map (map.png)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of kdsb volume files (<id>.h5)")
    parser.add_argument("gmcae", type=Path,
                        help="a gmcae.keras written by kdsb train-gmcae, or its RUN_DIR")
    parser.add_argument("out_dir", type=Path, help="folder for the CSV files and map.png")
    parser.add_argument("--labels", type=Path, default=None, metavar="CSV",
                        help="id,cancer labels: colour the map by label")
    parser.add_argument("--patches", type=int, default=DEFAULT_PATCHES,
                        help="lung patches per patient")
    parser.add_argument("--top", type=int, default=None,
                        help=f"most unusual patches whose NLL scores a patient (default "
                             f"{DEFAULT_TOP}, or --patches if fewer)")
    parser.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                        help="nearest patients listed (and used by the outlier score)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch sampling")


def run(args: argparse.Namespace) -> int:
    from kdsb.data.inputs import gmcae_spacing_of
    from kdsb.errors import UsageError
    from kdsb.evaluation.embed import OUTLIERS_NAME, embed_cohort, write_embedding_files
    from kdsb.io.journal import SUFFIX, loaded_with_digests, open_journal
    from kdsb.io.paths import (
        require_file,
        require_keras_file,
        require_output_dir,
        require_volume_dir,
    )
    from kdsb.io.run_layout import GMCAE_MODEL_NAME
    from kdsb.io.tables import read_labels
    from kdsb.io.volumes import list_volumes
    from kdsb.models.classifier import load_gmcae

    paths = list_volumes(require_volume_dir(args.data_dir))
    if args.gmcae.is_dir():  # train-gmcae's RUN_DIR, as predict takes a classifier's
        if not (args.gmcae / GMCAE_MODEL_NAME).is_file():
            raise UsageError(f"expected GMCAE.keras or the RUN_DIR of kdsb train-gmcae, "
                             f"received a folder without {GMCAE_MODEL_NAME}: {args.gmcae} (a "
                             "run that has not finished an epoch?)")
        args.gmcae = args.gmcae / GMCAE_MODEL_NAME
    require_keras_file(args.gmcae, "GMCAE.keras, a model written by kdsb train-gmcae")
    require_output_dir(args.out_dir, "OUT_DIR, a folder for the CSV files and map.png")
    labels = read_labels(require_file(args.labels, "--labels, an id,cancer CSV")) \
        if args.labels else None
    if labels is not None and not set(labels) & set(paths):  # found by a user's trial
        logging.getLogger(__name__).warning(
            "--labels %s names none of the %d patients of %s: the map shows no label (another "
            "cohort's labels?)", args.labels, len(paths), args.data_dir)
    if args.top is None:
        args.top = min(DEFAULT_TOP, max(1, args.patches))
    for name in ("patches", "top", "neighbours"):
        if getattr(args, name) < 1:
            raise UsageError(f"expected --{name} >= 1, received {getattr(args, name)}")
    if args.top > args.patches:
        raise UsageError(f"expected --top at most --patches ({args.patches}), received "
                         f"{args.top}: a patient's score is the mean NLL of its --top most "
                         "unusual patches")
    # Loaded first: a model of another kind is refused before its records are looked for
    # (found by a user's trial: a warning of no gmcae.json beside a classifier came first).
    gmcae, (digest,) = loaded_with_digests([args.gmcae], lambda: load_gmcae(args.gmcae))
    spacing_mm = gmcae_spacing_of(args.gmcae)
    fingerprint = {"command": "embed", "gmcae": digest, "spacing_mm": spacing_mm,
                   "patches": args.patches, "top": args.top}
    # A killed run's patients are taken from its journal (kdsb.io.journal).
    with open_journal(args.out_dir / f"embed{SUFFIX}", fingerprint, "embed") as journal:
        table, failed = embed_cohort(gmcae, paths, patches=args.patches, top=args.top,
                                     seed=args.seed, spacing_mm=spacing_mm, journal=journal)
        write_embedding_files(args.out_dir, table, neighbours=args.neighbours, labels=labels)
        if not failed:  # else kept: a rerun embeds the failed patients only (as explain)
            journal.finish()
    for reason in failed.values():
        print(f"kdsb embed: failed: {reason}", file=sys.stderr)
    print(f"{len(table.ids)} patient(s) embedded; most unusual first in "
          f"{args.out_dir / OUTLIERS_NAME}")
    return 1 if failed else 0
