"""One patient's scan end to end: read it, segment the lungs, crop, resample, write.

`preprocess_patient` turns one patient's scan, a DICOM folder or a NIfTI / MetaImage / NRRD
volume file (`read_patient`), into one `<id>.h5` volume file (DESIGN.md, the data contract):
read the scan in HU, segment the lungs on the source grid, crop to the lung bounding box plus a
margin, resample the crop to the target spacing (HU linearly, the mask without blurring its
edges) and write the file atomically. `kdsb.preprocessing.cohort` runs it over a cohort.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdsb.errors import UsageError
from kdsb.io import volumes
from kdsb.io.series import validate_spacing
from kdsb.io.source_stamp import source_stamp

if TYPE_CHECKING:
    from kdsb.io.series import CTSeries

logger = logging.getLogger(__name__)

DEFAULT_SPACING_MM = (1.0, 1.0, 1.0)
DEFAULT_MARGIN_MM = 10.0
MARGIN_ATTR = "margin_mm"  # volume attribute: the margin around the lungs it was cropped with
# Volume attribute: `kdsb.io.source_stamp.source_stamp` of the files it was read from.
SOURCE_STAMP_ATTR = "source_stamp"
SOURCE_ATTR = "source"  # volume attribute: the absolute path of the patient's folder or file
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


def source_text(path: Path) -> str:
    """`path` as `SOURCE_ATTR` records it: text whatever its bytes (an INPUT_ROOT under a
    folder named in Latin-1 cannot be an HDF5 string as is; found in review)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class PatientResult:
    """What happened to one patient.

    Attributes:
        patient_id: the patient id (the folder name, or the volume file name without its
            suffix).
        status: "ok", "failed" or "skipped".
        seconds: wall-clock time spent on the patient (0 when skipped).
        shape: shape (z, y, x) of the volume written or found, None when failed.
        error: one-line reason when failed, else "".
        detail: full traceback of an unexpected exception (logged at debug level), else "".
    """

    patient_id: str
    status: str
    seconds: float = 0.0
    shape: tuple[int, int, int] | None = None
    error: str = ""
    detail: str = ""

    def manifest_row(self) -> dict[str, str]:
        """The row of `manifest.csv` for this patient."""
        return {
            "id": self.patient_id,
            "status": self.status,
            "seconds": f"{self.seconds:.2f}",
            "shape": "x".join(str(n) for n in self.shape) if self.shape else "",
            "error": self.error,
        }


def validate_margin(margin_mm: float) -> float:
    """The crop margin around the lungs, mm, checked: a finite number >= 0 (found by a user's
    trial: "at least 0 mm, received inf" said nothing of what was wrong).

    Raises:
        UsageError: any other value.
    """
    if not (np.isfinite(margin_mm) and margin_mm >= 0):
        raise UsageError(f"expected a finite margin of at least 0 mm, received {margin_mm}")
    return float(margin_mm)


def read_patient(source: str | os.PathLike, patient_id: str | None = None) -> CTSeries:
    """Read one patient's scan, whatever its format, as canonical int16 HU (z, y, x).

    A volume file (NIfTI, MetaImage, NRRD) is read by `kdsb.io.images.read_image`; a folder
    holding one volume file and no DICOM (`kdsb.io.volume_files.volume_in_folder`) likewise; any
    other folder is a DICOM series read by `kdsb.io.dicom.read_series`.

    Args:
        source: the patient's folder or volume file.
        patient_id: the name used in messages; by default the folder name, or the volume file
            name without its suffix.

    Returns:
        The scan: HU shape (z, y, x) along patient Z, Y, X increasing, spacing and origin in mm
        in (z, y, x) order.

    Raises:
        DicomError: a folder that holds no usable CT series.
        VolumeFileError: a volume file that cannot be read or holds no usable CT volume.
    """
    from kdsb.io.dicom import read_series
    from kdsb.io.images import read_image
    from kdsb.io.volume_files import volume_in_folder

    source = Path(source)
    if not source.is_dir():
        return read_image(source, patient_id=patient_id)
    patient_id = patient_id or source.name
    volume = volume_in_folder(source, patient_id=patient_id)
    if volume is not None:
        return read_image(volume, patient_id=patient_id)
    return read_series(source, patient_id=patient_id)


def preprocess_patient(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    patient_id: str | None = None,
    spacing: Sequence[float] = DEFAULT_SPACING_MM,
    margin_mm: float = DEFAULT_MARGIN_MM,
    threads: int = 1,
) -> PatientResult:
    """Preprocess one patient's scan (DICOM folder or volume file) into `out_dir/<id>.h5`.

    Steps: read the scan in HU (`read_patient`, canonical axes, DESIGN.md) → segment the lungs
    on the source grid → crop to the lung bounding box plus `margin_mm` → resample the crop to
    `spacing` (HU linear, mask without blurring) → write `<id>.h5` atomically. The origin
    of the crop is the patient coordinate of its first voxel, origin + start index · spacing;
    resampling keeps the centre of voxel [0, 0, 0] fixed.

    Args:
        source: the patient's DICOM folder, volume file, or folder holding one volume file.
        out_dir: folder for `<id>.h5` (created if needed).
        patient_id: the id; defaults to the folder name, or the volume file name without its
            suffix.
        spacing: target voxel size in mm, (z, y, x): 3 positive numbers.
        margin_mm: margin around the lung bounding box, mm.
        threads: threads for the patient's distance transforms, block means, resampling and
            compression (`kdsb preprocess` gives each worker its share of `usable_cores()`).

    Returns:
        The result with status "ok", the seconds spent and the shape written.

    Raises:
        KdsbError: the source does not hold a usable CT scan with lungs (DicomError,
            VolumeFileError, LungMaskError, …); the message names the patient. A bad target
            `spacing` or `margin_mm` raises KdsbError before the scan is read.
    """
    from kdsb.io.volume_files import volume_id
    from kdsb.preprocessing.lungs import lung_bounding_box, mask_on_box, segment_lungs_in_box
    from kdsb.preprocessing.resample import resample_mask, resample_volume

    started = time.perf_counter()
    source = Path(source)
    patient_id = patient_id or (None if source.is_dir() else volume_id(source)) or source.name
    target = validate_spacing(spacing, "target spacing")  # the scan's is checked on reading
    validate_margin(margin_mm)
    threads = max(1, int(threads))

    stamp = source_stamp(source)  # before reading: a source changed meanwhile is redone later
    series = read_patient(source, patient_id=patient_id)
    source_spacing = series.spacing
    # The mask comes on its own box of the scan: no scan-size mask array is made.
    mask_box, mask = segment_lungs_in_box(series.hu, source_spacing, patient_id=patient_id,
                                          threads=threads)
    box = lung_bounding_box(mask, source_spacing, margin_mm=margin_mm, box=mask_box,
                            shape=series.hu.shape)
    start = np.array([s.start for s in box], dtype=np.float64)
    origin = np.asarray(series.origin, dtype=np.float64) + start * np.asarray(source_spacing)
    # Copies, so the whole-scan arrays are freed before resampling (bounded memory per worker).
    hu_crop = np.ascontiguousarray(series.hu[box])
    mask_crop = mask_on_box(mask_box, mask, box)
    del mask
    # Both source attributes in canonical (z, y, x) order: the grid before resampling.
    attrs = {
        "patient_id": patient_id,
        "series_uid": str(series.series_uid),
        "source_spacing": np.asarray(source_spacing, dtype=np.float64),
        "source_shape": np.asarray(series.hu.shape, dtype=np.int64),
        MARGIN_ATTR: float(margin_mm),
        SOURCE_STAMP_ATTR: stamp,
        SOURCE_ATTR: source_text(source.absolute()),
    }
    del series

    if threads >= 2:
        # The volume and the mask resample side by side (NumPy's gathers and arithmetic release
        # the GIL); both crops stay alive meanwhile (+~25 MB on a 512² scan).
        with ThreadPoolExecutor(2) as pool:
            volume_job = pool.submit(resample_volume, hu_crop, source_spacing, target)
            mask_job = pool.submit(resample_mask, mask_crop, source_spacing, target)
            hu, lung_mask = volume_job.result(), mask_job.result()
    else:  # one after the other, each crop freed once resampled
        hu = resample_volume(hu_crop, source_spacing, target)
        del hu_crop
        lung_mask = resample_mask(mask_crop, source_spacing, target)
    del mask_crop
    path = volumes.write_volume(
        volumes.volume_path(out_dir, patient_id), hu, lung_mask, target, tuple(origin), attrs,
        threads=threads,
    )
    logger.debug("%s: wrote %s, shape %s", patient_id, path, hu.shape)
    return PatientResult(
        patient_id, STATUS_OK, time.perf_counter() - started, tuple(int(n) for n in hu.shape)
    )
