"""Tests of kdsb.phantoms.dicom_write: the files are valid CT Image Storage with the promised
geometry."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from kdsb.errors import DicomError
from kdsb.hu import OUTSIDE_FIELD_HU
from kdsb.phantoms.dicom_write import Acquisition, write_ct_series

SHAPE = (4, 6, 7)  # (z, y, x)
SPACING = (2.5, 0.7, 0.8)  # mm, (z, y, x)
ORIGIN = (-120.0, -50.5, -60.25)  # mm, (Z, Y, X)


@pytest.fixture
def hu() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1500, SHAPE).astype(np.int16)


def _read_all(paths):
    return [pydicom.dcmread(p) for p in paths]


def test_writes_valid_ct_image_storage(tmp_path, hu):
    paths = write_ct_series(tmp_path, hu, SPACING, ORIGIN, patient_id="p1")
    assert [p.name for p in paths] == [f"CT001_{k:05d}.dcm" for k in range(1, SHAPE[0] + 1)]
    datasets = _read_all(paths)
    for k, ds in enumerate(datasets):
        assert ds.preamble == bytes(128)  # the DICOM file preamble, then "DICM"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.Modality == "CT" and ds.PatientID == "p1"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 1)
        assert (ds.Rows, ds.Columns) == SHAPE[1:]
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.ImagePositionPatient] == [-60.25, -50.5, -120.0 + 2.5 * k]
        assert float(ds.SliceThickness) == 2.5
        assert ds.InstanceNumber == k + 1
        hu_slice = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu_slice, hu[k])
    assert len({ds.SOPInstanceUID for ds in datasets}) == SHAPE[0]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1


def test_uids_reproducible_from_seed(tmp_path, hu):
    first = _read_all(write_ct_series(tmp_path / "a", hu, SPACING, ORIGIN, patient_id="p"))
    again = _read_all(write_ct_series(tmp_path / "b", hu, SPACING, ORIGIN, patient_id="p"))
    other = _read_all(write_ct_series(
        tmp_path / "c", hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(seed=1),
    ))
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert first[0].SeriesInstanceUID != other[0].SeriesInstanceUID


@pytest.mark.parametrize(
    ("storage", "slope", "intercept", "dtype"),
    [("int16", 1.0, -1024.0, np.int16), ("uint16", 1.0, -1024.0, np.uint16),
     ("int16", 0.5, -1000.0, np.int16), ("uint16", 2.0, -2048.0, np.uint16)],
)
def test_storage_styles(tmp_path, storage, slope, intercept, dtype):
    hu = (np.random.default_rng(1).integers(-500, 1000, SHAPE) * 2).astype(np.int16)
    paths = write_ct_series(
        tmp_path, hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(storage=storage, slope=slope, intercept=intercept),
    )
    ds = pydicom.dcmread(paths[1])
    assert ds.PixelRepresentation == (1 if storage == "int16" else 0)
    assert ds.pixel_array.dtype == dtype
    np.testing.assert_array_equal(ds.pixel_array, (hu[1] - intercept) / slope)


def test_flips_negate_orientation_and_move_first_pixel(tmp_path, hu):
    paths = write_ct_series(
        tmp_path, hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(flip_rows=True, flip_columns=True),
    )
    ds = pydicom.dcmread(paths[0])
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    x_far = ORIGIN[2] + (SHAPE[2] - 1) * SPACING[2]
    y_far = ORIGIN[1] + (SHAPE[1] - 1) * SPACING[1]
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                               [x_far, y_far, ORIGIN[0]])
    np.testing.assert_array_equal(ds.pixel_array + 1024, hu[0][::-1, ::-1] + 2048)


@pytest.mark.parametrize("order", ["descending", "random"])
def test_slice_order_and_shuffled_names(tmp_path, hu, order):
    paths = write_ct_series(
        tmp_path, hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(slice_order=order, shuffle_names=True),
    )
    numbers = [pydicom.dcmread(p).InstanceNumber for p in paths]
    assert sorted(numbers) == list(range(1, SHAPE[0] + 1))
    if order == "descending":
        assert numbers == list(range(SHAPE[0], 0, -1))
    else:
        assert numbers != sorted(numbers)
    assert all(not p.suffix for p in paths) and len({p.name for p in paths}) == SHAPE[0]


def test_padding_declared_or_outside_field_value(tmp_path, hu):
    mask = np.zeros(SHAPE, bool)
    mask[:, 0, :] = True
    declared = write_ct_series(
        tmp_path / "a", hu, SPACING, ORIGIN, patient_id="p", padding_mask=mask,
        acquisition=Acquisition(padding_value=-3000),
    )
    ds = pydicom.dcmread(declared[0])
    assert ds.PixelPaddingValue == -3000
    assert np.all(ds.pixel_array[0] == -3000) and np.all(ds.pixel_array[1:] > -3000)
    implicit = write_ct_series(tmp_path / "b", hu, SPACING, ORIGIN, patient_id="p",
                               padding_mask=mask)
    ds = pydicom.dcmread(implicit[0])
    assert "PixelPaddingValue" not in ds
    assert np.all(ds.pixel_array[0] + float(ds.RescaleIntercept) == OUTSIDE_FIELD_HU)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"storage": "uint16", "intercept": 0.0}, "fit uint16 storage"),
     ({"storage": "float"}, "expected storage in"),
     ({"slice_order": "sideways"}, "expected slice_order"),
     ({"photometric": "RGB"}, "expected photometric"),
     ({"slope": 0.0}, "non-zero slope"),
     ({"compression": "zip"}, "expected compression"),
     ({"storage": "uint16", "padding_mask": np.ones(SHAPE, bool)}, "expected a padding_value"),
     ({"padding_mask": np.zeros((1, 2, 3), bool)}, "padding_mask of shape")],
)
def test_invalid_arguments(tmp_path, hu, kwargs, match):
    padding_mask = kwargs.pop("padding_mask", None)
    with pytest.raises(DicomError, match=match):
        write_ct_series(tmp_path, hu, SPACING, ORIGIN, patient_id="p", padding_mask=padding_mask,
                        acquisition=Acquisition(**kwargs))
    assert not list(tmp_path.iterdir())


def test_padding_value_taken_by_a_real_pixel(tmp_path, hu):
    mask = np.zeros(SHAPE, bool)
    mask[0, 0, 0] = True
    taken = int(hu[1, 2, 3]) + 1024  # the stored value of a pixel inside the field of view
    with pytest.raises(DicomError, match="no real pixel takes"):
        write_ct_series(tmp_path, hu, SPACING, ORIGIN, patient_id="p", padding_mask=mask,
                        acquisition=Acquisition(padding_value=taken))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("compression", "syntax"),
    [("rle", "1.2.840.10008.1.2.5"), ("jpeg2000", "1.2.840.10008.1.2.4.90")],
)
def test_lossless_compression(tmp_path, compression, syntax):
    hu = np.random.default_rng(1).integers(-1000, 2000, (3, 40, 48)).astype(np.int16)
    paths = write_ct_series(
        tmp_path, hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(compression=compression),
    )
    ds = pydicom.dcmread(paths[2])
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(ds.pixel_array, hu[2] + 1024)


def test_invalid_geometry_and_existing_files(tmp_path, hu):
    with pytest.raises(DicomError, match="3D"):
        write_ct_series(tmp_path, hu[0], SPACING, ORIGIN, patient_id="p")
    with pytest.raises(DicomError, match="positive spacings"):
        write_ct_series(tmp_path, hu, (0, 1, 1), ORIGIN, patient_id="p")
    with pytest.raises(DicomError, match="integer HU"):
        write_ct_series(tmp_path, hu.astype(float), SPACING, ORIGIN, patient_id="p")
    write_ct_series(tmp_path, hu, SPACING, ORIGIN, patient_id="p")
    with pytest.raises(DicomError, match="existing file"):
        write_ct_series(tmp_path, hu, SPACING, ORIGIN, patient_id="p")
    write_ct_series(
        tmp_path, hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(series_number=2),
    )
    assert len(list(tmp_path.iterdir())) == 2 * SHAPE[0]
