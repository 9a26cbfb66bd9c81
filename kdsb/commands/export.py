"""`kdsb export DATA_DIR OUT_DIR`: volumes, lung masks (and heatmaps) as NIfTI for viewers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = ("write <id>_hu.nii.gz, <id>_lung_mask.nii.gz (and <id>_heatmap.nii.gz) with the RAS "
        "affine, to open at the scanner's position in 3D Slicer or ITK-SNAP")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="folder of kdsb volume files (<id>.h5)")
    parser.add_argument("out_dir", type=Path, help="folder for the NIfTI files")
    parser.add_argument("--ids", type=Path, default=None, metavar="IDS_CSV",
                        help="export only the ids of this CSV's id column (default: all)")
    parser.add_argument("--heatmaps", type=Path, default=None, metavar="DIR",
                        help="also export <id>.h5 heatmaps of `kdsb explain` from DIR")


def run(args: argparse.Namespace) -> int:
    from kdsb.io.nifti import export_cohort
    from kdsb.io.paths import require_dir, require_file, require_output_dir, require_volume_dir
    from kdsb.io.tables import read_ids

    require_volume_dir(args.data_dir)
    require_output_dir(args.out_dir, "OUT_DIR, a folder for the NIfTI files")
    ids = read_ids(require_file(args.ids, "IDS_CSV, a CSV with an id column")) if args.ids else None
    if args.heatmaps is not None:
        require_dir(args.heatmaps, "--heatmaps DIR, a folder of kdsb explain heatmaps")
    exported, failed = export_cohort(args.data_dir, args.out_dir, ids, args.heatmaps,
                                     ids_source=str(args.ids))
    for reason in failed.values():
        print(f"kdsb export: failed: {reason}", file=sys.stderr)
    print(f"exported {len(exported)} patient(s) to {args.out_dir}"
          + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
