"""QC images of preprocessed volumes: one PNG per patient and a paged contact sheet of the cohort.

The per-patient PNG has two rows. The first shows axial and coronal slices through the lung
centre and a sagittal one through the column with the most lung, in a lung window with the lung
mask outlined. The second shows the same three views,
zoomed, through the most lesion-like soft tissue inside the mask (`find_lesion`: large and
compact, so a nodule outranks a longer tube of aorta the mask took in), outlined in a second
colour, with its volume, equivalent-sphere radius and elongation in the row title; or says that
there is none. The finder is a coarse pointer for eyes, not a nodule detector: where no nodule
exists it may point at a thick hilar vessel, a bifurcation or the aorta.

The contact sheet tiles one axial thumbnail per patient under its id (failed patients in red with
their reason), at most `sheet.PAGE_TILES` per page, so a researcher can eyeball hundreds of scans in
minutes with ids that stay readable. Figures use matplotlib's object API with the Agg canvas (no
pyplot, no display), imported only when an image is drawn.

Speed: for a real chest CT at 1 mm (277×208×304, an implanted cancer; `benchmarks/qc_lesion.py`)
the PNG and the thumbnail take 0.5 s together, 0.2 s of it the lesion search (best of 5 on a
2-core AMD EPYC machine, 2026-12-05; the search: `lesion`).

The parts: `overlays` (overlays and the three views), `lesion` (the lesion finder), `sheet` (the
contact sheet).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb.errors import one_line
from kdsb.io import volumes
from kdsb.io.atomic import save_figure
from kdsb.preprocessing.qc.lesion import find_lesion, lesion_views
from kdsb.preprocessing.qc.overlays import DPI, views
from kdsb.preprocessing.qc.sheet import sheet_path, thumbnail, write_contact_sheet

logger = logging.getLogger(__name__)

PATIENT_FIGURE_INCHES = (12.0, 8.8)  # width, height of a patient's PNG (two rows of views)
ROW_LAYOUT = {"left": 0.01, "right": 0.99, "bottom": 0.01, "top": 0.82, "wspace": 0.04}
LESION_TITLE_COLOUR = "darkgoldenrod"  # the lesion row's title: LESION_RGB, readable on white
NO_LESION_TEXT = "no soft-tissue lesion inside the mask"
LITRES_PER_MM3 = 1e-6


def _draw_row(subfigure, row_views: Mapping[str, tuple[np.ndarray, float]]) -> None:
    axes = subfigure.subplots(1, len(row_views), gridspec_kw=ROW_LAYOUT)
    for axis, (name, (image, aspect)) in zip(axes, row_views.items(), strict=True):
        axis.imshow(image, aspect=aspect, origin="upper" if name == "axial" else "lower")
        axis.set_title(name)
        # No ticks at all: an axis turned off still lays out its ticks, a third of the time.
        axis.set(xticks=[], yticks=[])
        axis.set_axis_off()


def write_patient_png(volume: volumes.Volume, path: str | os.PathLike,
                      drawn_from: str | None = None) -> Path:
    """Write the QC PNG of one volume; returns its path. `drawn_from` is kept in the PNG's
    `DRAWN_FROM_KEY` text (`volume_version`).

    Top row: axial and coronal views through the lung centre, sagittal through the most lung
    (`views`), under the id, shape, spacing and lung volume. Bottom row: the same views,
    zoomed, through the most lesion-like soft tissue in the mask (`find_lesion`,
    `lesion_views`: a lesion, or a thick vessel, the hilum or mediastinum the mask took in)
    under its volume (ml), equivalent-sphere radius (mm), elongation and centre voxel; or
    `NO_LESION_TEXT`. The image is `PATIENT_FIGURE_INCHES` × `DPI` pixels.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=PATIENT_FIGURE_INCHES, dpi=DPI)
    top, bottom = figure.subfigures(2, 1)
    shape = "×".join(str(n) for n in volume.hu.shape)
    spacing = "×".join(f"{s:g}" for s in volume.spacing)
    litres = float(volume.lung_mask.sum()) * math.prod(volume.spacing) * LITRES_PER_MM3
    top.suptitle(
        f"{volume.patient_id}\nlung centre   shape {shape} (z, y, x)   spacing {spacing} mm   "
        f"lungs {litres:.2f} L", parse_math=False,  # ids and paths may hold "$"
    )
    _draw_row(top, views(volume))
    lesion = find_lesion(volume.hu, volume.lung_mask, volume.spacing)
    if lesion is None:
        bottom.text(0.5, 0.5, NO_LESION_TEXT, ha="center", va="center", fontsize="large")
    else:
        centre = ", ".join(f"{c:.0f}" for c in lesion.centre)
        bottom.suptitle(
            f"most lesion-like soft tissue in the mask: {lesion.volume_ml:.2f} ml, "
            f"equivalent-sphere radius {lesion.radius_mm:.1f} mm, elongation "
            f"{lesion.elongation:.1f}, centre voxel ({centre}) (z, y, x)\n"
            "a lesion, or a thick vessel, the hilum or mediastinum the mask took in",
            color=LESION_TITLE_COLOUR,
        )
        _draw_row(bottom, lesion_views(volume, lesion))
    metadata = None if drawn_from is None else {DRAWN_FROM_KEY: drawn_from}
    return save_figure(figure, path, metadata=metadata)


DRAWN_FROM_KEY = "kdsb volume"  # a QC PNG's text: the volume file it shows (`volume_version`)


def volume_version(volume_file: str | os.PathLike) -> str:
    """A volume file as written: its real path and `journal.volume_stamp` (size, time, inode)."""
    from kdsb.io.journal import volume_stamp

    return f"{os.path.realpath(volume_file)} {volume_stamp(volume_file)}"


def drawn_since(png: Path, volume_file: str | os.PathLike) -> bool:
    """Whether a patient's QC image was drawn from this very volume file as it is now (the
    `volume_version` in its text): kept by a rerun (found by a user's trial: a rerun that
    skipped every patient drew every image again, about a second each). Not by file times:
    found in review, another OUT_DIR's image of the same id in a shared --qc folder, or clocks
    of two disks apart, would have been kept."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(png) as image:
            return image.text.get(DRAWN_FROM_KEY) == volume_version(volume_file)
    except (OSError, UnidentifiedImageError, AttributeError):
        return False


def write_qc(
    volume_files: Mapping[str, str | os.PathLike],
    failed: Mapping[str, str],
    qc_dir: str | os.PathLike,
) -> list[Path]:
    """Write `qc_dir/<id>.png` for every volume file (but those `drawn_since` it was written)
    and the contact sheet page(s) for all.

    Args:
        volume_files: patient id → volume file (`<id>.h5`).
        failed: patient id → one-line reason, for patients without a volume (an image of an
            earlier run left for one is removed).
        qc_dir: folder for the PNGs (created if needed).

    Returns:
        The contact sheet pages (`write_contact_sheet`).
    """
    qc_dir = Path(qc_dir)
    qc_dir.mkdir(parents=True, exist_ok=True)
    failed = dict(failed)
    for patient_id in failed:  # an earlier run's image of a volume that is gone
        (qc_dir / f"{patient_id}.png").unlink(missing_ok=True)
    tiles: dict[str, np.ndarray | None] = dict.fromkeys(failed)
    for patient_id, path in tqdm(volume_files.items(), desc="QC", unit="patient", disable=None):
        png = qc_dir / f"{patient_id}.png"
        try:
            volume = volumes.read_volume(path)
            if not drawn_since(png, path):
                write_patient_png(volume, png, volume_version(path))
            tiles[patient_id] = thumbnail(volume)
        except Exception as error:  # noqa: BLE001 - one patient's QC, never the cohort's
            # Found in review: anything but a StoreError (memory for one large scan, a plotting
            # error) ended the QC of every patient after the whole preprocessing, exit 1.
            reason = one_line(error) or type(error).__name__
            logger.warning("QC of %s skipped: %s", patient_id, reason)
            failed[patient_id], tiles[patient_id] = f"QC failed: {reason}", None
            png.unlink(missing_ok=True)  # an earlier run's, or half
    return write_contact_sheet(tiles, sheet_path(qc_dir, tiles), failed)
