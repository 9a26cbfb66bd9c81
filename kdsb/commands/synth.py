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


def run(args: argparse.Namespace) -> int:
    from kdsb.synthetic import write_cohort

    write_cohort(args.out_root, patients=args.patients, seed=args.seed, size=args.size)
    return 0
