"""The HU thresholds (and the mm³ → ml conversion) that several of the lung mask's rules share
(see the package docstring)."""

from __future__ import annotations

import numpy as np

AIR_THRESHOLD_HU = -400.0  # between lung parenchyma (about -850 HU) and soft tissue (0–100 HU)
AIRWAY_THRESHOLD_HU = -950.0  # airway lumen (about -1000 HU); parenchyma stays above it
BONE_HU = 300.0  # above this tissue is bone: never taken in by the fillings and rims
# Ground glass (a lesion's haze) lies between these: hazier than lung (about -850 HU) or gas,
# darker than soft tissue.
GROUND_GLASS_MIN_HU = -700.0
GROUND_GLASS_MAX_HU = -300.0
MM3_PER_ML = 1000.0


def fillable_tissue(coarse_hu: np.ndarray) -> np.ndarray:
    """Voxels the fillings, rims and pockets may take in: neither air (below
    `AIR_THRESHOLD_HU`) nor bone (above `BONE_HU`)."""
    return (coarse_hu >= AIR_THRESHOLD_HU) & (coarse_hu <= BONE_HU)
