"""`kdsb preprocess INPUT_ROOT OUT_DIR`: one patient's scan each (a DICOM folder, or a NIfTI,
MetaImage or NRRD file) → one lung-cropped HDF5 volume each."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdsb.preprocessing.pipeline import DEFAULT_MARGIN_MM, DEFAULT_SPACING_MM

DEFAULT_MAX_WORKERS = 4

HELP = (
    "DICOM folders or NIfTI/MetaImage/NRRD files (one per patient) → lung-cropped HU volumes in "
    "HDF5, with manifest.csv"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input_root", type=Path,
        help="folder with one entry per patient: a sub-folder (DICOM series, or one volume file) "
        "named by the id, or a volume file (.nii, .nii.gz, .mhd with its .raw, .mha, .nrrd, "
        ".nhdr with its data file) "
        "whose name without its suffix is the id",
    )
    parser.add_argument("out_dir", type=Path, help="folder for <id>.h5 files and manifest.csv")
    parser.add_argument(
        "--workers", type=int, default=None,
        help=f"worker processes (default: the cores this process may use, at most "
             f"{DEFAULT_MAX_WORKERS})",
    )
    parser.add_argument(
        "--spacing", type=float, nargs="+", default=list(DEFAULT_SPACING_MM), metavar="MM",
        help="target spacing in mm: one value (isotropic) or three (z y x)",
    )
    parser.add_argument("--margin-mm", type=float, default=None, metavar="MM",
                        help=f"margin kept around the lungs' bounding box, mm (default: "
                             f"{DEFAULT_MARGIN_MM:g})")
    parser.add_argument("--overwrite", action="store_true", help="redo patients already written")
    parser.add_argument("--qc", type=Path, default=None, metavar="DIR",
                        help="write a QC PNG per patient and a contact sheet here")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run on the Dask cluster of this scheduler (tcp://host:8786) "
                             "instead of --workers local processes; workers must see the "
                             "same paths")


def run(args: argparse.Namespace) -> int:
    from kdsb.preprocessing.cohort import run_cohort
    from kdsb.preprocessing.pipeline import usable_cores

    # The cores of this process's affinity, not the machine's (found in review: a Slurm job of
    # 2 CPUs on a 64-core node started 4 workers, 4 scans' memory, on its 2 cores).
    workers = min(DEFAULT_MAX_WORKERS, usable_cores()) if args.workers is None else args.workers
    if args.scheduler is not None and args.workers is not None:
        logging.getLogger(__name__).warning(
            "--workers %d is not used with --scheduler: the cluster's workers run the patients",
            args.workers)
    margin = {} if args.margin_mm is None else {"margin_mm": args.margin_mm}  # run_cohort's own
    return run_cohort(
        args.input_root,
        args.out_dir,
        workers=workers,
        spacing=args.spacing,
        **margin,
        overwrite=args.overwrite,
        qc_dir=args.qc,
        scheduler=args.scheduler,
    )
