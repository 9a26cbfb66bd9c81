"""Shared fixtures: real CT reference files (skipped offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.realdata import reference_files

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def real_ct_dicom_dir() -> Path:
    """A real 20-slice Siemens CT series in JPEG 2000 (a folder of DICOM files)."""
    files = reference_files()
    if files is None:
        pytest.skip("real CT reference files unavailable (offline?)")
    return files / "example_ct_dicom"


@pytest.fixture(scope="session")
def real_chest_nifti() -> Path:
    """A real chest CT in NIfTI, 1.5 mm, full lungs."""
    files = reference_files()
    if files is None:
        pytest.skip("real CT reference files unavailable (offline?)")
    return files / "aorta_report" / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def real_abdomen_nifti() -> tuple[Path, Path]:
    """A real abdominal CT in NIfTI, 3 mm, reaching up to the lung bases, and TotalSegmentator's
    label map of it (lung lobes 10–14, liver 5, colon 20)."""
    files = reference_files()
    if files is None:
        pytest.skip("real CT reference files unavailable (offline?)")
    return files / "example_ct.nii.gz", files / "example_seg_fast_force_split.nii.gz"
