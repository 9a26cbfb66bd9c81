"""The most lesion-like soft tissue inside a lung mask, for the QC's second row: a coarse pointer
for eyes, not a nodule detector (where no nodule exists it may point at a thick hilar vessel, a
bifurcation or the part of the descending aorta the mask takes in).

Lesion-like is large and compact: each component of soft tissue (vessels opened away) scores its
volume / `elongation`² (`lesion_score`; elongation: longest over shortest principal axis), so a
20 mm nodule outranks the 35–100 ml tube of aorta that the lung mask takes in beside the spine
of a real chest CT (elongated 3–6 ×; implanted lesions 1.1–1.9 ×; `benchmarks/qc_lesion.py`).

Speed: the search runs on a copy strided to at most `LESION_MAX_VOXELS` voxels and checks its
best-scoring and its largest candidates again at full resolution around them (0.1–0.2 s for a
real chest CT at 1 mm on a 2-core machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdsb.io import volumes
from kdsb.preprocessing.lungs.thresholds import GROUND_GLASS_MAX_HU, MM3_PER_ML
from kdsb.preprocessing.qc.overlays import orthogonal_views

# The lesion finder: soft tissue (also the solid part of part-solid lesions) inside the lung
# mask, with structures thinner than the opening ball (vessels) removed.
LESION_HU = GROUND_GLASS_MAX_HU  # voxels above this are soft tissue, HU
VESSEL_RADIUS_MM = 3.0  # radius of the opening ball that removes vessels, mm
LESION_MAX_VOXELS = 4_000_000  # larger volumes are searched on a strided copy (for speed)
LESION_CANDIDATES = 10  # largest components of that search checked again at full resolution
LESION_FIELD_MM = 80.0  # smallest side of the zoomed lesion views, mm
LESION_FIELD_DIAMETERS = 3.0  # the zoomed views span at least this many lesion diameters
ML_PER_MM3 = 1.0 / MM3_PER_ML


@dataclass(frozen=True, eq=False)
class Lesion:
    """The most lesion-like soft tissue inside a lung mask.

    Attributes:
        centre: voxel index (z, y, x) of its centre of mass, fractional.
        volume_ml: its volume, ml.
        radius_mm: the radius of a sphere of the same volume, mm.
        elongation: its longest over its shortest principal axis (1 for a ball).
        mask: boolean array of the volume's shape (z, y, x), True inside the lesion.
    """

    centre: tuple[float, float, float]
    volume_ml: float
    radius_mm: float
    elongation: float
    mask: np.ndarray


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean ball of `radius_mm` on a grid of `spacing` (mm, z, y, x), centred in the array."""
    half = [int(radius_mm // s) for s in spacing]
    grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s) ** 2 for g, s in zip(grid, spacing, strict=True)) <= radius_mm**2


def _strides(shape: Sequence[int], spacing: Sequence[float], max_voxels: int) -> list[int]:
    """Per-axis strides that bring `shape` to at most `max_voxels`, coarsening the finest axis."""
    strides = [1] * len(shape)
    while math.prod(-(-n // s) for n, s in zip(shape, strides, strict=True)) > max_voxels:
        finest = int(np.argmin([p * s for p, s in zip(spacing, strides, strict=True)]))
        strides[finest] += 1
    return strides


def _upsample(
    component: np.ndarray,
    box: tuple[slice, slice, slice],
    strides: Sequence[int],
    shape: Sequence[int],
    margin: Sequence[int],
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """A component found at `box` on a strided grid, mapped back to the full grid `shape`.

    Full-grid voxel j takes strided voxel round(j / stride) on each axis (nearest voxel).

    Args:
        component: boolean component, cut to its box on the strided grid, (z, y, x).
        box: its box on the strided grid.
        strides: the strides per axis.
        shape: the full grid's shape.
        margin: voxels of background kept around the component on the full grid, per axis.

    Returns:
        The boolean component on the full grid, cut to its box plus margin (clipped to the
        grid), and that box.
    """
    region, indices, inside = [], [], []
    for b, s, n, m in zip(box, strides, shape, margin, strict=True):
        j = np.arange(max(0, b.start * s - s // 2 - m), min(n, b.stop * s - s // 2 + m))
        k = (j + s // 2) // s - b.start
        region.append(slice(int(j[0]), int(j[-1]) + 1))
        indices.append(np.clip(k, 0, b.stop - b.start - 1))
        inside.append((k >= 0) & (k < b.stop - b.start))
    within = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return component[np.ix_(*indices)] & within, tuple(region)


def elongation(component: np.ndarray, spacing: Sequence[float]) -> float:
    """Longest over shortest principal axis of a boolean `component` (z, y, x) on a grid of
    `spacing` (mm): the square root of its voxel centres' covariance eigenvalues' ratio, each
    eigenvalue at least a voxel's own (the largest spacing² / 12), so flat or tiny components
    stay finite."""
    points = np.argwhere(component) * np.asarray(spacing, dtype=np.float64)
    if len(points) < 2:
        return 1.0
    floor = max(spacing) ** 2 / 12.0
    eigenvalues = np.maximum(np.linalg.eigvalsh(np.cov(points, rowvar=False)), floor)
    return float(math.sqrt(eigenvalues[-1] / eigenvalues[0]))


def lesion_score(mm3: float, elongation_ratio: float) -> float:
    """How lesion-like a soft-tissue component is: its volume (mm³) / its elongation²."""
    return mm3 / elongation_ratio**2


def _soft_tissue(
    hu: np.ndarray, lung_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, int]:
    """Connected components (26-connected) of the soft tissue inside the mask, vessels removed.

    Soft tissue is HU > `LESION_HU` where the mask is 1, opened by a ball of `VESSEL_RADIUS_MM`
    on a grid of `spacing` (mm, z, y, x).

    Returns:
        Integer labels of the components (0 elsewhere), and their number.
    """
    from scipy import ndimage

    soft = (hu > LESION_HU) & (lung_mask > 0)
    opened = ndimage.binary_opening(soft, structure=_ball(VESSEL_RADIUS_MM, spacing))
    return ndimage.label(opened, structure=np.ones((3, 3, 3), dtype=bool))


def _at_full_resolution(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing: Sequence[float],
    component: np.ndarray,
    box: tuple[slice, slice, slice],
    strides: Sequence[int],
) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """A component found on the strided grid, found again at full resolution around its place.

    The opening is redone on the full grid in the component's box plus the ball radius and a
    stride; the full-resolution component that overlaps it most is returned, with that region.
    None when nothing there survives the full-resolution opening: strided openings are less
    selective (vessel crossings survive them).
    """
    margin = [math.ceil(VESSEL_RADIUS_MM / p) + s for p, s in zip(spacing, strides, strict=True)]
    near, region = _upsample(component, box, strides, hu.shape, margin)
    labels, _ = _soft_tissue(hu[region], lung_mask[region], spacing)
    overlap = np.bincount(labels[near])
    overlap[0] = 0
    if not overlap.any():
        return None
    return labels == int(np.argmax(overlap)), region


def find_lesion(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing: Sequence[float],
    max_voxels: int = LESION_MAX_VOXELS,
) -> Lesion | None:
    """The most lesion-like soft tissue inside the lung mask, vessels removed; None when none.

    Soft tissue is HU > `LESION_HU` inside `lung_mask`. A morphological opening by a ball of
    radius `VESSEL_RADIUS_MM` (in mm, so anisotropic voxels are handled) removes thinner
    structures (vessels, fissures, noise); of the remaining connected components (26-connected)
    the lesion is the one of highest `lesion_score`: volume / `elongation`², so a compact blob
    outranks a longer tube of more millilitres.

    For speed the search runs on a copy strided (along the finest axes) to at most `max_voxels`
    voxels, a no-op for small volumes. Its `LESION_CANDIDATES` best-scoring and as many largest
    components are found again at full resolution around their place (strided openings let
    vessel crossings through), and the best-scoring that survives is the lesion: its outline,
    volume, elongation and centre are those of the full-resolution rule.

    Args:
        hu: HU volume, shape (z, y, x).
        lung_mask: 0/1 lung mask, same shape.
        spacing: voxel size in mm, (z, y, x).
        max_voxels: largest grid searched without striding.

    Returns:
        The lesion, or None when nothing survives the opening.
    """
    from scipy import ndimage

    spacing = tuple(float(s) for s in spacing)
    strides = _strides(hu.shape, spacing, max_voxels)
    strided = tuple(slice(None, None, s) for s in strides)
    coarse_spacing = [p * s for p, s in zip(spacing, strides, strict=True)]
    labels, _ = _soft_tissue(hu[strided], lung_mask[strided], coarse_spacing)
    boxes = ndimage.find_objects(labels)
    coarse_mm3 = [np.count_nonzero(labels[box] == index + 1) * math.prod(coarse_spacing)
                  for index, box in enumerate(boxes)]
    coarse_scores = [lesion_score(mm3, elongation(labels[box] == index + 1, coarse_spacing))
                     for index, (box, mm3) in enumerate(zip(boxes, coarse_mm3, strict=True))]
    # The best-scoring and the largest: a nodule that a vessel crossing joins on the strided
    # grid is elongated there, not at full resolution (found in review).
    candidates = {*np.argsort(-np.asarray(coarse_scores), kind="stable")[:LESION_CANDIDATES],
                  *np.argsort(-np.asarray(coarse_mm3), kind="stable")[:LESION_CANDIDATES]}
    best, best_score = None, 0.0
    for index in sorted(candidates, key=lambda i: (-coarse_mm3[i], i)):
        # A score is at most its volume, and strided volumes are close to full ones and rarely
        # smaller: smaller components cannot win.
        if coarse_mm3[index] <= best_score:
            break
        box = boxes[index]
        found = _at_full_resolution(
            hu, lung_mask, spacing, labels[box] == index + 1, box, strides
        )
        if found is None:
            continue
        mm3 = np.count_nonzero(found[0]) * math.prod(spacing)
        ratio = elongation(found[0], spacing)
        if lesion_score(mm3, ratio) > best_score:
            best, best_score = (found, mm3, ratio), lesion_score(mm3, ratio)
    if best is None:
        return None
    (lesion, region), mm3, ratio = best
    mask = np.zeros(hu.shape, dtype=bool)
    mask[region] = lesion
    centre = np.add(ndimage.center_of_mass(lesion), [r.start for r in region])
    return Lesion(
        centre=tuple(float(c) for c in centre),
        volume_ml=mm3 * ML_PER_MM3,
        radius_mm=(3.0 * mm3 / (4.0 * math.pi)) ** (1.0 / 3.0),
        elongation=ratio,
        mask=mask,
    )


def lesion_views(volume: volumes.Volume, lesion: Lesion) -> dict[str, tuple[np.ndarray, float]]:
    """Zoomed axial, coronal and sagittal overlays through a lesion's centre, lesion outlined.

    The field of view is a box of side max(`LESION_FIELD_MM`, `LESION_FIELD_DIAMETERS` lesion
    diameters) around the centre, cut to the volume.

    Returns:
        View name → (RGB image, pixel aspect height/width), as `overlays.views`.
    """
    half_mm = max(LESION_FIELD_MM, LESION_FIELD_DIAMETERS * 2.0 * lesion.radius_mm) / 2.0
    point = tuple(int(round(c)) for c in lesion.centre)
    field = tuple(
        slice(max(0, p - round(half_mm / s)), min(n, p + round(half_mm / s) + 1))
        for p, s, n in zip(point, volume.spacing, volume.hu.shape, strict=True)
    )
    return orthogonal_views(volume, point, lesion.mask, field)
