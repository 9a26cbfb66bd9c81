"""QC images of preprocessed volumes: one PNG per patient and a paged contact sheet of the cohort.

The per-patient PNG has two rows. The first shows axial, coronal and sagittal slices through the
lung centre in a lung window with the lung mask outlined. The second shows the same three views,
zoomed, through the largest soft-tissue lesion inside the mask (`find_lesion`), outlined in a
second colour, with its volume and equivalent-sphere radius in the row title; or says that there
is none. The finder is a coarse pointer for eyes, not a nodule detector: where no nodule exists
it may point at a thick hilar vessel or a bifurcation.

The contact sheet tiles one axial thumbnail per patient under its id (failed patients in red with
their reason), at most `PAGE_TILES` per page, so a researcher can eyeball hundreds of scans in
minutes with ids that stay readable. Figures use matplotlib's object API with the Agg canvas (no
pyplot, no display), imported only when an image is drawn.

Speed: for a 300×300×300 volume at 1 mm (two lungs, crossing vessels, one nodule) the PNG and
the thumbnail take 0.5 s together, 0.2 s of it the lesion search (best of 5 on a 2-core
machine; 0.8 s median with the other core busy). The search runs on a copy strided to at most
`LESION_MAX_VOXELS` voxels (2 mm voxels here) and checks its largest candidates again at full
resolution around them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import textwrap
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb.io import volumes
from kdsb.io.atomic import save_figure
from kdsb.preprocessing.hu import LUNG_WINDOW_HU
from kdsb.preprocessing.lungs.thresholds import GROUND_GLASS_MAX_HU, MM3_PER_ML

logger = logging.getLogger(__name__)

OUTLINE_RGB = (1.0, 0.2, 0.2)  # mask outline colour
LESION_RGB = (1.0, 0.85, 0.0)  # lesion outline colour
FAILED_RGB = (0.45, 0.0, 0.0)  # background of a failed patient's tile
DPI = 100
PATIENT_FIGURE_INCHES = (12.0, 8.8)  # width, height of a patient's PNG (two rows of views)
ROW_LAYOUT = {"left": 0.01, "right": 0.99, "bottom": 0.01, "top": 0.82, "wspace": 0.04}
LESION_TITLE_COLOUR = "darkgoldenrod"  # the lesion row's title: LESION_RGB, readable on white

# The lesion finder: soft tissue (also the solid part of part-solid lesions) inside the lung
# mask, with structures thinner than the opening ball (vessels) removed.
LESION_HU = GROUND_GLASS_MAX_HU  # voxels above this are soft tissue, HU
VESSEL_RADIUS_MM = 3.0  # radius of the opening ball that removes vessels, mm
LESION_MAX_VOXELS = 4_000_000  # larger volumes are searched on a strided copy (for speed)
LESION_CANDIDATES = 10  # largest components of that search checked again at full resolution
LESION_FIELD_MM = 80.0  # smallest side of the zoomed lesion views, mm
LESION_FIELD_DIAMETERS = 3.0  # the zoomed views span at least this many lesion diameters
NO_LESION_TEXT = "no soft-tissue lesion inside the mask"
ML_PER_MM3 = 1.0 / MM3_PER_ML
LITRES_PER_MM3 = 1e-6

# The contact sheet. Text sizes are fixed in pixels (points at DPI), whatever the cohort size.
TILE_PX = 128  # thumbnail side, pixels
LABEL_PX = 16  # height of the id strip above each thumbnail, pixels
LABEL_FONT_PT = 8.0  # id font (monospace: 7 px a character at DPI)
LABEL_CHARS = 17  # longest id shown above a tile (119 px); longer ids lose their middle
REASON_FONT_PT = 6.0  # failure reason font (monospace: 5 px a character at DPI)
REASON_CHARS = 24  # characters per line of a failure reason (120 px)
REASON_LINES = 4  # lines of a failure reason shown on a tile
FAILED_FONT_PT = 10.0  # "FAILED" on a failed patient's tile
ELLIPSIS = "…"
PAGE_TILES = 100  # at most this many patients per contact sheet page (10 × 10)
CONTACT_SHEET_NAME = "contact_sheet.png"  # one page; more pages: contact_sheet_001.png, …


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


def _orthogonal_views(
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
    x = int(np.argmax(np.count_nonzero(volume.lung_mask, axis=(0, 1))))
    return _orthogonal_views(volume, (z, y, x))


@dataclass(frozen=True, eq=False)
class Lesion:
    """The largest soft-tissue lesion inside a lung mask.

    Attributes:
        centre: voxel index (z, y, x) of its centre of mass, fractional.
        volume_ml: its volume, ml.
        radius_mm: the radius of a sphere of the same volume, mm.
        mask: boolean array of the volume's shape (z, y, x), True inside the lesion.
    """

    centre: tuple[float, float, float]
    volume_ml: float
    radius_mm: float
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
    """The largest soft-tissue lesion inside the lung mask, vessels removed; None when none.

    Soft tissue is HU > `LESION_HU` inside `lung_mask`. A morphological opening by a ball of
    radius `VESSEL_RADIUS_MM` (in mm, so anisotropic voxels are handled) removes thinner
    structures (vessels, fissures, noise); the largest remaining connected component
    (26-connected) is the lesion.

    For speed the search runs on a copy strided (along the finest axes) to at most `max_voxels`
    voxels, a no-op for small volumes. Its largest `LESION_CANDIDATES` components are found again
    at full resolution around their place (strided openings let vessel crossings through), and
    the largest that survives is the lesion: its outline, volume and centre are those of the
    full-resolution rule.

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
    coarse_mm3 = np.bincount(labels.ravel())[1:] * math.prod(coarse_spacing)
    boxes = ndimage.find_objects(labels)
    best, best_mm3 = None, 0.0
    for index in np.argsort(-coarse_mm3, kind="stable")[:LESION_CANDIDATES]:
        # Strided volumes are close to full ones and rarely smaller: smaller ones cannot win.
        if coarse_mm3[index] <= best_mm3:
            break
        box = boxes[index]
        found = _at_full_resolution(
            hu, lung_mask, spacing, labels[box] == index + 1, box, strides
        )
        if found is not None and np.count_nonzero(found[0]) * math.prod(spacing) > best_mm3:
            best, best_mm3 = found, np.count_nonzero(found[0]) * math.prod(spacing)
    if best is None:
        return None
    lesion, region = best
    mask = np.zeros(hu.shape, dtype=bool)
    mask[region] = lesion
    centre = np.add(ndimage.center_of_mass(lesion), [r.start for r in region])
    return Lesion(
        centre=tuple(float(c) for c in centre),
        volume_ml=best_mm3 * ML_PER_MM3,
        radius_mm=(3.0 * best_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0),
        mask=mask,
    )


def lesion_views(volume: volumes.Volume, lesion: Lesion) -> dict[str, tuple[np.ndarray, float]]:
    """Zoomed axial, coronal and sagittal overlays through a lesion's centre, lesion outlined.

    The field of view is a box of side max(`LESION_FIELD_MM`, `LESION_FIELD_DIAMETERS` lesion
    diameters) around the centre, cut to the volume.

    Returns:
        View name → (RGB image, pixel aspect height/width), as `views`.
    """
    half_mm = max(LESION_FIELD_MM, LESION_FIELD_DIAMETERS * 2.0 * lesion.radius_mm) / 2.0
    point = tuple(int(round(c)) for c in lesion.centre)
    field = tuple(
        slice(max(0, p - round(half_mm / s)), min(n, p + round(half_mm / s) + 1))
        for p, s, n in zip(point, volume.spacing, volume.hu.shape, strict=True)
    )
    return _orthogonal_views(volume, point, lesion.mask, field)


def _draw_row(subfigure, row_views: Mapping[str, tuple[np.ndarray, float]]) -> None:
    axes = subfigure.subplots(1, len(row_views), gridspec_kw=ROW_LAYOUT)
    for axis, (name, (image, aspect)) in zip(axes, row_views.items(), strict=True):
        axis.imshow(image, aspect=aspect, origin="upper" if name == "axial" else "lower")
        axis.set_title(name)
        # No ticks at all: an axis turned off still lays out its ticks, a third of the time.
        axis.set(xticks=[], yticks=[])
        axis.set_axis_off()


def write_patient_png(volume: volumes.Volume, path: str | os.PathLike) -> Path:
    """Write the QC PNG of one volume; returns its path.

    Top row: axial, coronal and sagittal views through the lung centre (`views`) under the id,
    shape, spacing and lung volume. Bottom row: the same views, zoomed, through the largest
    soft tissue in the mask (`find_lesion`, `lesion_views`: a lesion, or a thick vessel, the hilum
    or mediastinum the mask took in) under its volume (ml), equivalent-sphere radius (mm) and
    centre voxel; or `NO_LESION_TEXT`. The image is `PATIENT_FIGURE_INCHES` ×
    `DPI` pixels.
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
            f"largest soft tissue in the mask: {lesion.volume_ml:.2f} ml, equivalent-sphere "
            f"radius {lesion.radius_mm:.1f} mm, centre voxel ({centre}) (z, y, x)\n"
            "a lesion, or a thick vessel, the hilum or mediastinum the mask took in",
            color=LESION_TITLE_COLOUR,
        )
        _draw_row(bottom, lesion_views(volume, lesion))
    return save_figure(figure, path)


def thumbnail(volume: volumes.Volume, size: int = TILE_PX) -> np.ndarray:
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


def short_id(patient_id: str, width: int = LABEL_CHARS) -> str:
    """`patient_id` cut to `width` characters by replacing its middle with an ellipsis.

    The end is kept longer than the start: it is the distinctive part of long ids such as
    LUNA16's 64-character series uids (`1.3.6.1.4.1.14519.5.2.1.6279.6001.…`).
    """
    if len(patient_id) <= width:
        return patient_id
    head = (width - len(ELLIPSIS)) // 3
    tail = width - len(ELLIPSIS) - head
    return f"{patient_id[:head]}{ELLIPSIS}{patient_id[-tail:]}"


def _page_paths(path: Path, pages: int) -> list[Path]:
    if pages == 1:
        return [path]
    digits = max(3, len(str(pages)))
    return [
        path.with_name(f"{path.stem}_{page:0{digits}d}{path.suffix}")
        for page in range(1, pages + 1)
    ]


def _remove_stale_pages(path: Path, keep: Sequence[Path]) -> None:
    """Delete `path` and its numbered pages (`<stem>_001<suffix>`, …) except those in `keep`."""
    numbered = re.compile(rf"{re.escape(path.stem)}_\d{{3,}}{re.escape(path.suffix)}")
    for candidate in path.parent.iterdir():
        stale = candidate == path or numbered.fullmatch(candidate.name) is not None
        if stale and candidate not in keep:
            candidate.unlink()


def _write_page(
    ids: Sequence[str],
    tiles: Mapping[str, np.ndarray | None],
    failed: Mapping[str, str],
    columns: int,
    path: Path,
) -> None:
    from matplotlib.figure import Figure

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
        axis.text(left + 2, top + LABEL_PX - 4, short_id(patient_id), fontsize=LABEL_FONT_PT,
                  family="monospace", parse_math=False)
        if tiles[patient_id] is None:
            axis.text(left + 4, top + LABEL_PX + 20, "FAILED", color="white",
                      fontsize=FAILED_FONT_PT, fontweight="bold")
            for line, text in enumerate(reason_lines(patient_id, failed.get(patient_id, ""))):
                axis.text(left + 4, top + LABEL_PX + 40 + 12 * line, text, color="white",
                          fontsize=REASON_FONT_PT, family="monospace", parse_math=False)
    save_figure(figure, path, dpi=DPI)


def reason_lines(patient_id: str, reason: str) -> list[str]:
    """A failure's reason for its tile: without the patient's id in front (the tile's label
    holds it), wrapped at words into at most `REASON_LINES` lines of `REASON_CHARS`, the last
    ending in "…" when cut."""
    for prefix in (f"patient {patient_id}: ", f"{patient_id}: "):
        reason = reason.removeprefix(prefix)
    lines = textwrap.wrap(reason, REASON_CHARS, break_long_words=True)
    if len(lines) > REASON_LINES:
        lines = lines[:REASON_LINES]
        lines[-1] = lines[-1][: REASON_CHARS - 1].rstrip() + "…"
    return lines


def write_contact_sheet(
    tiles: Mapping[str, np.ndarray | None],
    path: str | os.PathLike,
    failed: Mapping[str, str] | None = None,
    page_tiles: int = PAGE_TILES,
) -> list[Path]:
    """Write grids of thumbnails, one per patient under its id, `page_tiles` at most a page.

    One page is written to `path`; more are numbered beside it (`contact_sheet_001.png`,
    `contact_sheet_002.png`, …), patients in id order. Pages of an earlier run under either
    naming that this run does not write are deleted, so the folder holds one consistent set.
    Every page has the same number of columns (ceil(sqrt(tiles on a full page))).

    Args:
        tiles: patient id → TILE_PX×TILE_PX RGB thumbnail, or None for a failed patient.
        path: PNG to write when one page suffices; the name the pages are numbered after.
        failed: patient id → reason, printed on failed patients' (red) tiles.
        page_tiles: most patients on one page.

    Returns:
        The pages written, in order.
    """
    failed = failed or {}
    path = Path(path)
    ids = sorted(tiles)
    pages = max(1, math.ceil(len(ids) / page_tiles))
    columns = max(1, math.ceil(math.sqrt(min(len(ids), page_tiles))))
    paths = _page_paths(path, pages)
    _remove_stale_pages(path, paths)
    for page, page_path in enumerate(paths):
        page_ids = ids[page * page_tiles : (page + 1) * page_tiles]
        _write_page(page_ids, tiles, failed, columns, page_path)
    return paths


def write_qc(
    volume_files: Mapping[str, str | os.PathLike],
    failed: Mapping[str, str],
    qc_dir: str | os.PathLike,
) -> list[Path]:
    """Write `qc_dir/<id>.png` for every volume file and the contact sheet page(s) for all.

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
        try:
            volume = volumes.read_volume(path)
            write_patient_png(volume, qc_dir / f"{patient_id}.png")
            tiles[patient_id] = thumbnail(volume)
        except Exception as error:  # noqa: BLE001 - one patient's QC, never the cohort's
            # Found in review: anything but a StoreError (memory for one large scan, a plotting
            # error) ended the QC of every patient after the whole preprocessing, exit 1.
            reason = " ".join(str(error).split()) or type(error).__name__
            logger.warning("QC of %s skipped: %s", patient_id, reason)
            failed[patient_id], tiles[patient_id] = f"QC failed: {reason}", None
            (qc_dir / f"{patient_id}.png").unlink(missing_ok=True)  # an earlier run's, or half
    return write_contact_sheet(tiles, _sheet_path(qc_dir, tiles), failed)


def _sheet_path(qc_dir: Path, ids: Collection[str]) -> Path:
    """`qc_dir / CONTACT_SHEET_NAME`, unless a patient's PNG would share a page's name (an id
    `contact_sheet` or `contact_sheet_001`): the sheet then takes a name no id has, with a
    warning (found in review: the sheet overwrote that patient's image, or deleted it as a
    stale page)."""
    path = qc_dir / CONTACT_SHEET_NAME
    pages = re.compile(rf"(_*{re.escape(path.stem)})(_\d{{3,}})?")
    taken = {match.group(1) for i in ids if (match := pages.fullmatch(i))}
    stem = path.stem
    if stem not in taken:
        return path
    while stem in taken:
        stem = "_" + stem
    logger.warning("patient id(s) %s share the contact sheet's name: the sheet is %s%s",
                   ", ".join(sorted(i for i in ids if pages.fullmatch(i))), stem, path.suffix)
    return path.with_name(stem + path.suffix)
