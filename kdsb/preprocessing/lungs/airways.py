"""The trachea and main bronchi on the coarse grid, region-grown from a seed near the top of
the body's air, so that they are kept out of the lung mask."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from kdsb.preprocessing.lungs.morphology import IN_PLANE, bounding_box, touched
from kdsb.preprocessing.lungs.thresholds import AIRWAY_THRESHOLD_HU

logger = logging.getLogger(__name__)


AIRWAY_LOOSE_HU = -800.0  # a lumen reading a little above that; ground glass stays above it
# Loose air is a lumen only with a median below this: the real chest CT's trachea reads -926 to
# -994 HU on the coarse grid, parenchyma about -850 (a phantom's lung of -812 HU, 60 % of it below
# AIRWAY_LOOSE_HU, let the growth creep into both lower lobes below the carina: found by a user's
# trial, 40 % of the lungs lost).
AIRWAY_LUMEN_MEDIAN_HU = -900.0
TRACHEA_AREA_MM2 = (50.0, 900.0)  # lumen cross-section (after averaging): 8–34 mm diameter
TRACHEA_MAX_OFFSET_MM = 40.0  # from the body's midline
TRACHEA_MIN_FILL = 0.45  # area / bounding-box area: a round lumen fills about π/4 of its box
TRACHEA_MIN_DARK = 0.2  # least fraction of the lumen below AIRWAY_THRESHOLD_HU (after averaging)
TRACHEA_SEARCH_MM = 60.0  # the seed is looked for this far below the top of the body's air
AIRWAY_LEAK_FACTOR = 2.5  # airway area growing this much beyond its largest so far is a leak
AIRWAY_MARGIN_MM = 3.0  # removed around the found lumen: its wall's partial-volume rim
AIRWAY_SMOOTH_MAX_MM = 5.0  # widest in-plane mean (3 coarse pixels) before the airway threshold
TRACHEA_TOP_MM = 30.0  # the airway's top this long is trachea (above the carina)
TRACHEA_MIN_LENGTH_MM = 30.0  # an airway grown from a seed reaches this far down, or it is none


def _trachea_seeds(
    interior_air: np.ndarray, strict: np.ndarray, spacing: Sequence[float], midline: float
) -> list[tuple[int, np.ndarray]]:
    """Candidates for the trachea's lumen near the top of the body's air: round, dark,
    midline-near blobs, the highest first, then the most central.

    Candidates are the in-plane components of `interior_air` in the top `TRACHEA_SEARCH_MM`;
    their size, roundness and offset from `midline` are measured on that air (the strict
    threshold, after averaging, shrinks a narrow lumen below its true area), and at least
    `TRACHEA_MIN_DARK` of a candidate must be `strict` (airway-dark) air, which the lung apex's
    parenchyma is not.

    Returns:
        (slice index, 2D mask of the seed's strict air) per candidate; empty when nothing
        looks like a lumen.
    """
    slices = np.flatnonzero(interior_air.any(axis=(1, 2)))
    top = int(slices[-1])
    lowest = max(0, top - math.ceil(TRACHEA_SEARCH_MM / spacing[0]))
    part = interior_air[lowest : top + 1]
    labels, count = ndimage.label(part, structure=IN_PLANE)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1).astype(np.float64)
    dark = np.bincount(labels[strict[lowest : top + 1]], minlength=count + 1)
    columns = np.broadcast_to(np.arange(part.shape[2], dtype=np.float64), part.shape)
    centre_x = np.bincount(flat, weights=columns.ravel(), minlength=count + 1)
    candidates = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        box_area = (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
        offset = abs(centre_x[index] / area[index] - midline) * spacing[2]
        area_mm2 = area[index] * spacing[1] * spacing[2]
        if (
            TRACHEA_AREA_MM2[0] <= area_mm2 <= TRACHEA_AREA_MM2[1]
            and area[index] / box_area >= TRACHEA_MIN_FILL
            and dark[index] >= TRACHEA_MIN_DARK * area[index]
            and offset <= TRACHEA_MAX_OFFSET_MM
        ):
            candidates.append((-box[0].start, offset, index))
    return [
        (lowest - minus_z, (labels[-minus_z] == index) & strict[lowest - minus_z])
        for minus_z, _, index in sorted(candidates)
    ]


def _grow_airway(
    loose: np.ndarray, strict: np.ndarray, hu: np.ndarray, seed: np.ndarray, z: int,
    airway: np.ndarray, step: int,
) -> None:
    """Grow the airway slice by slice from the 2D `seed` in slice `z`, in direction `step` (±1).

    `loose` and `strict` number the air of each axial slice on its own, below `AIRWAY_LOOSE_HU` and
    below the airway's threshold, in `hu` (the coarse HU the thresholds were applied to). The
    loose air touching the airway of the previous slice is taken while it stays a lumen: above the
    carina the trachea is an air blob of its own in every slice, also where its lumen reads a
    little above the strict threshold (a real scan's trachea can read -940 to -970 HU in 3 mm
    blocks). Where that air joins the lung (an area jump beyond `AIRWAY_LEAK_FACTOR` times the
    largest area so far, or a median HU of parenchyma, not lumen: `AIRWAY_LUMEN_MEDIAN_HU`), only
    its strict air is taken, and growth stops at the first slice where even that jumps (a leak
    into emphysematous lung).
    """
    previous = seed
    largest_area = int(previous.sum())
    z += step
    while 0 <= z < loose.shape[0]:
        current = touched(loose[z], previous)
        if current.any() and (current.sum() > AIRWAY_LEAK_FACTOR * largest_area
                              or np.median(hu[z][current]) >= AIRWAY_LUMEN_MEDIAN_HU):
            current = touched(strict[z], previous)
        area = int(current.sum())
        if area == 0:
            return
        if area > AIRWAY_LEAK_FACTOR * largest_area:
            logger.debug("airway growth stopped at slice %d: area %d > %d", z, area, largest_area)
            return
        airway[z] |= current
        previous, largest_area = current, max(largest_area, area)
        z += step


def find_airway(
    coarse_hu: np.ndarray, interior_air: np.ndarray, spacing: Sequence[float], midline: float
) -> np.ndarray:
    """Trachea and main bronchi (coarse grid): a region grown at `AIRWAY_THRESHOLD_HU`.

    Where the coarse pixels are small, the threshold applies to HU averaged over 3×3 in-plane
    voxels, so image noise neither breaks the lumen apart nor sprinkles lung parenchyma below
    the threshold; coarser pixels are block means already, and a 3×3 mean over them would
    erase a narrow lumen (a small patient's trachea).
    """
    airway = np.zeros(coarse_hu.shape, dtype=bool)
    if 3 * max(spacing[1:]) <= AIRWAY_SMOOTH_MAX_MM:
        coarse_hu = ndimage.uniform_filter(coarse_hu, size=(1, 3, 3))
    strict = interior_air & (coarse_hu < AIRWAY_THRESHOLD_HU)
    seeds = _trachea_seeds(interior_air, strict, spacing, midline)
    if not seeds:
        logger.debug("no trachea found in the top %.0f mm of the body's air", TRACHEA_SEARCH_MM)
        return airway
    # One labelling of every slice's air at once (in-plane connectivity only) per threshold
    # serves the slice-by-slice growth.
    loose, _ = ndimage.label(interior_air & (coarse_hu < AIRWAY_LOOSE_HU), structure=IN_PLANE)
    labels, _ = ndimage.label(strict, structure=IN_PLANE)
    # The first seed whose airway runs `TRACHEA_MIN_LENGTH_MM` down as a lumen is the trachea
    # (a blob of pharynx air above it, or a lumen the coarse grid's alignment narrows, dies
    # sooner; growth from a dark lung apex widens at once); without one, the first seed's.
    first = None
    for z, seed in seeds:
        airway[:] = False
        airway[z] = seed
        _grow_airway(loose, labels, coarse_hu, seed, z, airway, step=-1)
        _grow_airway(loose, labels, coarse_hu, seed, z, airway, step=+1)
        if _runs_down_as_a_lumen(airway, z, spacing):
            break
        first = (z, airway.copy()) if first is None else first
    else:
        z, airway = first
    logger.debug("trachea seed in coarse slice %d, airway %d voxels", z, airway.sum())
    # The lumen's partial-volume rim (and the averaging) shrank it: widen it again, in-plane.
    rim = max(1, round(AIRWAY_MARGIN_MM / min(spacing[1:])))
    box = bounding_box(airway, (0, rim, rim))
    airway[box] = ndimage.binary_dilation(airway[box], structure=IN_PLANE, iterations=rim)
    return airway


def _runs_down_as_a_lumen(airway: np.ndarray, z: int, spacing: Sequence[float]) -> bool:
    """Whether the airway grown from a seed in slice `z` reaches `TRACHEA_MIN_LENGTH_MM` below
    it with every slice in that reach no wider than a trachea (`TRACHEA_AREA_MM2`)."""
    below = math.ceil(TRACHEA_MIN_LENGTH_MM / spacing[0])
    if z - below < 0 or not airway[z - below].any():
        return False
    areas = np.count_nonzero(airway[z - below : z + 1], axis=(1, 2)) * spacing[1] * spacing[2]
    return bool(areas.max() <= TRACHEA_AREA_MM2[1])


def trachea_x(airway: np.ndarray, spacing: Sequence[float]) -> float | None:
    """The trachea's centre across (x, voxel units): the mean column of the airway in its top
    `TRACHEA_TOP_MM`; None without an airway."""
    slices = np.flatnonzero(airway.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    low = slices[-1] - math.ceil(TRACHEA_TOP_MM / spacing[0]) + 1
    columns = np.count_nonzero(airway[max(0, low) :], axis=(0, 1))
    return float(np.dot(np.arange(columns.size), columns) / columns.sum())
