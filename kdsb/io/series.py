"""A CT series in canonical orientation: what every reader returns and the pipeline consumes.

Canonical orientation: HU shape (z, y, x), axis 0 inferior → superior, axis 1 anterior →
posterior, axis 2 right → left (DICOM / LPS patient coordinates Z, Y, X increasing along the
axes); spacing and origin in mm in (z, y, x) order. The spacing is checked here, where a scan
enters kdsb, so the preprocessing steps downstream take it as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdsb.errors import KdsbError

NDIM = 3
INT16_MIN, INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
MIN_SLICES = 2  # fewest voxels along any axis of a readable volume
# Direction cosines: a direction whose components off its main patient axis have a norm within
# this (the sine of its angle to that axis) counts as aligned with it (1e-3 ≈ 0.06°, under half a
# pixel across a 512-pixel image).
AXIS_ALIGNMENT_TOLERANCE = 1e-3
# Patient coordinates: LPS (DICOM, kdsb) to RAS (NIfTI, nibabel) and back: x and y negated.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MM_DECIMALS = 9  # spacing and origin rounded to 1e-9 mm: hides float noise (0.7000000000000001)
# Spacings closer than this (mm, per axis) are the same grid.
SPACING_TOLERANCE_MM = 1e-3


def validate_spacing(spacing: Sequence[float], name: str = "spacing") -> tuple[float, float, float]:
    """Check a voxel spacing and return it as 3 floats.

    Args:
        spacing: voxel size (z, y, x) in mm.
        name: what the spacing is, for the error message.

    Returns:
        The spacing as a tuple of 3 Python floats (mm).

    Raises:
        KdsbError: anything other than 3 positive finite numbers.
    """
    try:
        values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).ravel())
    except (TypeError, ValueError):
        values = ()
    if len(values) != NDIM or not all(math.isfinite(s) and s > 0 for s in values):
        raise KdsbError(
            f"expected {name} as 3 positive finite numbers in mm (z, y, x), "
            f"received {spacing!r}"
        )
    return values  # type: ignore[return-value]


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two (z, y, x) spacings in mm are the same grid (within `SPACING_TOLERANCE_MM`)."""
    return bool(np.allclose(a, b, rtol=0, atol=SPACING_TOLERANCE_MM))


def patient_axis(cosine: np.ndarray) -> tuple[int, int] | None:
    """The patient axis (0 X, 1 Y, 2 Z) a direction cosine runs along, and its sign (±1).

    Returns:
        (axis, sign), or None for an oblique direction: more than `AXIS_ALIGNMENT_TOLERANCE`
        (a sine) off every axis. (A test of the main component against ±1 would let ~2.6°
        through: its cosine stays within 1e-3 of 1 that far.)
    """
    cosine = np.asarray(cosine, dtype=np.float64)
    axis = int(np.argmax(np.abs(cosine)))
    norm = float(np.linalg.norm(cosine))
    if not norm > 0 or np.linalg.norm(np.delete(cosine, axis)) > AXIS_ALIGNMENT_TOLERANCE * norm:
        return None
    return axis, int(np.sign(cosine[axis]))


@dataclass
class CTSeries:
    """One CT series in canonical orientation.

    Attributes:
        hu: int16 Hounsfield units, shape (z, y, x), axes along patient Z, Y, X increasing
            (inferior → superior, anterior → posterior, right → left).
        spacing: voxel size in mm, (z, y, x): 3 positive finite floats (checked on creation).
        origin: patient coordinate in mm of voxel [0, 0, 0], (z, y, x) i.e. (Z, Y, X).
        series_uid: the SeriesInstanceUID.

    The series' shape and spacing as scanned are `hu.shape` and `spacing`: both in canonical
    (z, y, x) order, whatever the acquisition plane.

    Raises:
        KdsbError: a spacing that is not 3 positive finite numbers.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    series_uid: str

    def __post_init__(self) -> None:
        self.spacing = validate_spacing(self.spacing)
