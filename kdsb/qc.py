"""QC images of preprocessed volumes: one PNG per patient and a contact sheet of the cohort.

The per-patient PNG shows axial, coronal and sagittal slices through the lung centre in a lung
window with the lung mask outlined; the contact sheet tiles one axial thumbnail per patient
(failed patients in red with their reason), so a researcher can eyeball hundreds of scans in
minutes. Figures use matplotlib's object API with the Agg canvas (no pyplot, no display),
imported only when an image is drawn.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb import store
from kdsb.errors import StoreError

logger = logging.getLogger(__name__)

WINDOW_HU = (-1000.0, 400.0)  # lung window shown in every image, HU
OUTLINE_RGB = (1.0, 0.2, 0.2)  # mask outline colour
FAILED_RGB = (0.45, 0.0, 0.0)  # background of a failed patient's tile
TILE_PX = 128  # thumbnail side in the contact sheet, pixels
LABEL_PX = 14  # height of the id strip above each thumbnail, pixels
LABEL_CHARS = 22  # longest id or reason shown under a tile
DPI = 100
CONTACT_SHEET_NAME = "contact_sheet.png"


def lung_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index (z, y, x) of the mask's centre of mass; the array centre when empty."""
    from scipy import ndimage

    if not mask.any():
        return tuple(n // 2 for n in mask.shape)
    centre = ndimage.center_of_mass(mask > 0)
    return tuple(int(round(c)) for c in centre)


def _windowed(hu: np.ndarray) -> np.ndarray:
    low, high = WINDOW_HU
    return np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def overlay(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An RGB float image of a 2D HU slice in the lung window with the mask outline in colour.

    Args:
        hu: 2D HU slice.
        mask: 2D 0/1 lung mask of the same shape.

    Returns:
        Array of shape (*hu.shape, 3), values in [0, 1].
    """
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(_windowed(hu)[..., None], 3, axis=-1)
    rgb[find_boundaries(mask > 0, mode="inner")] = OUTLINE_RGB
    return rgb


def views(volume: store.Volume) -> dict[str, tuple[np.ndarray, float]]:
    """Axial and coronal overlays through the lung centre, sagittal through the most lung.

    Returns:
        View name → (RGB image, pixel aspect height/width). Coronal and sagittal images have
        row 0 inferior (show them with origin="lower" so superior is up).
    """
    z, y, x = lung_centre(volume.lung_mask)
    # The centre of mass lies between the lungs: the sagittal view goes through the x with
    # the most lung instead.
    x = int(np.argmax(np.count_nonzero(volume.lung_mask, axis=(0, 1))))
    sz, sy, sx = volume.spacing
    hu, mask = volume.hu, volume.lung_mask
    return {
        "axial": (overlay(hu[z], mask[z]), sy / sx),
        "coronal": (overlay(hu[:, y, :], mask[:, y, :]), sz / sx),
        "sagittal": (overlay(hu[:, :, x], mask[:, :, x]), sz / sy),
    }


def write_patient_png(volume: store.Volume, path: str | os.PathLike) -> Path:
    """Write the three-view QC PNG of one volume; returns its path."""
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(12, 4.4), dpi=DPI)
    for axis, (name, (image, aspect)) in zip(
        figure.subplots(1, 3), views(volume).items(), strict=True
    ):
        axis.imshow(image, aspect=aspect, origin="upper" if name == "axial" else "lower")
        axis.set_title(name)
        axis.set_axis_off()
    shape = "×".join(str(n) for n in volume.hu.shape)
    spacing = "×".join(f"{s:g}" for s in volume.spacing)
    litres = float(volume.lung_mask.sum()) * float(np.prod(volume.spacing)) / 1e6
    figure.suptitle(
        f"{volume.patient_id}   shape {shape} (z, y, x)   spacing {spacing} mm   "
        f"lungs {litres:.2f} L"
    )
    figure.savefig(path)
    return path


def thumbnail(volume: store.Volume, size: int = TILE_PX) -> np.ndarray:
    """The axial overlay through the lung centre fitted into a size×size RGB tile (aspect kept)."""
    from skimage.transform import resize

    image, aspect = views(volume)["axial"]
    height, width = image.shape[0] * aspect, image.shape[1]
    scale = size / max(height, width)
    new_shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = resize(image, (*new_shape, 3), order=1, anti_aliasing=True)
    tile = np.zeros((size, size, 3), dtype=np.float32)
    top, left = (size - new_shape[0]) // 2, (size - new_shape[1]) // 2
    tile[top : top + new_shape[0], left : left + new_shape[1]] = small
    return tile


def write_contact_sheet(
    tiles: Mapping[str, np.ndarray | None],
    path: str | os.PathLike,
    failed: Mapping[str, str] | None = None,
) -> Path:
    """Write a grid of thumbnails, one per patient, each under its id; returns the path.

    Args:
        tiles: patient id → TILE_PX×TILE_PX RGB thumbnail, or None for a failed patient.
        path: PNG to write.
        failed: patient id → reason, printed on failed patients' (red) tiles.
    """
    from matplotlib.figure import Figure

    failed = failed or {}
    ids = sorted(tiles)
    columns = max(1, math.ceil(math.sqrt(len(ids))))
    rows = max(1, math.ceil(len(ids) / columns))
    cell_h, cell_w = TILE_PX + LABEL_PX, TILE_PX
    # One mosaic image and one imshow: hundreds of axes would be slow to draw.
    mosaic = np.ones((rows * cell_h, columns * cell_w, 3), dtype=np.float32)
    for index, patient_id in enumerate(ids):
        top, left = (index // columns) * cell_h + LABEL_PX, (index % columns) * cell_w
        tile = tiles[patient_id]
        mosaic[top : top + TILE_PX, left : left + TILE_PX] = FAILED_RGB if tile is None else tile
    figure = Figure(figsize=(mosaic.shape[1] / DPI, mosaic.shape[0] / DPI), dpi=DPI)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(mosaic, interpolation="nearest")
    axis.set_axis_off()
    for index, patient_id in enumerate(ids):
        top, left = (index // columns) * cell_h, (index % columns) * cell_w
        axis.text(left + 2, top + LABEL_PX - 3, patient_id[:LABEL_CHARS], fontsize=7)
        if tiles[patient_id] is None:
            reason = failed.get(patient_id, "")
            axis.text(left + 4, top + LABEL_PX + 20, "FAILED", color="white", fontsize=10,
                      fontweight="bold")
            for line, start in enumerate(range(0, min(len(reason), 4 * LABEL_CHARS), LABEL_CHARS)):
                axis.text(left + 4, top + LABEL_PX + 40 + 12 * line,
                          reason[start : start + LABEL_CHARS], color="white", fontsize=6)
    path = Path(path)
    figure.savefig(path, dpi=DPI)
    return path


def write_qc(
    volumes: Mapping[str, str | os.PathLike],
    failed: Mapping[str, str],
    qc_dir: str | os.PathLike,
) -> Path:
    """Write `qc_dir/<id>.png` for every volume file and `qc_dir/contact_sheet.png` for all.

    Args:
        volumes: patient id → volume file (`<id>.h5`).
        failed: patient id → one-line reason, for patients without a volume.
        qc_dir: folder for the PNGs (created if needed).

    Returns:
        The contact sheet's path.
    """
    qc_dir = Path(qc_dir)
    qc_dir.mkdir(parents=True, exist_ok=True)
    failed = dict(failed)
    tiles: dict[str, np.ndarray | None] = dict.fromkeys(failed)
    for patient_id, path in tqdm(volumes.items(), desc="QC", unit="patient", disable=None):
        try:
            volume = store.read_volume(path)
        except StoreError as error:
            logger.warning("QC of %s skipped: %s", patient_id, error)
            failed[patient_id], tiles[patient_id] = str(error), None
            continue
        write_patient_png(volume, qc_dir / f"{patient_id}.png")
        tiles[patient_id] = thumbnail(volume)
    return write_contact_sheet(tiles, qc_dir / CONTACT_SHEET_NAME, failed)
