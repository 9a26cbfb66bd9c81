"""The cohort's contact sheet: one axial thumbnail per patient under its id (failed patients in
red with their reason), at most `PAGE_TILES` a page, text sizes fixed in pixels so that ids stay
readable for hundreds of patients."""

from __future__ import annotations

import logging
import math
import os
import re
import textwrap
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from kdsb.io import volumes
from kdsb.io.atomic import save_figure
from kdsb.preprocessing.qc.overlays import DPI, views

logger = logging.getLogger(__name__)

FAILED_RGB = (0.45, 0.0, 0.0)  # background of a failed patient's tile
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


def sheet_path(qc_dir: Path, ids: Collection[str]) -> Path:
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
