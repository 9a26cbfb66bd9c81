"""Write a canonical HU volume as a DICOM CT series: the phantom generator's and the tests' writer.

The volume is int16 Hounsfield units in kdsb's canonical orientation, shape (z, y, x): axis 0
inferior → superior, axis 1 anterior → posterior, axis 2 right → left, so DICOM patient
coordinates (X, Y, Z) increase along every axis. One uncompressed CT Image Storage file is
written per slice, with the geometry and storage quirks real scanners produce (unsigned storage
with an intercept, slopes other than 1, padded fields of view, descending or random instance
numbers, negated orientation vectors, shuffled file names) so that `kdsb.io.dicom.read_series` can
be tested against a known truth.

Padding: pixels flagged by `padding_mask` are written as `padding_value` and that value is
declared as PixelPaddingValue. When `padding_value` is None the padded pixels are instead
written as the raw value whose rescaled HU is -2000 (the "outside the field of view" value many
scanners write) and no PixelPaddingValue is declared. The reader turns both into air
(-1000 HU).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from kdsb.errors import DicomError
from kdsb.preprocessing.hu import OUTSIDE_FIELD_HU

logger = logging.getLogger(__name__)

STORAGE_RANGES = {"int16": (-32768, 32767), "uint16": (0, 65535)}
PIXEL_REPRESENTATION = {"int16": 1, "uint16": 0}
SLICE_ORDERS = ("ascending", "descending", "random")
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
DEFAULT_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "AXIAL")
# Lossless compressions pydicom can encode with the installed plugins (pylibjpeg-openjpeg).
COMPRESSIONS = {"rle": RLELossless, "jpeg2000": JPEG2000Lossless}
STUDY_DATE = datetime.date(2017, 1, 1)  # fixed so that phantom cohorts are byte-reproducible
DS_DIGITS = 10  # significant digits written into decimal strings (DS holds at most 16 chars)
NAME_DIGITS = 5  # zero-padded instance number in ordered file names
RANDOM_NAME_BYTES = 8


def _ds(value: float) -> str:
    """A float as a DICOM decimal string (at most 16 characters)."""
    return f"{value:.{DS_DIGITS}g}"


def _check_geometry(hu: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> None:
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise DicomError(f"expected a 3D (z, y, x) HU volume, received shape {hu.shape}")
    if not np.issubdtype(hu.dtype, np.integer):
        raise DicomError(f"expected integer HU values, received dtype {hu.dtype}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DicomError(f"expected 3 positive spacings in mm (z, y, x), received {spacing}")
    if len(origin) != 3 or not all(np.isfinite(o) for o in origin):
        raise DicomError(f"expected 3 finite origin coordinates in mm (z, y, x), received {origin}")


def _stored_values(
    hu: np.ndarray,
    storage: str,
    slope: float,
    intercept: float,
    padding_mask: np.ndarray | None,
    padding_value: int | None,
) -> tuple[np.ndarray, int | None]:
    """Raw stored pixel values for `hu`, and the PixelPaddingValue to declare (or None)."""
    low, high = STORAGE_RANGES[storage]
    stored = np.rint((hu.astype(np.float32) - np.float32(intercept)) / np.float32(slope))
    if stored.min() < low or stored.max() > high:
        raise DicomError(
            f"expected HU values that fit {storage} storage with slope {slope} and intercept "
            f"{intercept}, received HU range [{hu.min()}, {hu.max()}]"
        )
    declared = None
    if padding_mask is not None:
        if padding_mask.shape != hu.shape:
            raise DicomError(
                f"expected padding_mask of shape {hu.shape}, received {padding_mask.shape}"
            )
        padding_mask = padding_mask.astype(bool)
        if padding_value is None:
            raw = round((OUTSIDE_FIELD_HU - intercept) / slope)
            if not low <= raw <= high:
                raise DicomError(
                    f"expected a padding_value for {storage} storage with intercept {intercept} "
                    f"({OUTSIDE_FIELD_HU} HU is not representable), received None"
                )
        else:
            raw = int(padding_value)
            if not low <= raw <= high:
                raise DicomError(
                    f"expected a padding_value within {storage} range [{low}, {high}], "
                    f"received {padding_value}"
                )
            if np.any(stored[~padding_mask] == raw):
                raise DicomError(
                    f"expected a padding_value that no real pixel takes, received {raw} "
                    f"(HU {raw * slope + intercept:g} occurs inside the field of view)"
                )
            declared = raw
        stored[padding_mask] = raw
    dtype = np.int16 if storage == "int16" else np.uint16
    return stored.astype(dtype), declared


def _instance_numbers(n_slices: int, slice_order: str, rng: np.random.Generator) -> np.ndarray:
    """InstanceNumber of each canonical slice (index 0 = most inferior)."""
    if slice_order == "ascending":
        return np.arange(1, n_slices + 1)
    if slice_order == "descending":
        return np.arange(n_slices, 0, -1)
    return rng.permutation(n_slices) + 1


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    *,
    patient_id: str,
    series_uid: str | None = None,
    storage: str = "int16",
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding_mask: np.ndarray | None = None,
    padding_value: int | None = None,
    slice_order: str = "ascending",
    flip_rows: bool = False,
    flip_columns: bool = False,
    shuffle_names: bool = False,
    seed: int = 0,
    modality: str = "CT",
    study_uid: str | None = None,
    series_number: int = 1,
    image_type: Sequence[str] = DEFAULT_IMAGE_TYPE,
    photometric: str = "MONOCHROME2",
    slice_thickness: float | None = None,
    compression: str | None = None,
) -> list[Path]:
    """Write `hu` as one DICOM CT series, one uncompressed file per slice.

    Args:
        folder: output folder (created if needed); existing files are never overwritten.
        hu: integer HU, shape (z, y, x), canonical orientation (patient Z, Y, X increasing).
        spacing: voxel size in mm, (z, y, x). PixelSpacing is written as (y, x).
        origin: patient coordinate in mm of voxel [0, 0, 0], (z, y, x) i.e. (Z, Y, X).
        patient_id: PatientID and PatientName.
        series_uid: SeriesInstanceUID; derived from patient_id, series_number and seed if None.
        storage: "int16" (PixelRepresentation 1) or "uint16" (PixelRepresentation 0; choose an
            intercept that keeps the stored values >= 0).
        slope: RescaleSlope; stored = round((HU - intercept) / slope), so HU not on that grid
            are rounded.
        intercept: RescaleIntercept in HU.
        padding_mask: bool (z, y, x), True outside the field of view.
        padding_value: raw stored value for padded pixels, declared as PixelPaddingValue. When
            None, padded pixels get the raw value of -2000 HU and no PixelPaddingValue.
        slice_order: InstanceNumber against position: "ascending" (1 is the most inferior
            slice, feet first), "descending" (1 is the most superior, head first) or "random".
        flip_rows: store each slice with its rows reversed and the column direction cosine
            negated (ImageOrientationPatient column vector (0, -1, 0)).
        flip_columns: store each slice with its columns reversed and the row direction cosine
            negated (ImageOrientationPatient row vector (-1, 0, 0)).
        shuffle_names: random hexadecimal file names instead of names ordered by
            InstanceNumber.
        seed: seeds the UIDs, the random slice order and the random names.
        modality: Modality (write "MR" to test the reader's rejection of non-CT series).
        study_uid: StudyInstanceUID (and FrameOfReferenceUID source); derived if None.
        series_number: SeriesNumber, also the prefix of ordered file names, so that two series
            can share one folder.
        image_type: ImageType values (("ORIGINAL", "PRIMARY", "LOCALIZER") for a scout).
        photometric: "MONOCHROME2" or "MONOCHROME1". The stored values are the same either
            way: the photometric interpretation only changes display, not the rescaled HU.
        slice_thickness: SliceThickness in mm; spacing[0] if None (readers must not trust it).
        compression: None (Explicit VR Little Endian), "rle" (RLE Lossless) or "jpeg2000"
            (JPEG 2000 Lossless, needs pylibjpeg-openjpeg and slices of at least 32×32 pixels).

    Returns:
        The written paths in canonical slice order (index k holds hu[k]).

    Raises:
        DicomError: an argument is invalid or the HU do not fit the chosen storage.
    """
    hu = np.asarray(hu)
    _check_geometry(hu, spacing, origin)
    if storage not in STORAGE_RANGES:
        raise DicomError(f"expected storage in {tuple(STORAGE_RANGES)}, received {storage!r}")
    if slice_order not in SLICE_ORDERS:
        raise DicomError(f"expected slice_order in {SLICE_ORDERS}, received {slice_order!r}")
    if photometric not in PHOTOMETRIC_INTERPRETATIONS:
        raise DicomError(
            f"expected photometric in {PHOTOMETRIC_INTERPRETATIONS}, received {photometric!r}"
        )
    if compression is not None and compression not in COMPRESSIONS:
        raise DicomError(
            f"expected compression None or in {tuple(COMPRESSIONS)}, received {compression!r}"
        )
    if not np.isfinite(slope) or slope == 0:
        raise DicomError(f"expected a finite non-zero slope, received {slope}")
    stored, declared_padding = _stored_values(
        hu, storage, slope, intercept, padding_mask, padding_value
    )
    rng = np.random.default_rng(seed)
    instance_numbers = _instance_numbers(hu.shape[0], slice_order, rng)
    entropy = [patient_id, str(seed)]
    study_uid = study_uid or generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*entropy, "series", str(series_number)])
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame"])
    spacing_z, spacing_y, spacing_x = (float(s) for s in spacing)
    origin_z, origin_y, origin_x = (float(o) for o in origin)
    n_z, n_y, n_x = hu.shape
    row_cosine = (-1.0, 0.0, 0.0) if flip_columns else (1.0, 0.0, 0.0)
    column_cosine = (0.0, -1.0, 0.0) if flip_rows else (0.0, 1.0, 0.0)
    # Pixel [0, 0] of a flipped slice is the far corner along the flipped axis.
    first_x = origin_x + (n_x - 1) * spacing_x if flip_columns else origin_x
    first_y = origin_y + (n_y - 1) * spacing_y if flip_rows else origin_y

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_z):
        pixels = stored[k]
        if flip_rows:
            pixels = pixels[::-1, :]
        if flip_columns:
            pixels = pixels[:, ::-1]
        instance = int(instance_numbers[k])
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        z = origin_z + k * spacing_z

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyDate = ds.SeriesDate = STUDY_DATE.strftime("%Y%m%d")
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.SeriesNumber = series_number
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds(first_x), _ds(first_y), _ds(z)]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cosine, *column_cosine)]
        ds.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]
        ds.SliceThickness = _ds(spacing_z if slice_thickness is None else slice_thickness)
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = n_y, n_x
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = PIXEL_REPRESENTATION[storage]
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU"
        if declared_padding is not None:
            ds.PixelPaddingValue = declared_padding
        ds.PixelData = np.ascontiguousarray(pixels).astype("<" + pixels.dtype.str[1:]).tobytes()
        if compression is not None:
            ds.compress(COMPRESSIONS[compression])

        if shuffle_names:
            name = f"{rng.bytes(RANDOM_NAME_BYTES).hex()}"
        else:
            name = f"CT{series_number:03d}_{instance:0{NAME_DIGITS}d}.dcm"
        path = folder / name
        if path.exists():
            raise DicomError(f"expected a new file name, received existing file {path}")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d slices of series %s to %s", n_z, series_uid, folder)
    return paths
