"""The images the QC draws: a slice in the lung window with the lung mask (and a lesion)
outlined, and the axial, coronal and sagittal views through a point, each with its pixel
aspect so that millimetres look alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdsb.hu import LUNG_WINDOW_HU
from kdsb.io import volumes

OUTLINE_RGB = (1.0, 0.2, 0.2)  # mask outline colour
LESION_RGB = (1.0, 0.85, 0.0)  # lesion outline colour
DPI = 100


def lung_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index (z, y, x) of the mask's centre of mass; the array centre when empty."""
    # From the mask's projections: ten times faster than ndimage.center_of_mass on 300³.
    per_yx = np.count_nonzero(mask, axis=0)
    total = int(per_yx.sum())
    if total == 0:
        return tuple(n // 2 for n in mask.shape)
    profiles = (np.count_nonzero(mask, axis=(1, 2)), per_yx.sum(axis=1), per_yx.sum(axis=0))
    return tuple(int(round(float(np.dot(p, np.arange(len(p)))) / total)) for p in profiles)


def _windowed(hu: np.ndarray) -> np.ndarray:
    low, high = LUNG_WINDOW_HU
    return np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def overlay(hu: np.ndarray, mask: np.ndarray, lesion: np.ndarray | None = None) -> np.ndarray:
    """An RGB float image of a 2D HU slice in the lung window with outlines in colour.

    Args:
        hu: 2D HU slice.
        mask: 2D 0/1 lung mask of the same shape, outlined in `OUTLINE_RGB`.
        lesion: optional 2D boolean lesion mask of the same shape, outlined in `LESION_RGB`
            (over the lung outline where they meet).

    Returns:
        Array of shape (*hu.shape, 3), values in [0, 1].
    """
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(_windowed(hu)[..., None], 3, axis=-1)
    rgb[find_boundaries(mask > 0, mode="inner")] = OUTLINE_RGB
    if lesion is not None:
        rgb[find_boundaries(lesion, mode="inner")] = LESION_RGB
    return rgb


def orthogonal_views(
    volume: volumes.Volume,
    point: Sequence[int],
    lesion: np.ndarray | None = None,
    field: tuple[slice, slice, slice] = (slice(None),) * 3,
) -> dict[str, tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal overlays through voxel `point` (z, y, x), cut to `field`."""
    z, y, x = point
    fz, fy, fx = field
    cuts = {"axial": (z, fy, fx), "coronal": (fz, y, fx), "sagittal": (fz, fy, x)}
    aspects = pixel_aspects(volume.spacing)
    return {
        name: (
            overlay(volume.hu[cut], volume.lung_mask[cut], None if lesion is None else lesion[cut]),
            aspects[name],
        )
        for name, cut in cuts.items()
    }


def pixel_aspects(spacing: Sequence[float]) -> dict[str, float]:
    """Pixel height / width of the axial (y, x), coronal (z, x) and sagittal (z, y) views of a
    volume of `spacing` (z, y, x) mm: Matplotlib's `imshow(aspect=…)`, so that mm look alike."""
    sz, sy, sx = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}


def views(volume: volumes.Volume) -> dict[str, tuple[np.ndarray, float]]:
    """Axial and coronal overlays through the lung centre, sagittal through the most lung.

    Returns:
        View name → (RGB image, pixel aspect height/width). Coronal and sagittal images have
        row 0 inferior (show them with origin="lower" so superior is up).
    """
    z, y, _ = lung_centre(volume.lung_mask)
    # The centre of mass lies between the lungs: the sagittal view goes through the x with
    # the most lung instead.
    columns = np.count_nonzero(volume.lung_mask, axis=(0, 1))
    x = int(np.argmax(columns)) if columns.any() else volume.lung_mask.shape[2] // 2
    return orthogonal_views(volume, (z, y, x))
