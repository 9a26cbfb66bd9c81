"""HU thresholds that the lung mask's rules share (see the package docstring)."""

from __future__ import annotations

AIR_THRESHOLD_HU = -400.0  # between lung parenchyma (about -850 HU) and soft tissue (0–100 HU)
GROUND_GLASS_MAX_HU = -300.0  # lung or ground glass in the mask's boundary blocks
GROUND_GLASS_MIN_HU = -700.0  # ground glass is hazier than lung (about -850 HU) or gas
AIRWAY_THRESHOLD_HU = -950.0  # airway lumen (about -1000 HU); parenchyma stays above it
AIRWAY_LOOSE_HU = -800.0  # a lumen reading a little above that; ground glass stays above it
BONE_HU = 300.0  # above this (coarse grid) tissue is bone: never taken in by the fillings
MM3_PER_ML = 1000.0
