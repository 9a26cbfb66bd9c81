"""Painting shapes given in patient mm into a phantom's voxel grid: the grid's boxes (`Grid`)
and capsules (airways, vessels: `paint_capsule`)."""

from __future__ import annotations

import numpy as np

from kdsb.hu import AIR_HU

Capsule = tuple[np.ndarray, np.ndarray, float]  # segment start, end (z, y, x) and radius, mm


def capsule_distance2(
    grids: tuple[np.ndarray, np.ndarray, np.ndarray], start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Squared distance (mm²) from broadcast (z, y, x) grids to the segment start-end."""
    direction = end - start
    length2 = max(float(direction @ direction), 1e-12)
    rel = [g - s for g, s in zip(grids, start, strict=True)]
    t = np.clip(sum(r * d for r, d in zip(rel, direction, strict=True)) / length2, 0.0, 1.0)
    return sum((r - t * d) ** 2 for r, d in zip(rel, direction, strict=True))


class Grid:
    """Voxel ↔ patient-coordinate conversion and bounding boxes for one volume."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray):
        self.shape, self.spacing, self.origin = shape, spacing, origin

    def box(
        self, low_mm: np.ndarray, high_mm: np.ndarray
    ) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Slices of the voxels between two corners (mm) and their coordinate grids, or None."""
        low = np.maximum(np.floor((low_mm - self.origin) / self.spacing).astype(int), 0)
        high = np.minimum(
            np.ceil((high_mm - self.origin) / self.spacing).astype(int) + 1, self.shape
        )
        if np.any(high <= low):
            return None
        index = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
        axes = [
            (self.origin[k] + self.spacing[k] * np.arange(low[k], high[k])).astype(np.float32)
            for k in range(3)
        ]
        grids = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        return index, grids


def paint_capsule(
    hu: np.ndarray,
    mask: np.ndarray,
    grid: Grid,
    start: np.ndarray,
    end: np.ndarray,
    radius: float,
    value: int,
    where: np.ndarray | None = None,
) -> None:
    """Set `value` in hu (and 0 in mask when value is air) inside a capsule."""
    pad = radius + 1.0
    box = grid.box(np.minimum(start, end) - pad, np.maximum(start, end) + pad)
    if box is None:
        return
    index, grids = box
    inside = capsule_distance2(grids, start.astype(np.float32), end.astype(np.float32)) <= (
        radius**2
    )
    if where is not None:
        inside &= where[index].astype(bool)
    hu[index][inside] = value
    if value == AIR_HU:
        mask[index][inside] = 0
