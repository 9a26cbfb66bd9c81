"""Tests for kdsb.preprocessing.pipeline: one patient's scan to one volume file."""

from __future__ import annotations

import numpy as np
import pytest

from kdsb.errors import KdsbError
from kdsb.io import volumes
from kdsb.phantoms.cohort import write_cohort
from kdsb.preprocessing.pipeline import STATUS_OK, preprocess_patient, read_patient


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """One small phantom patient's DICOM folder."""
    root = tmp_path_factory.mktemp("phantom")
    write_cohort(root, patients=1, seed=0, size=96, scale=0.7)
    return next((root / "dicom").iterdir())


def test_preprocess_patient_returns_its_result(patient, tmp_path):
    result = preprocess_patient(patient, tmp_path, spacing=(2.0, 2.0, 2.0), margin_mm=4.0)
    assert result.status == STATUS_OK and result.patient_id == patient.name
    volume = volumes.read_volume(tmp_path / f"{patient.name}.h5")
    assert volume.spacing == (2.0, 2.0, 2.0) and volume.attrs["margin_mm"] == 4.0
    assert result.shape == volume.hu.shape
    scan = read_patient(patient)
    assert list(volume.attrs["source_shape"]) == list(scan.hu.shape)
    assert list(volume.attrs["source_spacing"]) == list(scan.spacing)


def test_bad_target_spacing_fails_before_anything_is_written(patient, tmp_path):
    with pytest.raises(KdsbError, match="expected target spacing as 3 positive finite numbers"):
        preprocess_patient(patient, tmp_path, spacing=(1.0, 0.0, 1.0))
    assert list(tmp_path.iterdir()) == []


def test_threads_change_nothing_written(patient, tmp_path):
    """One thread or several (transforms, block means, the two resamplings side by side,
    deflating): the same volume, mask and geometry."""
    written = []
    for threads in (1, 2):
        preprocess_patient(patient, tmp_path / str(threads), spacing=(1.5, 1.5, 1.5),
                           threads=threads)
        written.append(volumes.read_volume(tmp_path / str(threads) / f"{patient.name}.h5"))
    one, two = written
    np.testing.assert_array_equal(one.hu, two.hu)
    np.testing.assert_array_equal(one.lung_mask, two.lung_mask)
    assert one.lung_mask.any() and (one.spacing, one.origin) == (two.spacing, two.origin)
