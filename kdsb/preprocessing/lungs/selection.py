"""Which air inside the body is lung, and which of the rest is gas (coarse grid)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from kdsb.preprocessing.lungs.thresholds import AIRWAY_THRESHOLD_HU, GROUND_GLASS_MIN_HU

MIN_COMPONENT_ML = 10.0  # smaller air pockets inside the body are never lung
MIN_COMPONENT_FRACTION = 0.02  # ... nor those under 2 % of the largest air component


def select_lungs(candidates: np.ndarray, hu: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Keep air components that are parenchyma, big enough to be lung and reaching the upper
    half of the lungs.

    Gas is not parenchyma: a component whose median HU is below `AIRWAY_THRESHOLD_HU` (bowel
    gas, a pneumothorax, air outside the body) is dropped; lung, with its vessels and septa,
    has a median near -850 HU (-780 to -800 HU on the real CTs of the test archive, whose colon
    gas reads -970 HU). Bowel gas under the diaphragm is also discarded because it ends below
    the middle of the largest component; a lung squeezed by disease still reaches the apex.
    """
    labels, count = ndimage.label(candidates)
    if count == 0:
        return candidates
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # Median below the threshold ⇔ more than half the voxels below it (a count, not a sort).
    dark = np.bincount(labels[hu < AIRWAY_THRESHOLD_HU], minlength=count + 1)
    sizes[2 * dark > sizes] = 0
    if not sizes.any():
        return np.zeros_like(candidates)
    largest = int(np.argmax(sizes))
    profile = (labels == largest).sum(axis=(1, 2))
    middle_z = float(np.dot(np.arange(profile.size), profile) / profile.sum())
    keep = np.zeros(count + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        big = sizes[index] * voxel_ml >= MIN_COMPONENT_ML
        big = big and sizes[index] >= MIN_COMPONENT_FRACTION * sizes[largest]
        keep[index] = big and sizes[index] > 0 and box[0].stop - 1 >= middle_z
    return keep[labels]


def rejected_gas(rejected: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The components of air the lung selection `rejected` that are gas or stray lung: those
    whose median HU is below `GROUND_GLASS_MIN_HU`. Hazier ones (a ground-glass lesion's parts
    that read as air on the coarse grid, cut off from the lung by its solid core) are left to
    the filling like tissue."""
    labels, count = ndimage.label(rejected)
    if count == 0:
        return rejected
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    dark = np.bincount(labels[hu < GROUND_GLASS_MIN_HU], minlength=count + 1)
    gas = 2 * dark > sizes
    gas[0] = False
    return gas[labels]
