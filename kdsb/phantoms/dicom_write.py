"""Write a canonical HU volume as a DICOM CT series: the phantom generator's and the tests' writer.

The volume is int16 Hounsfield units in kdsb's canonical orientation, shape (z, y, x): axis 0
inferior → superior, axis 1 anterior → posterior, axis 2 right → left, so DICOM patient
coordinates (X, Y, Z) increase along every axis. One uncompressed CT Image Storage file is
written per slice, with the geometry and storage quirks real scanners produce (unsigned storage
with an intercept, slopes other than 1, padded fields of view, descending or random instance
numbers, negated orientation vectors, shuffled file names) so that `kdsb.io.dicom.read_series` can
be tested against a known truth.

How a series is stored (storage type, rescale, padding, slice order, flips, file names, UIDs,
compression) is one `Acquisition`; `write_ct_series` builds each slice's dataset from it.

Padding: pixels flagged by `padding_mask` are written as `Acquisition.padding_value` and that
value is declared as PixelPaddingValue. When `padding_value` is None the padded pixels are instead
written as the raw value whose rescaled HU is -2000 (the "outside the field of view" value many
scanners write) and no PixelPaddingValue is declared. The reader turns both into air
(-1000 HU).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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
from kdsb.hu import OUTSIDE_FIELD_HU

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


@dataclass(frozen=True)
class Acquisition:
    """How a series is stored and labelled: everything `write_ct_series` writes besides the image.

    Attributes:
        storage: "int16" (PixelRepresentation 1) or "uint16" (PixelRepresentation 0; choose an
            intercept that keeps the stored values >= 0).
        slope: RescaleSlope; stored = round((HU - intercept) / slope), so HU not on that grid
            are rounded.
        intercept: RescaleIntercept in HU.
        padding_value: raw stored value for padded pixels, declared as PixelPaddingValue. When
            None, padded pixels get the raw value of `OUTSIDE_FIELD_HU` (-2000 HU) and no
            PixelPaddingValue.
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
        series_uid: SeriesInstanceUID; derived from the patient id, series_number and seed if
            None.
        series_number: SeriesNumber, also the prefix of ordered file names, so that two series
            can share one folder.
        image_type: ImageType values (("ORIGINAL", "PRIMARY", "LOCALIZER") for a scout).
        photometric: "MONOCHROME2" or "MONOCHROME1". The stored values are the same either
            way: the photometric interpretation only changes display, not the rescaled HU.
        slice_thickness: SliceThickness in mm; the z spacing if None (readers must not trust it).
        compression: None (Explicit VR Little Endian), "rle" (RLE Lossless) or "jpeg2000"
            (JPEG 2000 Lossless, needs pylibjpeg-openjpeg and slices of at least 32×32 pixels).

    Raises:
        DicomError: an option out of its range.
    """

    storage: str = "int16"
    slope: float = 1.0
    intercept: float = -1024.0
    padding_value: int | None = None
    slice_order: str = "ascending"
    flip_rows: bool = False
    flip_columns: bool = False
    shuffle_names: bool = False
    seed: int = 0
    modality: str = "CT"
    series_uid: str | None = None
    series_number: int = 1
    image_type: tuple[str, ...] = DEFAULT_IMAGE_TYPE
    photometric: str = "MONOCHROME2"
    slice_thickness: float | None = None
    compression: str | None = None

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_RANGES:
            raise DicomError(
                f"expected storage in {tuple(STORAGE_RANGES)}, received {self.storage!r}"
            )
        if self.slice_order not in SLICE_ORDERS:
            raise DicomError(
                f"expected slice_order in {SLICE_ORDERS}, received {self.slice_order!r}"
            )
        if self.photometric not in PHOTOMETRIC_INTERPRETATIONS:
            raise DicomError(
                f"expected photometric in {PHOTOMETRIC_INTERPRETATIONS}, "
                f"received {self.photometric!r}"
            )
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise DicomError(
                f"expected compression None or in {tuple(COMPRESSIONS)}, "
                f"received {self.compression!r}"
            )
        if not np.isfinite(self.slope) or self.slope == 0:
            raise DicomError(f"expected a finite non-zero slope, received {self.slope}")


def _stored_values(
    hu: np.ndarray, acquisition: Acquisition, padding_mask: np.ndarray | None
) -> tuple[np.ndarray, int | None]:
    """Raw stored pixel values for `hu`, and the PixelPaddingValue to declare (or None)."""
    storage, slope, intercept = acquisition.storage, acquisition.slope, acquisition.intercept
    padding_value = acquisition.padding_value
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


@dataclass(frozen=True)
class _Series:
    """What every slice file of one series shares.

    Attributes:
        patient_id: PatientID and PatientName.
        acquisition: how the series is stored.
        study_uid, series_uid, frame_uid: the series' UIDs.
        spacing: voxel size (z, y, x) in mm.
        corner: patient (X, Y, Z) in mm of pixel [0, 0] of the most inferior slice, as written
            (the far corner along a flipped axis).
        row_cosine, column_cosine: ImageOrientationPatient's two vectors.
        rows, columns: pixels per slice.
        declared_padding: PixelPaddingValue, or None.
    """

    patient_id: str
    acquisition: Acquisition
    study_uid: str
    series_uid: str
    frame_uid: str
    spacing: tuple[float, float, float]
    corner: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    rows: int
    columns: int
    declared_padding: int | None


def _series(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    patient_id: str,
    acquisition: Acquisition,
    declared_padding: int | None,
) -> _Series:
    """The UIDs and the slice geometry of one series (flips move pixel [0, 0])."""
    a = acquisition
    entropy = [patient_id, str(a.seed)]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = a.series_uid or generate_uid(
        entropy_srcs=[*entropy, "series", str(a.series_number)]
    )
    spacing_z, spacing_y, spacing_x = (float(s) for s in spacing)
    origin_z, origin_y, origin_x = (float(o) for o in origin)
    _, n_y, n_x = hu.shape
    return _Series(
        patient_id=patient_id,
        acquisition=a,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=generate_uid(entropy_srcs=[study_uid, "frame"]),
        spacing=(spacing_z, spacing_y, spacing_x),
        corner=(
            origin_x + (n_x - 1) * spacing_x if a.flip_columns else origin_x,
            origin_y + (n_y - 1) * spacing_y if a.flip_rows else origin_y,
            origin_z,
        ),
        row_cosine=(-1.0, 0.0, 0.0) if a.flip_columns else (1.0, 0.0, 0.0),
        column_cosine=(0.0, -1.0, 0.0) if a.flip_rows else (0.0, 1.0, 0.0),
        rows=n_y,
        columns=n_x,
        declared_padding=declared_padding,
    )


def _slice_dataset(series: _Series, k: int, instance: int, stored: np.ndarray) -> Dataset:
    """The DICOM dataset of slice `k` (0 = most inferior) with its stored pixels (rows, columns)."""
    a = series.acquisition
    pixels = stored
    if a.flip_rows:
        pixels = pixels[::-1, :]
    if a.flip_columns:
        pixels = pixels[:, ::-1]
    sop_uid = generate_uid(entropy_srcs=[series.series_uid, str(k)])
    spacing_z, spacing_y, spacing_x = series.spacing
    first_x, first_y, origin_z = series.corner
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
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.FrameOfReferenceUID = series.frame_uid
    ds.PatientID = series.patient_id
    ds.PatientName = series.patient_id
    ds.StudyDate = ds.SeriesDate = STUDY_DATE.strftime("%Y%m%d")
    ds.Modality = a.modality
    ds.ImageType = list(a.image_type)
    ds.SeriesNumber = a.series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(first_x), _ds(first_y), _ds(z)]
    ds.ImageOrientationPatient = [_ds(v) for v in (*series.row_cosine, *series.column_cosine)]
    ds.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]
    ds.SliceThickness = _ds(spacing_z if a.slice_thickness is None else a.slice_thickness)
    ds.SliceLocation = _ds(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = a.photometric
    ds.Rows, ds.Columns = series.rows, series.columns
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = PIXEL_REPRESENTATION[a.storage]
    ds.RescaleIntercept = _ds(a.intercept)
    ds.RescaleSlope = _ds(a.slope)
    ds.RescaleType = "HU"
    if series.declared_padding is not None:
        ds.PixelPaddingValue = series.declared_padding
    ds.PixelData = np.ascontiguousarray(pixels).astype("<" + pixels.dtype.str[1:]).tobytes()
    if a.compression is not None:
        ds.compress(COMPRESSIONS[a.compression])
    return ds


def _file_name(acquisition: Acquisition, instance: int, rng: np.random.Generator) -> str:
    """Ordered by series and InstanceNumber, or random hexadecimal with `shuffle_names`."""
    if acquisition.shuffle_names:
        return f"{rng.bytes(RANDOM_NAME_BYTES).hex()}"
    return f"CT{acquisition.series_number:03d}_{instance:0{NAME_DIGITS}d}.dcm"


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    *,
    patient_id: str,
    padding_mask: np.ndarray | None = None,
    acquisition: Acquisition = Acquisition(),
) -> list[Path]:
    """Write `hu` as one DICOM CT series, one file per slice.

    Args:
        folder: output folder (created if needed); existing files are never overwritten.
        hu: integer HU, shape (z, y, x), canonical orientation (patient Z, Y, X increasing).
        spacing: voxel size in mm, (z, y, x). PixelSpacing is written as (y, x).
        origin: patient coordinate in mm of voxel [0, 0, 0], (z, y, x) i.e. (Z, Y, X).
        patient_id: PatientID and PatientName.
        padding_mask: bool (z, y, x), True outside the field of view (see the module docstring).
        acquisition: how the series is stored and labelled (uncompressed int16 by default).

    Returns:
        The written paths in canonical slice order (index k holds hu[k]).

    Raises:
        DicomError: invalid geometry or padding, or HU that do not fit the chosen storage.
    """
    hu = np.asarray(hu)
    _check_geometry(hu, spacing, origin)
    stored, declared_padding = _stored_values(hu, acquisition, padding_mask)
    rng = np.random.default_rng(acquisition.seed)
    instance_numbers = _instance_numbers(hu.shape[0], acquisition.slice_order, rng)
    series = _series(hu, spacing, origin, patient_id, acquisition, declared_padding)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, instance in enumerate(int(n) for n in instance_numbers):
        ds = _slice_dataset(series, k, instance, stored[k])
        path = folder / _file_name(acquisition, instance, rng)
        if path.exists():
            raise DicomError(f"expected a new file name, received existing file {path}")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d slices of series %s to %s", len(paths), series.series_uid, folder)
    return paths
