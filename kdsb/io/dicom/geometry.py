"""A series' geometry: slices checked alike, ordered along their normal, on a uniform grid and
untilted; the patient axes of the image array and the canonical (z, y, x) transpose."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from kdsb.io.dicom.files import patient_error
from kdsb.io.dicom.headers import Header
from kdsb.io.series import MIN_SLICES, MM_DECIMALS, patient_axis

logger = logging.getLogger(__name__)

IN_PLANE_DRIFT_PIXELS = 0.5  # largest in-plane drift of slice positions (gantry tilt), pixels
DUPLICATE_FRACTION = 0.01  # positions closer than this × median gap are the same slice
SAME_POSITION_MM = 0.01  # and always those this close (re-exports round positions anew)
MISSING_SLICE_FACTOR = 1.5  # a gap over this × median gap means missing slices
GRID_TOLERANCE = 0.2  # largest distance of a slice from the uniform grid, × spacing


def check_slices(patient: str, headers: list[Header]) -> None:
    first = headers[0]
    for header in headers:
        if header.orientation is None or header.position is None:
            raise patient_error(
                patient,
                "expected ImageOrientationPatient and ImagePositionPatient, received an "
                "image without them",
                header.path,
            )
        if header.pixel_spacing is None:
            raise patient_error(patient, "expected PixelSpacing, received none", header.path)
        if len(header.pixel_spacing) != 2 or not all(
            math.isfinite(v) and v > 0 for v in header.pixel_spacing
        ):
            raise patient_error(patient, f"expected PixelSpacing of two positive numbers (row, "
                                f"column mm), received {list(header.pixel_spacing)}",
                                header.path)
        if (header.rows, header.columns) != (first.rows, first.columns):
            raise patient_error(
                patient,
                f"expected every slice to be {first.rows}×{first.columns} pixels like "
                f"{first.path.name}, received {header.rows}×{header.columns}",
                header.path,
            )
        if not np.allclose(header.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise patient_error(
                patient,
                f"expected PixelSpacing {first.pixel_spacing} like {first.path.name}, "
                f"received {header.pixel_spacing}",
                header.path,
            )


def _axis_of(patient: str, cosine: np.ndarray, what: str, path: Path) -> tuple[int, int]:
    """The patient axis (0 X, 1 Y, 2 Z) a direction cosine runs along, and its sign."""
    found = patient_axis(cosine)
    if found is None:
        raise patient_error(
            patient,
            f"expected a {what} direction aligned with a patient axis, received an oblique "
            f"ImageOrientationPatient {np.round(cosine, 4).tolist()}",
            path,
        )
    return found


def order_slices(
    patient: str, headers: list[Header], normal: np.ndarray
) -> tuple[list[Header], np.ndarray]:
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
        raise patient_error(
            patient,
            f"expected at least {MIN_SLICES} slices at distinct positions, received "
            f"{len(headers)}",
            headers[0].path,
        )
    return headers, along


def slice_spacing(patient: str, headers: list[Header], along: np.ndarray) -> float:
    """The uniform slice spacing in mm, after the missing-slice and evenness checks."""
    gaps = np.diff(along)
    median_gap = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > MISSING_SLICE_FACTOR * median_gap:
        raise patient_error(
            patient,
            f"expected evenly spaced slices ({median_gap:.3g} mm apart), received a gap of "
            f"{gaps[worst]:.3g} mm between {headers[worst].path.name} and "
            f"{headers[worst + 1].path.name}: missing slice(s)"
        )
    spacing = float(along[-1] - along[0]) / (len(along) - 1)
    off_grid = np.abs(along - (along[0] + spacing * np.arange(len(along))))
    if off_grid.max() > GRID_TOLERANCE * spacing:
        bad = headers[int(np.argmax(off_grid))]
        raise patient_error(
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


def check_tilt(
    patient: str,
    headers: list[Header],
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
) -> None:
    """Raise when slice positions drift within the image plane (gantry tilt)."""
    offsets = np.array([h.position for h in headers]) - headers[0].position
    drift = np.abs(offsets @ orientation.T)  # (n, 2): along row and column cosines, mm
    limit = IN_PLANE_DRIFT_PIXELS * min(pixel_spacing)
    if drift.max() > limit:
        worst = headers[int(np.argmax(drift.max(axis=1)))]
        raise patient_error(
            patient,
            f"expected slice positions along the slice normal, received an in-plane drift "
            f"of {drift.max():.3g} mm (gantry tilt or sheared series)",
            worst.path,
        )


def slice_axes(patient: str, first: Header) -> tuple[list[tuple[int, int]], np.ndarray]:
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
        raise patient_error(
            patient,
            f"expected perpendicular direction cosines, received "
            f"{orientation.ravel().tolist()}",
            first.path,
        )
    normal_axis = 3 - row_axis - column_axis
    normal_sign = int(np.sign(normal[normal_axis]))
    return [(normal_axis, normal_sign), (column_axis, column_sign), (row_axis, row_sign)], normal


def to_canonical(
    volume: np.ndarray,
    axes: list[tuple[int, int]],
    steps: list[float],
    units: list[np.ndarray],
    position: np.ndarray,
) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """Transpose and flip a stacked image array into canonical (z, y, x) order.

    Args:
        volume: the image array (slice, row, column).
        axes: (patient axis, sign) of each array axis (`slice_axes`).
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

