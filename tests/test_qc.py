"""QC images: per-patient three-view PNGs and the cohort contact sheet."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from kdsb import qc, store


def _volume(patient_id: str = "p1", shape=(40, 50, 100)) -> store.Volume:
    """Two box 'lungs' of -850 HU in 40 HU tissue; the left box is larger."""
    hu = np.full(shape, 40, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[10:30, 10:40, 10:40] = 1
    mask[10:30, 10:40, 55:95] = 1
    hu[mask == 1] = -850
    return store.Volume(patient_id, hu, mask, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def test_lung_centre_is_the_centre_of_mass_or_the_array_centre():
    mask = np.zeros((10, 20, 30), dtype=np.uint8)
    assert qc.lung_centre(mask) == (5, 10, 15)
    mask[2:5, 4:9, 10:21] = 1
    assert qc.lung_centre(mask) == (3, 6, 15)


def test_overlay_windows_hu_and_outlines_the_mask():
    hu = np.array([[-1000, -300, 400, 1000]] * 4, dtype=np.int16)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    rgb = qc.overlay(hu, mask)
    assert rgb.shape == (4, 4, 3)
    low, high = qc.WINDOW_HU
    np.testing.assert_allclose(rgb[0, :, 0], [0.0, (-300 - low) / (high - low), 1.0, 1.0])
    mask[1:3, 1:3] = 1
    rgb = qc.overlay(hu, mask)
    np.testing.assert_allclose(rgb[1, 1], qc.OUTLINE_RGB)
    np.testing.assert_allclose(rgb[0, 0], [0.0, 0.0, 0.0])


def test_views_cut_through_the_lungs():
    volume = _volume()
    views = qc.views(volume)
    assert views["axial"][0].shape == (50, 100, 3)
    assert views["coronal"][0].shape == (40, 100, 3)
    assert views["sagittal"][0].shape == (40, 50, 3)
    assert views["coronal"][1] == 2.0 and views["axial"][1] == 1.0
    # The sagittal view goes through lung (the larger box), not the tissue between the boxes.
    sagittal = views["sagittal"][0]
    assert sagittal[20, 25, 0] < 0.2


def test_write_patient_png(tmp_path):
    path = qc.write_patient_png(_volume(), tmp_path / "p1.png")
    image = imread(path)
    assert image.shape[:2] == (440, 1200)


def test_thumbnail_keeps_the_aspect_ratio():
    tile = qc.thumbnail(_volume(), size=64)
    assert tile.shape == (64, 64, 3)
    rows_used = np.flatnonzero(tile.max(axis=(1, 2)) > 0)
    assert len(rows_used) == 32  # 50 × 100 mm fitted into 64 px: 32 rows


def test_contact_sheet_marks_failed_patients(tmp_path):
    tiles = {
        "a": np.full((qc.TILE_PX, qc.TILE_PX, 3), 0.5, dtype=np.float32),
        "b": None,
        "c": np.full((qc.TILE_PX, qc.TILE_PX, 3), 0.5, dtype=np.float32),
    }
    path = qc.write_contact_sheet(tiles, tmp_path / "sheet.png", {"b": "b: no lungs"})
    image = imread(path)[..., :3]
    cell = qc.TILE_PX + qc.LABEL_PX
    assert image.shape[:2] == (2 * cell, 2 * qc.TILE_PX)  # 3 patients: a 2 × 2 grid
    # Bottom-right pixel of each tile (free of text): grey for a, red for failed b.
    corner = cell - 2
    np.testing.assert_allclose(image[corner, qc.TILE_PX - 2], 0.5, atol=0.01)
    np.testing.assert_allclose(image[corner, 2 * qc.TILE_PX - 2], qc.FAILED_RGB, atol=0.01)


@pytest.mark.parametrize("corrupt", [False, True])
def test_write_qc_writes_every_png(tmp_path, corrupt):
    volumes = {}
    for pid in ("p1", "p2"):
        volume = _volume(pid)
        volumes[pid] = store.write_volume(
            tmp_path / f"{pid}.h5", volume.hu, volume.lung_mask, volume.spacing, volume.origin
        )
    if corrupt:
        volumes["p2"].write_bytes(b"not hdf5")
    sheet = qc.write_qc(volumes, {"p3": "p3: not DICOM"}, tmp_path / "qc")
    assert sheet == tmp_path / "qc" / qc.CONTACT_SHEET_NAME
    written = {p.name for p in (tmp_path / "qc").iterdir()}
    expected = {"p1.png", qc.CONTACT_SHEET_NAME} | (set() if corrupt else {"p2.png"})
    assert written == expected
