"""Tests for kdsb.preprocessing.pipeline: one patient's scan to one volume file."""

from __future__ import annotations

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
