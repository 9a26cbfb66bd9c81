"""The folder layout of a cohort `kdsb synth` writes (phantoms or implants), in one place:

    OUT_ROOT/dicom/<id>/       one DICOM series a patient (what `kdsb preprocess` reads)
    OUT_ROOT/truth/<id>.npz    the patient's ground-truth arrays; <id>.json its record
    OUT_ROOT/labels.csv        id,cancer, written last: a cohort without it is unfinished

Imports nothing heavy, so `kdsb --help` and the demo can name these paths.
"""

from __future__ import annotations

import os
from pathlib import Path

DICOM_DIR = "dicom"
TRUTH_DIR = "truth"
LABELS_NAME = "labels.csv"


def dicom_dir(out_root: str | os.PathLike) -> Path:
    """The folder of the cohort's DICOM series, one subfolder a patient."""
    return Path(out_root) / DICOM_DIR


def truth_dir(out_root: str | os.PathLike) -> Path:
    """The folder of the cohort's ground truth (`<id>.npz`, `<id>.json`)."""
    return Path(out_root) / TRUTH_DIR


def labels_path(out_root: str | os.PathLike) -> Path:
    """The cohort's `id,cancer` labels CSV."""
    return Path(out_root) / LABELS_NAME
