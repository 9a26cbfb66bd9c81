"""Shared fixtures: real CT reference files (skipped offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.realdata import reference_files

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The longest test files, longest first (seconds of one `make test`, `--durations=0` summed per
# file): `make test` hands whole files to its two workers in collection order, so starting with
# the longest lets the two finish together (alphabetical order left one worker a minute more).
# The two that start TensorFlow processes of their own (multiworker, determinism) sit either side
# of the NumPy-only lungs file, so that they do not run at the same time: side by side, five
# TensorFlow processes on two cores, the determinism test took 99 s instead of 27.
LONGEST_FILES = (
    "test_train_classifier.py", "test_train_gmcae.py", "test_multiworker.py", "test_lungs.py",
    "test_determinism.py", "test_cohort.py", "test_embed.py", "test_demo.py", "test_explain.py",
    "test_cluster.py", "test_implants.py", "test_gmcae.py", "test_phantom_cohort.py",
    "test_cli.py", "test_lesions.py", "test_predict.py", "test_runs.py", "test_nll.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of `LONGEST_FILES` first, in its order; the others keep theirs."""
    rank = {name: place for place, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _reference_files_or_skip() -> Path:
    """The real CT files; without them the test skips, or fails where KDSB_REQUIRE_REALDATA=1
    (a CI that must not pass without its only real scans)."""
    files = reference_files()
    if files is None:
        message = "real CT reference files unavailable (offline?)"
        if os.environ.get("KDSB_REQUIRE_REALDATA") == "1":
            pytest.fail(message + " and KDSB_REQUIRE_REALDATA=1")
        pytest.skip(message)
    return files


@pytest.fixture(scope="session")
def real_ct_dicom_dir() -> Path:
    """A real 20-slice Siemens CT series in JPEG 2000 (a folder of DICOM files)."""
    files = _reference_files_or_skip()
    return files / "example_ct_dicom"


@pytest.fixture(scope="session")
def real_chest_nifti() -> Path:
    """A real chest CT in NIfTI, 1.5 mm, full lungs."""
    files = _reference_files_or_skip()
    return files / "aorta_report" / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def real_abdomen_nifti() -> tuple[Path, Path]:
    """A real abdominal CT in NIfTI, 3 mm, reaching up to the lung bases, and TotalSegmentator's
    label map of it (lung lobes 10–14, liver 5, colon 20)."""
    files = _reference_files_or_skip()
    return files / "example_ct.nii.gz", files / "example_seg_fast_force_split.nii.gz"
