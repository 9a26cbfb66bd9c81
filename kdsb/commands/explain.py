"""`kdsb explain DATA_DIR MODEL.keras [MORE.keras ...] OUT_DIR`: where the classifier looked."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kdsb.evaluation.explain import DEFAULT_METHOD, METHODS
from kdsb.evaluation.occlusion import DEFAULT_OCCLUSION_MM, STRIDES_PER_EDGE

HELP = ("a 3D heatmap per patient of what drove p(cancer) (<id>.h5, <id>.png overlay) and "
        "peaks.csv, the hottest point in patient mm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse cannot show a last positional after a "+" one: the usage line says it.
    parser.usage = (f"%(prog)s [-h] [-v | -q] [--method {{{','.join(METHODS)}}}] [--ids IDS_CSV]\n"
                    "       [--occlusion-mm OCCLUSION_MM] [--stride-mm STRIDE_MM]\n"
                    "       DATA_DIR MODEL.keras [MORE.keras ...] OUT_DIR")
    parser.add_argument("data_dir", type=Path, help="folder of <id>.h5 volumes")
    parser.add_argument("models", type=Path, nargs="+", metavar="MODEL.keras",
                        help="trained classifier(s) or run folders (every fold model; an "
                             "ensemble's maps are averaged); the last path given is OUT_DIR, "
                             "the folder for the heatmaps and peaks.csv")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="Grad-CAM on the encoder's last convolution, or occlusion "
                             "sensitivity (one forward pass per cube position: slow)")
    parser.add_argument("--ids", type=Path, default=None, metavar="IDS_CSV",
                        help="explain these ids (a CSV with an id column); default: all")
    parser.add_argument("--occlusion-mm", type=float, default=None,
                        help=f"occlusion cube edge, mm (default {DEFAULT_OCCLUSION_MM:g})")
    parser.add_argument("--stride-mm", type=float, default=None,
                        help=f"occlusion step, mm, at most the cube edge (default: the edge / "
                             f"{STRIDES_PER_EDGE:g}, {DEFAULT_OCCLUSION_MM / STRIDES_PER_EDGE:g} "
                             f"for {DEFAULT_OCCLUSION_MM:g} mm cubes)")


def run(args: argparse.Namespace) -> int:
    from kdsb.errors import UsageError
    from kdsb.evaluation.explain import PEAKS_NAME, explain_cohort
    from kdsb.io.paths import require_file, require_output_dir, require_volume_dir
    from kdsb.io.tables import read_ids

    if len(args.models) < 2:
        raise UsageError(f"expected DATA_DIR MODEL.keras [MORE.keras ...] OUT_DIR, received "
                         f"only {args.models[0]} after DATA_DIR: a model or OUT_DIR is missing")
    *models, out_dir = args.models
    require_volume_dir(args.data_dir)
    require_output_dir(out_dir, "OUT_DIR, a folder for the heatmaps")
    ids = read_ids(require_file(args.ids, "--ids, a CSV with an id column")) if args.ids else None
    given = [flag for flag, value in (("--occlusion-mm", args.occlusion_mm),
                                      ("--stride-mm", args.stride_mm)) if value is not None]
    if given and args.method != "occlusion":  # found by a user's check: ignored silently
        logging.getLogger(__name__).warning("--method %s ignores %s (occlusion only)",
                                            args.method, " and ".join(given))
    occlusion_mm = DEFAULT_OCCLUSION_MM if args.occlusion_mm is None else args.occlusion_mm
    found, failed = explain_cohort(args.data_dir, models, out_dir, ids=ids,
                                   ids_source=str(args.ids), method=args.method,
                                   occlusion_mm=occlusion_mm, stride_mm=args.stride_mm)
    for reason in failed.values():
        print(f"kdsb explain: failed: {reason}", file=sys.stderr)
    print(f"explained {len(found)} patient(s): heatmaps and PNGs in {out_dir}, peaks in "
          f"{out_dir / PEAKS_NAME}" + (f"; {len(failed)} failed (rerun to retry them alone)"
                                       if failed else ""))
    return 1 if failed else 0
