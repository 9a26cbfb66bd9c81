"""Read one patient's folder of DICOM files into a canonical CT volume in Hounsfield units.

`read_series(folder)` reads every file in the folder (any names, any order), keeps the CT series
with the most slices and returns it as int16 HU in kdsb's canonical orientation: shape (z, y, x),
axis 0 inferior → superior, axis 1 anterior → posterior, axis 2 right → left, i.e. DICOM patient
coordinates Z, Y, X increasing along the axes.

How the series is chosen and checked:

- One pass over the files: each is read from disk once and parsed whole, its pixel data kept
  as undecoded bytes (up to `CACHE_BYTES` for the folder; files past that budget are parsed
  with `stop_before_pixels` and read again only if their series is chosen). Only the chosen
  series is decoded, one slice at a time into a preallocated volume, each decoded slice and its
  bytes released at once; the other series' bytes are released as soon as it is chosen. Files
  that are not DICOM are skipped with a warning; DICOM files that cannot be parsed (truncated,
  corrupt) are an error naming the file (damage within the pixel data only when that file's
  series is chosen).
- Objects without an image, localizers/scouts (ImageType LOCALIZER), non-CT series and images
  whose orientation differs from their series' majority are dropped and logged; of the rest the
  series with the most distinct slice positions wins (ties: the smaller SeriesInstanceUID).
- Slices are ordered by their position along the slice normal (row × column direction
  cosines), never by InstanceNumber; the slice spacing comes from these positions, never from
  SliceThickness. Slices at the same position: the first (lowest InstanceNumber, then file
  name) is kept, with a warning.
- Spacing irregularities: a gap of more than `MISSING_SLICE_FACTOR` × the median gap is a
  missing slice (error). Otherwise the slices are put on a uniform grid from the first to the
  last position (spacing = extent / (n - 1)); if any slice lies more than
  `GRID_TOLERANCE` × spacing off that grid the series is uneven (error); below that, the small
  irregularity is absorbed into the uniform grid (a debug message says how large it was).
- Positions that drift within the image plane (gantry tilt) or direction cosines that are not
  aligned with the patient axes (oblique acquisitions) are errors; axis-aligned acquisitions of
  any kind (flipped rows or columns, coronal, sagittal) are transposed and flipped into the
  canonical orientation.
- HU = stored × RescaleSlope + RescaleIntercept per slice, in float32 (integer arithmetic when
  the slope is 1 and the intercept whole). PixelPaddingValue (with PixelPaddingRangeLimit) and
  anything at or below `OUTSIDE_FIELD_HU` (the -2000 / -3024 HU outside-field values) become
  air, -1000 HU; the result is clipped into int16. A series with under `hu.MIN_AIR_SHARE` (1 %)
  of its voxels at or below `hu.MAX_AIR_HU` is plainly not HU (a missing rescale, a label map)
  and an error. MONOCHROME1
  only inverts the display (DICOM PS3.3 C.7.6.3.1.2: the rescale, not the photometric
  interpretation, defines HU), so it is accepted and read like MONOCHROME2; other photometric
  interpretations are errors.
- Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg); a missing decoder is
  a `MissingDecoderError` naming the package to install.

Every problem raises a one-line `DicomError` naming the patient and, where relevant, the file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kdsb.errors import DicomError, MissingDecoderError
from kdsb.io.folders import files_under
from kdsb.io.series import INT16_MAX, INT16_MIN, MIN_SLICES, MM_DECIMALS, CTSeries, patient_axis
from kdsb.preprocessing.hu import AIR_HU, OUTSIDE_FIELD_HU, air_share, not_hounsfield

logger = logging.getLogger(__name__)

# pydicom both warns and logs when a file ends early ("End of file reached before delimiter …
# found in file …"); kdsb names that file in its own one-line error, so pydicom's two lines
# (one with a source line) are kept off the terminal: the log record by this filter, the
# warning where the file is read (`_read_header`).
DAMAGED_FILE_MESSAGE = "End of file reached"
logging.getLogger("pydicom").addFilter(
    lambda record: not record.getMessage().startswith(DAMAGED_FILE_MESSAGE)
)

CT_MODALITY = "CT"
PER_FRAME = "PerFrameFunctionalGroupsSequence"  # Enhanced (multi-frame) CT
SHARED = "SharedFunctionalGroupsSequence"
LOCALIZER_TYPE = "LOCALIZER"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
ORIENTATION_DECIMALS = 3  # images whose cosines agree to this many decimals share an orientation
IN_PLANE_DRIFT_PIXELS = 0.5  # largest in-plane drift of slice positions (gantry tilt), pixels
DUPLICATE_FRACTION = 0.01  # positions closer than this × median gap are the same slice
SAME_POSITION_MM = 0.01  # and always those this close (re-exports round positions anew)
MISSING_SLICE_FACTOR = 1.5  # a gap over this × median gap means missing slices
GRID_TOLERANCE = 0.2  # largest distance of a slice from the uniform grid, × spacing
# Undecoded file bytes kept from the single read pass, per folder: a 512 × 512 × 1000 int16
# series fits; a bigger folder re-reads the files past this budget (memory stays bounded).
CACHE_BYTES = 512 * 1024**2
# Native (uncompressed) little-endian 16-bit images are read straight from their bytes.
NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
PREAMBLE_BYTES = 128  # a Part 10 file: 128 bytes, then "DICM"
BARE_GROUP = b"\x08\x00"  # group 0008, little endian: where a bare data set begins
BARE_TEXT_BYTES = 64  # longest first element of a bare data set (a UID)
BARE_HEAD_BYTES = 8 + BARE_TEXT_BYTES  # bytes `bare_dataset` reads
NATIVE_BITS = 16
# Transfer syntax UID prefixes → the pylibjpeg plugin that decodes them.
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg",  # JPEG baseline/extended (.50, .51)
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.8": "pylibjpeg-libjpeg",  # JPEG-LS (.80, .81)
    "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg",  # JPEG 2000 (.90, .91)
    "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg",  # High-Throughput JPEG 2000 (.201-.203)
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE lossless
}


@dataclass
class _Header:
    """What the header pass keeps of one image file."""

    path: Path
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    instance: int
    rows: int | None
    columns: int | None
    orientation: np.ndarray | None  # (row cosine, column cosine), shape (2, 3)
    position: np.ndarray | None  # ImagePositionPatient, shape (3,)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    transfer_syntax: str
    # The whole file parsed, pixel data still undecoded bytes; None past the cache budget or
    # when only the header could be parsed (the pixel pass then reads the file again).
    dataset: pydicom.Dataset | None
    # Enhanced (multi-frame) CT: the frame of the file this header stands for, its rescale
    # (slope, intercept) from the functional groups (else the file's top level) and the file's
    # padding range (`_padding_range`); None for a classic one-image file.
    frame: int | None = None
    rescale: tuple[float, float] | None = None
    padding: tuple[int, int] | None = None
    patient_id: str = ""  # PatientID: series of several patients mean a folder of patients

    def orientation_key(self) -> tuple[float, ...] | None:
        if self.orientation is None:
            return None
        return tuple(np.round(self.orientation.ravel(), ORIENTATION_DECIMALS) + 0.0)


def _error(patient: str, message: str, path: Path | None = None) -> DicomError:
    """The one-line error naming the patient and, where relevant, the file."""
    where = f" (file {path.name})" if path is not None else ""
    return DicomError(f"patient {patient}: {message}{where}")


# --- header pass ----------------------------------------------------------------------------


def _list_files(patient: str, folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise _error(patient, f"expected a folder of DICOM files, received {folder}")
    files = files_under(folder)
    if not files:
        raise _error(patient, f"expected DICOM files, received an empty folder {folder}")
    return files


def bare_dataset(head: bytes) -> bool:
    """Whether a file's first bytes (at least `BARE_HEAD_BYTES`) are a DICOM data set without
    its Part 10 header (no preamble, no "DICM": older archives and exports write them). Its
    first element, little endian, is of group 0008: the group's length (4 bytes), or a short
    text (SpecificCharacterSet, ImageType, a date, SOPClassUID), after its VR (explicit) or not
    (implicit). A stray binary file seldom passes; `read_dataset` checks the rest."""
    if len(head) < 8 or head[:2] != BARE_GROUP:
        return False
    element = int.from_bytes(head[2:4], "little")
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()  # then a 2-byte length
    length = int.from_bytes(head[6:8] if explicit_vr else head[4:8], "little")
    if element == 0:
        return length == 4
    text = head[8:8 + length]
    return (element <= 0xFF and 0 < length <= BARE_TEXT_BYTES and len(text) == length
            and all(32 <= byte < 127 or byte == 0 for byte in text))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a readable regular file holding DICOM: with the Part 10 preamble and
    "DICM", or a bare data set (`bare_dataset`). A dangling link, a FIFO or an unreadable
    file is not."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as file:
            head = file.read(max(PREAMBLE_BYTES + 4, BARE_HEAD_BYTES))
    except OSError:
        return False
    return head[PREAMBLE_BYTES:PREAMBLE_BYTES + 4] == b"DICM" or bare_dataset(head)


def read_dataset(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """`pydicom.dcmread`, also of a bare data set (`bare_dataset`, and a SOPClassUID), to which
    the transfer syntax pydicom found is added (its pixels cannot be decoded without one).

    Raises:
        InvalidDicomError: the file is no DICOM.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        with open(path, "rb") as file:
            if not bare_dataset(file.read(BARE_HEAD_BYTES)):
                raise
    ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    if "SOPClassUID" not in ds:
        raise InvalidDicomError(f"{path}: no DICOM data set (no SOPClassUID)")
    implicit, _ = ds.original_encoding  # little endian: `bare_dataset` read group 0008 so
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _read_header(patient: str, path: Path, keep_pixels: bool) -> list[_Header]:
    """The header(s) of one file: one per image, so one per frame of an Enhanced CT file;
    none (with a warning) when the file is not DICOM.

    With `keep_pixels` the file is read once and parsed whole (pixel data undecoded) and
    the dataset kept on the header for the pixel pass.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=DAMAGED_FILE_MESSAGE, category=UserWarning)
            ds = read_dataset(path, stop_before_pixels=not keep_pixels)
    except InvalidDicomError:
        logger.warning("patient %s: skipping %s: not a DICOM file", patient, path.name)
        return []
    except Exception as exc:  # pydicom raises many types for truncated or corrupt files
        if keep_pixels:  # maybe only the pixel data is damaged: an error if it is chosen
            return _read_header(patient, path, keep_pixels=False)
        raise _error(
            patient,
            f"expected a readable DICOM file, received a truncated or corrupt one ({exc})",
            path,
        ) from exc
    sop_class = UID(
        str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    )
    if not sop_class or ("Image Storage" in sop_class.name and "Rows" not in ds):
        # pydicom returns what it parsed of a file cut short without complaint.
        raise _error(
            patient,
            "expected a complete DICOM file, received one that ends early (truncated?)",
            path,
        )
    try:
        orientation = position = pixel_spacing = None
        if "ImageOrientationPatient" in ds:
            orientation = _unit_cosines(ds.ImageOrientationPatient)
        if "ImagePositionPatient" in ds:
            position = np.asarray(ds.ImagePositionPatient, float).reshape(3)
        if "PixelSpacing" in ds:
            pixel_spacing = tuple(float(v) for v in ds.PixelSpacing)
        header = _Header(
            path=path,
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "")),
            image_type=tuple(str(t).upper() for t in (ds.get("ImageType") or ())),
            instance=int(ds.get("InstanceNumber") or 0),
            rows=int(ds.Rows) if "Rows" in ds else None,
            columns=int(ds.Columns) if "Columns" in ds else None,
            orientation=orientation,
            position=position,
            pixel_spacing=pixel_spacing,
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
            dataset=ds if keep_pixels else None,
            patient_id=str(ds.get("PatientID", "")).strip(),
        )
        if PER_FRAME in ds:
            return _frame_headers(patient, header, ds)
        return [header]
    except DicomError:  # said already, naming the file
        raise
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise _error(
            patient, f"expected valid image geometry attributes, received {exc}", path
        ) from exc


def _unit_cosines(values: Any) -> np.ndarray:
    """ImageOrientationPatient as (row, column) unit vectors, (2, 3): cosines written with few
    decimals (0.99) would otherwise scale the spacing along their cross product.

    Raises:
        ValueError: not six numbers, or a vector far from unit length (norm 0.5 or less).
    """
    cosines = np.asarray(values, float).reshape(2, 3)
    norms = np.linalg.norm(cosines, axis=1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0.5).all()):
        raise ValueError(f"ImageOrientationPatient {cosines.ravel().tolist()}, not two "
                         "direction cosines")
    return cosines / norms


def _functional_group(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """The first item of a functional group `sequence` for one frame: the frame's own (per-frame
    functional groups) or else the one shared by all frames; None when neither has it."""
    for groups, index in ((ds.get(PER_FRAME), frame), (ds.get(SHARED), 0)):
        if groups is not None and len(groups) > index and sequence in groups[index]:
            items = getattr(groups[index], sequence)
            if len(items):
                return items[0]
    return None


def _frame_headers(patient: str, file_header: _Header, ds: pydicom.Dataset) -> list[_Header]:
    """One header per frame of an Enhanced (multi-frame) CT file, each with the frame's
    geometry (plane position and orientation, pixel measures), rescale and frame type, read
    from its per-frame or the shared functional groups (DICOM PS3.3 C.7.6.16); a rescale
    found in neither is the file's top-level one, if any."""
    headers = []
    top_rescale = (_rescale(patient, ds, file_header.path)
                   if "RescaleSlope" in ds or "RescaleIntercept" in ds else None)
    padding = _padding_range(ds)
    for frame in range(int(ds.get("NumberOfFrames", 1) or 1)):
        header = replace(file_header, frame=frame, instance=frame, rescale=top_rescale,
                         padding=padding)
        position = _functional_group(ds, frame, "PlanePositionSequence")
        orientation = _functional_group(ds, frame, "PlaneOrientationSequence")
        measures = _functional_group(ds, frame, "PixelMeasuresSequence")
        rescale = _functional_group(ds, frame, "PixelValueTransformationSequence")
        frame_type = _functional_group(ds, frame, "CTImageFrameTypeSequence")
        if position is not None and "ImagePositionPatient" in position:
            header.position = np.asarray(position.ImagePositionPatient, float).reshape(3)
        if orientation is not None and "ImageOrientationPatient" in orientation:
            header.orientation = _unit_cosines(orientation.ImageOrientationPatient)
        if measures is not None and "PixelSpacing" in measures:
            header.pixel_spacing = tuple(float(v) for v in measures.PixelSpacing)
        if rescale is not None:
            header.rescale = _rescale(patient, rescale, file_header.path)
        if frame_type is not None and "FrameType" in frame_type:
            header.image_type = tuple(str(t).upper() for t in frame_type.FrameType)
        headers.append(header)
    return headers


def _read_headers(patient: str, folder: Path) -> list[_Header]:
    files = _list_files(patient, folder)
    headers = []
    cached = 0
    for path in files:
        size = path.stat().st_size
        keep_pixels = cached + size <= CACHE_BYTES
        cached += size if keep_pixels else 0
        headers += _read_header(patient, path, keep_pixels)
    if not headers:
        names = ", ".join(p.name for p in files[:3]) + (", …" if len(files) > 3 else "")
        raise _error(
            patient, f"expected DICOM files, received {len(files)} non-DICOM file(s) ({names})"
        )
    return headers


# --- choosing the series --------------------------------------------------------------------


def _choose_series(patient: str, headers: list[_Header]) -> list[_Header]:
    """The images of the CT series with the most distinct slice positions."""
    images = [h for h in headers if h.rows is not None]
    if len(images) < len(headers):
        logger.info(
            "patient %s: dropped %d DICOM object(s) without an image",
            patient, len(headers) - len(images),
        )
    if not images:
        raise _error(patient, "expected CT images, received only DICOM objects without an image")
    localizers = [h for h in images if LOCALIZER_TYPE in h.image_type]
    if localizers:
        logger.info("patient %s: dropped %d localizer image(s)", patient, len(localizers))
    images = [h for h in images if LOCALIZER_TYPE not in h.image_type]
    if not images:
        raise _error(patient, "expected an axial CT series, received only localizer images")
    non_ct = Counter(h.modality for h in images if h.modality != CT_MODALITY)
    if non_ct:
        logger.info("patient %s: dropped non-CT images %s", patient, dict(non_ct))
    ct_images = [h for h in images if h.modality == CT_MODALITY]
    if not ct_images:
        received = ", ".join(sorted(non_ct))
        raise _error(patient, f"expected modality CT, received {received}")
    by_series: dict[str, list[_Header]] = defaultdict(list)
    for header in ct_images:
        by_series[header.series_uid].append(header)
    patients = sorted({h.patient_id for h in ct_images if h.patient_id})
    if len(patients) > 1:  # found by a user's check: a cohort's dicom/ read as one patient
        raise _error(
            patient,
            f"expected one patient's series in a patient folder, received CT series of "
            f"{len(patients)} patients (PatientID {', '.join(patients[:3])}"
            f"{', …' if len(patients) > 3 else ''}): INPUT_ROOT is the folder holding one "
            f"sub-folder per patient",
        )
    candidates = {uid: _majority_orientation(patient, uid, hs) for uid, hs in by_series.items()}

    def n_positions(hs: list[_Header]) -> int:
        return len({tuple(np.round(h.position, 2)) for h in hs if h.position is not None})

    ranked = sorted(candidates.items(), key=lambda item: (-n_positions(item[1]), item[0]))
    uid, chosen = ranked[0]
    positions = n_positions(chosen)
    tied = [other_uid for other_uid, other in ranked[1:] if n_positions(other) == positions]
    if tied:  # two reconstructions of one scan (two kernels?): the choice is arbitrary
        logger.warning(
            "patient %s: series %s and %s cover the same %d slice positions; kept %s (the "
            "smallest SeriesInstanceUID): give the patient one series to choose the other",
            patient, uid or "without a SeriesInstanceUID",
            ", ".join(t or "without a SeriesInstanceUID" for t in tied), positions,
            uid or "the one without a SeriesInstanceUID",
        )
    for other_uid, other in ranked[1:]:
        logger.info(
            "patient %s: dropped series %s (%d images; kept %s with %d)",
            patient, other_uid or "without a SeriesInstanceUID", len(other),
            uid or "the one without a SeriesInstanceUID", len(chosen),
        )
    return chosen


def _majority_orientation(patient: str, uid: str, headers: list[_Header]) -> list[_Header]:
    """The images of one series that share its most common orientation."""
    counts = Counter(h.orientation_key() for h in headers)
    key, _ = counts.most_common(1)[0]
    kept = [h for h in headers if h.orientation_key() == key]
    if len(kept) < len(headers):
        logger.info(
            "patient %s: series %s: dropped %d image(s) of another orientation",
            patient, uid, len(headers) - len(kept),
        )
    return kept


# --- geometry -------------------------------------------------------------------------------


def _check_slices(patient: str, headers: list[_Header]) -> None:
    first = headers[0]
    for header in headers:
        if header.orientation is None or header.position is None:
            raise _error(
                patient,
                "expected ImageOrientationPatient and ImagePositionPatient, received an "
                "image without them",
                header.path,
            )
        if header.pixel_spacing is None:
            raise _error(patient, "expected PixelSpacing, received none", header.path)
        if len(header.pixel_spacing) != 2 or not all(
            math.isfinite(v) and v > 0 for v in header.pixel_spacing
        ):
            raise _error(patient, f"expected PixelSpacing of two positive numbers (row, column "
                         f"mm), received {list(header.pixel_spacing)}", header.path)
        if (header.rows, header.columns) != (first.rows, first.columns):
            raise _error(
                patient,
                f"expected every slice to be {first.rows}×{first.columns} pixels like "
                f"{first.path.name}, received {header.rows}×{header.columns}",
                header.path,
            )
        if not np.allclose(header.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise _error(
                patient,
                f"expected PixelSpacing {first.pixel_spacing} like {first.path.name}, "
                f"received {header.pixel_spacing}",
                header.path,
            )


def _axis_of(patient: str, cosine: np.ndarray, what: str, path: Path) -> tuple[int, int]:
    """The patient axis (0 X, 1 Y, 2 Z) a direction cosine runs along, and its sign."""
    found = patient_axis(cosine)
    if found is None:
        raise _error(
            patient,
            f"expected a {what} direction aligned with a patient axis, received an oblique "
            f"ImageOrientationPatient {np.round(cosine, 4).tolist()}",
            path,
        )
    return found


def _order_slices(
    patient: str, headers: list[_Header], normal: np.ndarray
) -> tuple[list[_Header], np.ndarray]:
    """Slices sorted by position along the normal, duplicates dropped; their positions."""
    headers = sorted(headers, key=lambda h: (float(h.position @ normal), h.instance, h.path))
    along = np.array([h.position @ normal for h in headers])
    gaps = np.diff(along)
    # The median over gaps beyond a hair: a series held twice (a re-export beside the original)
    # has as many hair-thin gaps as real ones.
    real = gaps[gaps > SAME_POSITION_MM]
    median_gap = float(np.median(real)) if real.size else 0.0
    duplicate = np.concatenate(
        [[False], gaps <= max(SAME_POSITION_MM, DUPLICATE_FRACTION * median_gap)])
    if duplicate.any():
        # Runs of slices each within a hair of the one before share a position: of each run
        # the lowest InstanceNumber (then file name) is kept.
        kept: dict[int, int] = {}
        for index, position in enumerate(np.cumsum(~duplicate)):
            best = kept.get(int(position))
            key = (headers[index].instance, headers[index].path)
            if best is None or key < (headers[best].instance, headers[best].path):
                kept[int(position)] = index
        keep = sorted(kept.values())
        dropped = [h.path.name for i, h in enumerate(headers) if i not in kept.values()]
        logger.warning(
            "patient %s: %d slice(s) at an already used position dropped (the lowest "
            "InstanceNumber of each position kept): %s", patient, len(dropped),
            ", ".join(dropped[:5]),
        )
        headers = [headers[i] for i in keep]
        along = along[keep]
    if len(headers) < MIN_SLICES:
        raise _error(
            patient,
            f"expected at least {MIN_SLICES} slices at distinct positions, received "
            f"{len(headers)}",
            headers[0].path,
        )
    return headers, along


def _slice_spacing(patient: str, headers: list[_Header], along: np.ndarray) -> float:
    """The uniform slice spacing in mm, after the missing-slice and evenness checks."""
    gaps = np.diff(along)
    median_gap = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > MISSING_SLICE_FACTOR * median_gap:
        raise _error(
            patient,
            f"expected evenly spaced slices ({median_gap:.3g} mm apart), received a gap of "
            f"{gaps[worst]:.3g} mm between {headers[worst].path.name} and "
            f"{headers[worst + 1].path.name}: missing slice(s)"
        )
    spacing = float(along[-1] - along[0]) / (len(along) - 1)
    off_grid = np.abs(along - (along[0] + spacing * np.arange(len(along))))
    if off_grid.max() > GRID_TOLERANCE * spacing:
        bad = headers[int(np.argmax(off_grid))]
        raise _error(
            patient,
            f"expected slices on a uniform {spacing:.3g} mm grid, received uneven spacing "
            f"({off_grid.max():.3g} mm off the grid)",
            bad.path,
        )
    if off_grid.max() > 0:
        logger.debug(
            "patient %s: slice positions up to %.3g mm off a uniform %.4g mm grid",
            patient, off_grid.max(), spacing,
        )
    return spacing


def _check_tilt(
    patient: str,
    headers: list[_Header],
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
) -> None:
    """Raise when slice positions drift within the image plane (gantry tilt)."""
    offsets = np.array([h.position for h in headers]) - headers[0].position
    drift = np.abs(offsets @ orientation.T)  # (n, 2): along row and column cosines, mm
    limit = IN_PLANE_DRIFT_PIXELS * min(pixel_spacing)
    if drift.max() > limit:
        worst = headers[int(np.argmax(drift.max(axis=1)))]
        raise _error(
            patient,
            f"expected slice positions along the slice normal, received an in-plane drift "
            f"of {drift.max():.3g} mm (gantry tilt or sheared series)",
            worst.path,
        )


# --- pixels ---------------------------------------------------------------------------------


def _check_decoder(patient: str, header: _Header) -> None:
    path, syntax = header.path, header.transfer_syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise _error(
            patient,
            f"expected a supported transfer syntax, received {syntax}", path
        ) from exc
    if not decoder.is_available:
        package = next(
            (pkg for prefix, pkg in DECODER_PACKAGES.items() if syntax.startswith(prefix)),
            "pylibjpeg with its plugins",
        )
        raise MissingDecoderError(
            f"patient {patient}: expected an installed decoder for transfer syntax "
            f"{syntax}, received none: install {package} (file {path.name})"
        )


def _read_slice(
    patient: str, header: _Header, out: np.ndarray, frames: dict[Path, list]
) -> None:
    """Decode one file once and write its HU (int16) into `out` (rows, columns).

    Releases the header's kept dataset (its bytes and the decoded array pydicom caches). The
    frames of an Enhanced CT file are decoded together once and kept in `frames` (path →
    [decoded frames, frames still to read]) until the last of them is read.
    """
    path = header.path
    ds, header.dataset = header.dataset, None
    if header.frame is not None and frames[path][0] is not None:
        decoded = frames[path][0]
        frames[path][1] -= 1
        if not frames[path][1]:
            frames[path][0] = None
        _store_hu(decoded[header.frame], header.rescale or (1.0, 0.0), header.padding, out)
        return
    if ds is None:
        try:
            ds = read_dataset(path)
        except Exception as exc:  # pydicom raises many types for truncated or corrupt files
            raise _error(
                patient,
                f"expected a readable DICOM file, received {exc}", path
            ) from exc
    if "PixelData" not in ds:
        raise _error(patient, "expected pixel data, received a file without PixelData", path)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in MONOCHROME or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise _error(
            patient,
            f"expected a MONOCHROME1/2 single-sample image, received {photometric}", path
        )
    try:
        stored = _native_pixels(ds)
        if stored is None:
            stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types for truncated or corrupt data
        raise _error(
            patient,
            f"expected decodable pixel data, received truncated or corrupt data ({exc})", path
        ) from exc
    if header.frame is not None:
        frames[path][0] = stored.reshape((-1, *stored.shape[-2:]))  # one frame decodes to 2D
        _read_slice(patient, header, out, frames)
        return
    if stored.shape != out.shape:
        raise _error(
            patient,
            f"expected a {out.shape[0]}×{out.shape[1]} image, received {stored.shape}", path
        )
    _store_hu(stored, _rescale(patient, ds, path), _padding_range(ds), out)


def _rescale(patient: str, item: pydicom.Dataset, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a dataset or functional-group item; 1 and 0 where
    absent."""
    try:
        return (float(item.get("RescaleSlope", 1.0) or 1.0),
                float(item.get("RescaleIntercept", 0.0) or 0.0))
    except (TypeError, ValueError) as exc:
        raise _error(patient, f"expected a numeric RescaleSlope and RescaleIntercept, "
                              f"received {exc}", path) from None


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """The stored values of a native little-endian 16-bit single-frame image, read straight
    from its bytes; None for any other encoding (pydicom decodes those).

    The same values as `ds.pixel_array` (unused high bits cleared, or sign-extended, as pydicom
    does), without its per-call decoder set-up: 0.4 of the 0.8 ms a 512×512 slice took.
    """
    if (
        str(ds.file_meta.get("TransferSyntaxUID", "")) not in NATIVE_SYNTAXES
        or "PixelData" not in ds
        or int(ds.get("BitsAllocated", 0)) != NATIVE_BITS
        or not 0 < int(ds.get("BitsStored", 0)) <= NATIVE_BITS
        or int(ds.get("SamplesPerPixel", 1)) != 1
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
    ):
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * columns * NATIVE_BITS // 8:
        return None  # pydicom says what is wrong
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns)
    unused = NATIVE_BITS - int(ds.BitsStored)
    if unused:
        stored = np.right_shift(np.left_shift(stored, unused), unused)
    return stored.reshape(rows, columns)


def _store_hu(
    stored: np.ndarray,
    rescale: tuple[float, float],
    padding: tuple[int, int] | None,
    out: np.ndarray,
) -> None:
    """Stored pixel values → int16 HU in `out`: rescale, outside-field and padding → air.

    Args:
        stored: the decoded pixel values (rows, columns).
        rescale: (slope, intercept).
        padding: the stored values (low, high) that are padding (`_padding_range`), or None.
        out: (rows, columns) int16 destination.
    """
    slope, intercept = rescale
    integer = slope == 1.0 and intercept.is_integer()
    if (integer and stored.dtype.itemsize <= 2
            and INT16_MIN <= int(stored.min()) + int(intercept)
            and int(stored.max()) + int(intercept) <= INT16_MAX):
        # The usual case: HU fit int16 throughout, so they go straight into `out`.
        np.add(stored, np.int32(intercept), out=out, casting="unsafe")
        hu = out
    elif integer:
        hu = stored.astype(np.int32) + int(intercept)
    else:
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        np.rint(hu, out=hu)
    air = hu <= OUTSIDE_FIELD_HU
    if padding is not None:
        air |= (stored >= padding[0]) & (stored <= padding[1])
    hu[air] = AIR_HU
    if hu is not out:
        if hu.min() < INT16_MIN or hu.max() > INT16_MAX:  # rare; two reductions beat a clip
            np.clip(hu, INT16_MIN, INT16_MAX, out=hu)
        out[...] = hu


def _padding_range(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """The stored values that are padding: [PixelPaddingValue, PixelPaddingRangeLimit] (the
    value alone without a limit); None when the file declares none."""
    if "PixelPaddingValue" not in ds:
        return None
    bits = int(ds.get("BitsStored", 16))

    def as_stored(value: int) -> int:
        # The tag may be read as unsigned even when PixelRepresentation says signed.
        value = int(value)
        if int(ds.get("PixelRepresentation", 0)) == 1:
            if value >= 1 << 15:  # the tag's own 16 bits read as unsigned: 0xFA24 is -1500
                value -= 1 << 16
            elif 1 << (bits - 1) <= value < 1 << bits:  # the stored bits read as unsigned
                value -= 1 << bits
        return value

    low = as_stored(ds.PixelPaddingValue)
    high = as_stored(ds.get("PixelPaddingRangeLimit", low))
    return min(low, high), max(low, high)


def _slice_axes(patient: str, first: _Header) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The patient axis (0 X, 1 Y, 2 Z) and sign each image array axis runs along.

    Returns:
        ((axis, sign) for the slice, row and column axes of the stacked image array, i.e.
        along the slice normal, the column cosine and the row cosine), and the slice normal.
    """
    orientation = first.orientation
    row_axis, row_sign = _axis_of(patient, orientation[0], "row", first.path)
    column_axis, column_sign = _axis_of(patient, orientation[1], "column", first.path)
    normal = np.cross(orientation[0], orientation[1])
    if row_axis == column_axis:
        raise _error(
            patient,
            f"expected perpendicular direction cosines, received "
            f"{orientation.ravel().tolist()}",
            first.path,
        )
    normal_axis = 3 - row_axis - column_axis
    normal_sign = int(np.sign(normal[normal_axis]))
    return [(normal_axis, normal_sign), (column_axis, column_sign), (row_axis, row_sign)], normal


def _read_pixels(patient: str, headers: list[_Header]) -> np.ndarray:
    """The slices decoded into one int16 HU array (slice, row, column), in the given order."""
    _check_decoder(patient, headers[0])
    volume = np.empty((len(headers), headers[0].rows, headers[0].columns), dtype=np.int16)
    frames: dict[Path, list] = {}
    for header in headers:
        if header.frame is not None:
            frames.setdefault(header.path, [None, 0])[1] += 1
    for index, header in enumerate(headers):
        _read_slice(patient, header, volume[index], frames)
    return volume


def _to_canonical(
    volume: np.ndarray,
    axes: list[tuple[int, int]],
    steps: list[float],
    units: list[np.ndarray],
    position: np.ndarray,
) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """Transpose and flip a stacked image array into canonical (z, y, x) order.

    Args:
        volume: the image array (slice, row, column).
        axes: (patient axis, sign) of each array axis (`_slice_axes`).
        steps: spacing along each array axis, mm.
        units: the patient-space unit vector of each array axis.
        position: ImagePositionPatient of the first slice's first pixel, mm.

    Returns:
        The contiguous canonical array, its spacing (z, y, x) and its origin (z, y, x) in mm.
    """
    # Canonical axis i (0 Z, 1 Y, 2 X) is patient axis 2 - i.
    order = [next(k for k, (axis, _) in enumerate(axes) if axis == 2 - i) for i in range(3)]
    canonical = volume.transpose(order)
    flips = tuple(i for i, k in enumerate(order) if axes[k][1] < 0)
    if flips:
        canonical = np.flip(canonical, axis=flips)
    # Patient coordinate of canonical voxel [0, 0, 0]: the first slice's position moved to
    # the far end of every array axis that runs against the patient axis.
    corner = position.copy()
    for k, (_, sign) in enumerate(axes):
        if sign < 0:
            corner = corner + (volume.shape[k] - 1) * steps[k] * units[k]
    spacing = tuple(round(float(steps[k]), MM_DECIMALS) for k in order)
    origin = tuple(round(float(corner[2 - i]), MM_DECIMALS) for i in range(3))
    return np.ascontiguousarray(canonical), spacing, origin


def read_series(folder: str | Path, patient_id: str | None = None) -> CTSeries:
    """Read the main CT series of one patient's DICOM folder as canonical int16 HU.

    Args:
        folder: a folder of DICOM files (any names, any order; sub-folders are read too).
        patient_id: the name used in messages; the folder name if None.

    Returns:
        The CT series with the most slices: HU shape (z, y, x) along patient Z, Y, X
        increasing, spacing and origin in mm in (z, y, x) order.

    Raises:
        DicomError: the folder holds no usable CT series; the one-line message names the
            patient and the file at fault.
        MissingDecoderError: the pixel data needs a decoder that is not installed.
    """
    folder = Path(folder)
    patient = patient_id or folder.name
    headers = _choose_series(patient, _read_headers(patient, folder))
    _check_slices(patient, headers)
    first = headers[0]
    axes, normal = _slice_axes(patient, first)
    headers, along = _order_slices(patient, headers, normal)
    slice_spacing = _slice_spacing(patient, headers, along)
    _check_tilt(patient, headers, first.orientation, first.pixel_spacing)
    # Decoded straight into the stacked array; the canonical array is a transpose and flips of
    # it, made contiguous once.
    volume = _read_pixels(patient, headers)
    row_spacing, column_spacing = first.pixel_spacing
    hu, spacing, origin = _to_canonical(
        volume,
        axes,
        [slice_spacing, row_spacing, column_spacing],
        [normal, first.orientation[1], first.orientation[0]],
        headers[0].position,
    )
    reason = not_hounsfield(int(hu.min()), int(hu.max()), air_share(hu))
    if reason is not None:
        raise _error(patient, f"{reason} (RescaleSlope / RescaleIntercept missing?)",
                     first.path)
    logger.debug(
        "patient %s: series %s, %d slices, shape %s, spacing %s mm",
        patient, first.series_uid, len(headers), hu.shape, spacing,
    )
    return CTSeries(hu=hu, spacing=spacing, origin=origin, series_uid=first.series_uid)
