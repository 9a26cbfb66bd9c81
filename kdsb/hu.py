"""Hounsfield-unit constants shared by the readers, the lung mask, the phantoms and the models.

Every HU value that more than one module relies on is defined here once.
"""

from __future__ import annotations

AIR_HU = -1000  # air; outside-field voxels become this on reading
OUTSIDE_FIELD_HU = -2000  # what many scanners store outside the reconstructed field of view
# Values at or below OUTSIDE_FIELD_HU (-2000, -3024, …) are padding, not tissue.
PARENCHYMA_HU = -850  # typical aerated lung parenchyma
MAX_AIR_HU = -500  # a chest CT in HU holds air or lung below this; a volume that does not is not HU
MIN_AIR_SHARE = 0.01  # … in at least this share of its voxels (the lungs alone hold far more)
# The lung window (low, high), HU: shown in QC images, and mapped to [-1, 1] as network input.
LUNG_WINDOW_HU = (AIR_HU, 400)
# Upper clip of the network input: above the densest calcified nodules (up to ~1000 HU) but below
# cortical bone and metal (1500 to 3000+ HU), which would otherwise dominate the scale.
INPUT_CLIP_MAX_HU = 1000


def air_share(values, padded: int = 0) -> float:
    """The share of a volume's voxels (any axis order) that are air or lung of the scan's own:
    at or below `MAX_AIR_HU` but above `OUTSIDE_FIELD_HU`, less the `padded` voxels a reader
    already turned from padding or outside-field values into `AIR_HU` (the DICOM reader; found
    in review: a series that lost its rescale passed as HU on its padding alone, a fifth of a
    round field of view). Counted on every fourth plane along axis 0, a quarter of the work,
    the padding subtracted as its share of the whole."""
    import numpy as np

    sample = values[::4]
    dark = (sample <= MAX_AIR_HU) & (sample > OUTSIDE_FIELD_HU)
    share = float(np.count_nonzero(dark)) / max(1, sample.size)
    return max(0.0, share - padded / max(1, values.size))


def not_hounsfield(darkest: float, brightest: float, air_share: float) -> str | None:
    """Why a scan whose values run from `darkest` to `brightest`, with `air_share` of its voxels
    in-field air or lung (`air_share`), is plainly not in HU, or None when it may be. A chest CT
    holds air and lung, at or below `MAX_AIR_HU`, in far more than `MIN_AIR_SHARE` of its
    voxels: raw unsigned values, a label map, or HU + 1024 whose only dark voxels are padding
    do not."""
    if darkest <= MAX_AIR_HU and air_share >= MIN_AIR_SHARE:
        return None
    found = ("" if darkest > MAX_AIR_HU else
             f", {air_share:.2%} of them at or below {MAX_AIR_HU} (padding aside)")
    return (f"expected a CT in Hounsfield units (air at or below {MAX_AIR_HU} HU in at least "
            f"{MIN_AIR_SHARE:.0%} of the voxels), received values from {darkest:g} to "
            f"{brightest:g}{found}")
