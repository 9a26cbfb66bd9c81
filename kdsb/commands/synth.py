"""`kdsb synth OUT_ROOT --patients N --seed S`: a phantom chest-CT cohort written as DICOM."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a phantom chest-CT cohort as DICOM series plus labels.csv and ground truth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_root", type=Path, help="folder to create: dicom/<id>/, labels.csv")
    parser.add_argument("--patients", type=int, default=8, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=128, help="axial image side in pixels")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="physical size of each patient relative to an adult chest (0.6: small demo volumes)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cohort")


def run(args: argparse.Namespace) -> int:
    from kdsb.synthetic import write_cohort

    labels_csv = write_cohort(
        args.out_root,
        patients=args.patients,
        seed=args.seed,
        size=args.size,
        scale=args.scale,
        overwrite=args.overwrite,
    )
    root = labels_csv.parent
    print(f"DICOM series: {root / 'dicom'}")
    print(f"labels:       {labels_csv}")
    print(f"ground truth: {root / 'truth'}")
    return 0
