"""The header pass over a patient's folder: one `Header` per image (per frame of an Enhanced CT
file), each file read once, its pixel data kept undecoded within a memory budget; and the two
header fields the pixel pass needs, the rescale and the padding range."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from kdsb.errors import DicomError
from kdsb.io.dicom.files import DAMAGED_FILE_MESSAGE, patient_error, read_dataset
from kdsb.io.folders import files_under

logger = logging.getLogger(__name__)

PER_FRAME = "PerFrameFunctionalGroupsSequence"  # Enhanced (multi-frame) CT
SHARED = "SharedFunctionalGroupsSequence"
ORIENTATION_DECIMALS = 3  # images whose cosines agree to this many decimals share an orientation
# Undecoded file bytes kept from the single read pass, per folder: a 512 × 512 × 1000 int16
# series fits; a bigger folder re-reads the files past this budget (memory stays bounded).
CACHE_BYTES = 512 * 1024**2


@dataclass
class Header:
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
    # padding range (`padding_range`); None for a classic one-image file.
    frame: int | None = None
    rescale: tuple[float, float] | None = None
    padding: tuple[int, int] | None = None
    patient_id: str = ""  # PatientID: series of several patients mean a folder of patients
    # SeriesDescription and ConvolutionKernel, as text: what tells a clinician one
    # reconstruction of a scan from another (a tie between series names them)
    description: str = ""

    def orientation_key(self) -> tuple[float, ...] | None:
        if self.orientation is None:
            return None
        return tuple(np.round(self.orientation.ravel(), ORIENTATION_DECIMALS) + 0.0)


def _series_description(ds: pydicom.Dataset) -> str:
    """SeriesDescription and ConvolutionKernel (one value or several), joined: "" without."""
    kernel = ds.get("ConvolutionKernel") or ""
    if isinstance(kernel, MultiValue | list | tuple):
        kernel = "/".join(str(k) for k in kernel)
    kernel = str(kernel).strip()
    parts = [str(ds.get("SeriesDescription") or "").strip(), f"kernel {kernel}" if kernel else ""]
    return ", ".join(part for part in parts if part)


def _list_files(patient: str, folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise patient_error(patient, f"expected a folder of DICOM files, received {folder}")
    files = files_under(folder)
    if not files:
        raise patient_error(patient, f"expected DICOM files, received an empty folder {folder}")
    return files


def _read_header(patient: str, path: Path, keep_pixels: bool) -> list[Header]:
    """The header(s) of one file: one per image, so one per frame of an Enhanced CT file;
    none when the file is not DICOM (`read_headers` names such files).

    With `keep_pixels` the file is read once and parsed whole (pixel data undecoded) and
    the dataset kept on the header for the pixel pass.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=DAMAGED_FILE_MESSAGE, category=UserWarning)
            ds = read_dataset(path, stop_before_pixels=not keep_pixels)
    except InvalidDicomError:
        return []
    except Exception as exc:  # pydicom raises many types for truncated or corrupt files
        if keep_pixels:  # maybe only the pixel data is damaged: an error if it is chosen
            return _read_header(patient, path, keep_pixels=False)
        raise patient_error(
            patient,
            f"expected a readable DICOM file, received a truncated or corrupt one ({exc})",
            path,
        ) from exc
    sop_class = UID(
        str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    )
    if not sop_class or ("Image Storage" in sop_class.name and "Rows" not in ds):
        # pydicom returns what it parsed of a file cut short without complaint.
        raise patient_error(
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
        header = Header(
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
            description=_series_description(ds),
        )
        if PER_FRAME in ds:
            return _frame_headers(patient, header, ds)
        return [header]
    except DicomError:  # said already, naming the file
        raise
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise patient_error(
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


def _frame_headers(patient: str, file_header: Header, ds: pydicom.Dataset) -> list[Header]:
    """One header per frame of an Enhanced (multi-frame) CT file, each with the frame's
    geometry (plane position and orientation, pixel measures), rescale and frame type, read
    from its per-frame or the shared functional groups (DICOM PS3.3 C.7.6.16); a rescale
    found in neither is the file's top-level one, if any."""
    headers = []
    top_rescale = (rescale_of(patient, ds, file_header.path)
                   if "RescaleSlope" in ds or "RescaleIntercept" in ds else None)
    padding = padding_range(patient, ds, file_header.path)
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
            header.rescale = rescale_of(patient, rescale, file_header.path)
        if frame_type is not None and "FrameType" in frame_type:
            header.image_type = tuple(str(t).upper() for t in frame_type.FrameType)
        headers.append(header)
    return headers


def read_headers(patient: str, folder: Path) -> list[Header]:
    files = _list_files(patient, folder)
    headers, skipped = [], []
    cached = 0
    for path in files:
        size = path.stat().st_size
        keep_pixels = cached + size <= CACHE_BYTES
        cached += size if keep_pixels else 0
        found = _read_header(patient, path, keep_pixels)
        if not found:
            skipped.append(path)
        headers += found
    names = ", ".join(p.name for p in skipped[:3]) + (", …" if len(skipped) > 3 else "")
    if not headers:
        raise patient_error(
            patient, f"expected DICOM files, received {len(files)} non-DICOM file(s) ({names})"
        )
    if skipped:  # one line for them all (found by a user's trial: a line a file, then again)
        logger.warning("patient %s: skipping %d file(s) that are not DICOM (%s)", patient,
                       len(skipped), names)
    return headers


def rescale_of(patient: str, item: pydicom.Dataset, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a dataset or functional-group item; 1 and 0 where
    absent."""
    try:
        return (float(item.get("RescaleSlope", 1.0) or 1.0),
                float(item.get("RescaleIntercept", 0.0) or 0.0))
    except (TypeError, ValueError) as exc:
        raise patient_error(patient, f"expected a numeric RescaleSlope and RescaleIntercept, "
                            f"received {exc}", path) from None


def padding_range(patient: str, ds: pydicom.Dataset, path: Path) -> tuple[int, int] | None:
    """The stored values that are padding: [PixelPaddingValue, PixelPaddingRangeLimit] (the
    value alone without a limit); None when the file declares none.

    Raises:
        DicomError: a value that is no single whole number (found in review: a traceback).
    """
    if "PixelPaddingValue" not in ds:
        return None
    try:
        return _padding_range(ds)
    except (TypeError, ValueError) as exc:
        raise patient_error(patient, f"expected a whole PixelPaddingValue and "
                            f"PixelPaddingRangeLimit, received {ds.get('PixelPaddingValue')!r} "
                            f"and {ds.get('PixelPaddingRangeLimit')!r}", path) from exc


def _padding_range(ds: pydicom.Dataset) -> tuple[int, int]:
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
