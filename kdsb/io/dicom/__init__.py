"""Read one patient's folder of DICOM files into a canonical CT volume in Hounsfield units.

`read_series(folder)` reads every file in the folder (any names, any order), keeps the CT series
with the most distinct slice positions and returns it as int16 HU in kdsb's canonical
orientation: shape (z, y, x), axis 0 inferior → superior, axis 1 anterior → posterior, axis 2
right → left, i.e. DICOM patient coordinates Z, Y, X increasing along the axes.

How the series is chosen and checked:

- One pass over the files: each is read from disk once and parsed whole, its pixel data kept as
  undecoded bytes (up to `headers.CACHE_BYTES` for the folder; files past that budget are parsed
  with `stop_before_pixels` and read again only if their series is chosen). Only the chosen
  series is decoded, one slice at a time into a preallocated volume, each decoded slice and its
  bytes released at once; the other series' bytes are released as soon as it is chosen. Files
  that are not DICOM are skipped with a warning; DICOM files that cannot be parsed (truncated,
  corrupt) are an error naming the file (damage within the pixel data only when that file's
  series is chosen).
- Objects without an image, localizers/scouts (ImageType LOCALIZER), non-CT series and images
  whose orientation differs from their series' majority are dropped and logged; of the rest the
  series with the most distinct slice positions wins (ties: the smaller SeriesInstanceUID).
- Slices are ordered by their position along the slice normal (row × column direction cosines),
  never by InstanceNumber; the slice spacing comes from these positions, never from
  SliceThickness. Slices at the same position: the first (lowest InstanceNumber, then file name)
  is kept, with a warning.
- Spacing irregularities: a gap of more than `geometry.MISSING_SLICE_FACTOR` × the median gap is
  a missing slice (error). Otherwise the slices are put on a uniform grid from the first to the
  last position (spacing = extent / (n - 1)); if any slice lies more than
  `geometry.GRID_TOLERANCE` × spacing off that grid the series is uneven (error); below that,
  the small irregularity is absorbed into the uniform grid (a debug message says how large it
  was).
- Positions that drift within the image plane (gantry tilt) or direction cosines that are not
  aligned with the patient axes (oblique acquisitions) are errors; axis-aligned acquisitions of
  any kind (flipped rows or columns, coronal, sagittal) are transposed and flipped into the
  canonical orientation.
- HU = stored × RescaleSlope + RescaleIntercept per slice, in float32 (integer arithmetic when
  the slope is 1 and the intercept whole). PixelPaddingValue (with PixelPaddingRangeLimit) and
  anything at or below `OUTSIDE_FIELD_HU` (the -2000 / -3024 HU outside-field values) become
  air, -1000 HU; the result is clipped into int16. A series with under `hu.MIN_AIR_SHARE` (1 %)
  of its voxels at or below `hu.MAX_AIR_HU` is plainly not HU (a missing rescale, a label map)
  and an error. MONOCHROME1 only inverts the display (DICOM PS3.3 C.7.6.3.1.2: the rescale, not
  the photometric interpretation, defines HU), so it is accepted and read like MONOCHROME2;
  other photometric interpretations are errors.
- Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg); a missing decoder
  is a `MissingDecoderError` naming the package to install.

Every problem raises a one-line `DicomError` naming the patient and, where relevant, the file.

The steps, a module each: `files` (what is DICOM, parsing a file, the error), `headers` (the
header pass), `selection` (choosing the series), `geometry` (ordering and checking slices, the
canonical transpose), `pixels` (decoding into HU).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kdsb.hu import air_share, not_hounsfield
from kdsb.io.dicom.files import is_dicom_file, patient_error, read_dataset
from kdsb.io.dicom.geometry import (
    check_slices,
    check_tilt,
    order_slices,
    slice_axes,
    slice_spacing,
    to_canonical,
)
from kdsb.io.dicom.headers import read_headers
from kdsb.io.dicom.pixels import read_pixels
from kdsb.io.dicom.selection import choose_series
from kdsb.io.series import CTSeries

__all__ = ["is_dicom_file", "read_dataset", "read_series"]

logger = logging.getLogger(__name__)


def read_series(folder: str | Path, patient_id: str | None = None) -> CTSeries:
    """Read the main CT series of one patient's DICOM folder as canonical int16 HU.

    Args:
        folder: a folder of DICOM files (any names, any order; sub-folders are read too).
        patient_id: the name used in messages; the folder name if None.

    Returns:
        The CT series with the most distinct slice positions: HU shape (z, y, x) along
        patient Z, Y, X increasing, spacing and origin in mm in (z, y, x) order.

    Raises:
        DicomError: the folder holds no usable CT series; the one-line message names the
            patient and the file at fault.
        MissingDecoderError: the pixel data needs a decoder that is not installed.
    """
    folder = Path(folder)
    patient = patient_id or folder.name
    headers = choose_series(patient, read_headers(patient, folder))
    check_slices(patient, headers)
    first = headers[0]
    axes, normal = slice_axes(patient, first)
    headers, along = order_slices(patient, headers, normal)
    step = slice_spacing(patient, headers, along)
    check_tilt(patient, headers, first.orientation, first.pixel_spacing)
    # Decoded straight into the stacked array; the canonical array is a transpose and flips of
    # it, made contiguous once.
    volume, padded = read_pixels(patient, headers)
    row_spacing, column_spacing = first.pixel_spacing
    hu, spacing, origin = to_canonical(
        volume,
        axes,
        [step, row_spacing, column_spacing],
        [normal, first.orientation[1], first.orientation[0]],
        headers[0].position,
    )
    reason = not_hounsfield(int(hu.min()), int(hu.max()), air_share(hu, padded))
    if reason is not None:
        raise patient_error(patient, f"{reason} (RescaleSlope / RescaleIntercept missing?)",
                            first.path)
    logger.debug(
        "patient %s: series %s, %d slices, shape %s, spacing %s mm",
        patient, first.series_uid, len(headers), hu.shape, spacing,
    )
    return CTSeries(hu=hu, spacing=spacing, origin=origin, series_uid=first.series_uid)
