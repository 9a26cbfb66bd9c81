"""QC images: per-patient PNGs (lung centre and largest lesion) and the paged contact sheet."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage

from kdsb.hu import LUNG_WINDOW_HU, PARENCHYMA_HU
from kdsb.io import volumes
from kdsb.preprocessing import qc

VESSEL_HU, LESION_HU, BODY_HU = 40, 30, 40
SPHERE_CENTRE_MM = (32.0, 30.0, 36.0)  # z, y, x
SPHERE_RADIUS_MM = 8.0
LUNA16_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"


def _volume(patient_id: str = "p1", shape=(40, 50, 100)) -> volumes.Volume:
    """Two box 'lungs' of -850 HU in 40 HU tissue; the left box is larger."""
    hu = np.full(shape, 40, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[10:30, 10:40, 10:40] = 1
    mask[10:30, 10:40, 55:95] = 1
    hu[mask == 1] = -850
    return volumes.Volume(patient_id, hu, mask, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def test_lung_centre_is_the_centre_of_mass_or_the_array_centre():
    mask = np.zeros((10, 20, 30), dtype=np.uint8)
    assert qc.overlays.lung_centre(mask) == (5, 10, 15)
    mask[2:5, 4:9, 10:21] = 1
    assert qc.overlays.lung_centre(mask) == (3, 6, 15)


def test_overlay_windows_hu_and_outlines_the_mask():
    hu = np.array([[-1000, -300, 400, 1000]] * 4, dtype=np.int16)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    rgb = qc.overlays.overlay(hu, mask)
    assert rgb.shape == (4, 4, 3)
    low, high = LUNG_WINDOW_HU
    np.testing.assert_allclose(rgb[0, :, 0], [0.0, (-300 - low) / (high - low), 1.0, 1.0])
    mask[1:3, 1:3] = 1
    rgb = qc.overlays.overlay(hu, mask)
    np.testing.assert_allclose(rgb[1, 1], qc.overlays.OUTLINE_RGB)
    np.testing.assert_allclose(rgb[0, 0], [0.0, 0.0, 0.0])


def test_views_cut_through_the_lungs():
    volume = _volume()
    views = qc.overlays.views(volume)
    assert views["axial"][0].shape == (50, 100, 3)
    assert views["coronal"][0].shape == (40, 100, 3)
    assert views["sagittal"][0].shape == (40, 50, 3)
    assert views["coronal"][1] == 2.0 and views["axial"][1] == 1.0
    # The sagittal view goes through lung (the larger box), not the tissue between the boxes.
    sagittal = views["sagittal"][0]
    assert sagittal[20, 25, 0] < 0.2


def test_views_of_an_empty_mask_cut_through_the_middle():
    """Found in review: with no lung the sagittal view took the edge column (argmax of zeros);
    it falls back to the middle, as the other two views do."""
    volume = _volume()
    volume.lung_mask[...] = 0
    hu = volume.hu.copy()
    hu[:, :, 50] = 1000  # the middle column stands out in the sagittal view
    volume = volumes.Volume("empty", hu, volume.lung_mask, volume.spacing, volume.origin)
    sagittal = qc.overlays.views(volume)["sagittal"][0]
    assert np.allclose(sagittal, 1.0)


def _lesion_phantom(spacing=(1.0, 1.0, 1.0), sphere: bool = True) -> volumes.Volume:
    """A 64 mm cube: a box of -850 HU lung in 40 HU tissue, a tree of thin vessels, a sphere.

    Vessels (+40 HU, radius 2 mm, one of 1.5 mm running into the sphere) form one connected tree
    larger than the sphere (+30 HU, radius 8 mm), so only the vessel-removing opening makes the
    sphere the largest soft-tissue component.
    """
    shape = tuple(round(64 / s) for s in spacing)
    z, y, x = (np.indices(shape).astype(np.float64).T * spacing).T  # voxel centres, mm
    mask = ((np.abs(z - 32) < 28) & (np.abs(y - 32) < 28) & (np.abs(x - 32) < 28)).astype(np.uint8)
    hu = np.where(mask == 1, PARENCHYMA_HU, BODY_HU).astype(np.int16)
    vessels = np.zeros(shape, dtype=bool)
    for y0, x0 in ((12, 12), (12, 52), (52, 12), (52, 52)):  # along z
        vessels |= (y - y0) ** 2 + (x - x0) ** 2 <= 2.0**2
    for z0, y0 in ((12, 12), (52, 52)):  # along x, joining them in pairs
        vessels |= (z - z0) ** 2 + (y - y0) ** 2 <= 2.0**2
    vessels |= (z - 20) ** 2 + (x - 12) ** 2 <= 2.0**2  # along y, joining the pairs
    vessels |= (z - 32) ** 2 + (y - 30) ** 2 <= 1.5**2  # along x, through the sphere
    hu[vessels & (mask == 1)] = VESSEL_HU
    if sphere:
        cz, cy, cx = SPHERE_CENTRE_MM
        hu[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= SPHERE_RADIUS_MM**2] = LESION_HU
    return volumes.Volume("lesion", hu, mask, tuple(spacing), (0.0, 0.0, 0.0))


def test_the_vessel_tree_outweighs_the_sphere_before_the_opening():
    volume = _lesion_phantom()
    soft = (volume.hu > qc.lesion.LESION_HU) & (volume.lung_mask > 0)
    labels, _ = ndimage.label(soft, structure=np.ones((3, 3, 3)))
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    centre_voxel = tuple(round(c) for c in SPHERE_CENTRE_MM)
    assert labels[centre_voxel] != largest  # without the opening the vessels would win


@pytest.mark.parametrize(
    ("spacing", "max_voxels"),
    [
        ((1.0, 1.0, 1.0), qc.lesion.LESION_MAX_VOXELS),  # searched at full resolution
        ((1.0, 1.0, 1.0), 40_000),  # searched on a copy strided 2 × 2 × 2
        ((2.0, 1.0, 1.0), qc.lesion.LESION_MAX_VOXELS),  # anisotropic voxels: the ball is in mm
    ],
)
def test_find_lesion_picks_the_sphere_not_the_vessels(spacing, max_voxels):
    volume = _lesion_phantom(spacing)
    lesion = qc.lesion.find_lesion(volume.hu, volume.lung_mask, volume.spacing,
                                   max_voxels=max_voxels)
    assert lesion is not None
    expected_voxel = np.divide(SPHERE_CENTRE_MM, spacing)
    assert np.abs(np.subtract(lesion.centre, expected_voxel)).max() <= 1.0
    sphere_ml = 4.0 / 3.0 * math.pi * SPHERE_RADIUS_MM**3 * qc.lesion.ML_PER_MM3
    assert lesion.volume_ml == pytest.approx(sphere_ml, rel=0.15)
    assert lesion.radius_mm == pytest.approx(SPHERE_RADIUS_MM, rel=0.05)
    assert lesion.mask.shape == volume.hu.shape
    ml = lesion.mask.sum() * np.prod(spacing) * qc.lesion.ML_PER_MM3
    assert ml == pytest.approx(lesion.volume_ml)
    far_vessel = tuple(round(c / s) for c, s in zip((32.0, 12.0, 12.0), spacing, strict=True))
    assert volume.hu[far_vessel] == VESSEL_HU and not lesion.mask[far_vessel]


@pytest.mark.parametrize("max_voxels", [qc.lesion.LESION_MAX_VOXELS, 40_000])
def test_find_lesion_finds_nothing_in_a_lung_with_vessels_only(max_voxels):
    volume = _lesion_phantom(sphere=False)
    assert qc.lesion.find_lesion(volume.hu, volume.lung_mask, volume.spacing, max_voxels) is None


def test_elongation_is_one_for_a_ball_and_the_axes_ratio_for_a_tube():
    spacing = (2.0, 1.0, 1.0)
    z, y, x = (np.indices((40, 80, 80)).T * np.asarray(spacing)).T  # mm
    ball = (z - 40) ** 2 + (y - 40) ** 2 + (x - 40) ** 2 <= 15.0**2
    assert qc.lesion.elongation(ball, spacing) == pytest.approx(1.0, abs=0.05)
    # A tube of radius 5 mm and length 60 mm along x: sd 60/√12 along it, 5/2 across it.
    tube = ((z - 40) ** 2 + (y - 40) ** 2 <= 5.0**2) & (np.abs(x - 40) < 30)
    expected = (60 / math.sqrt(12)) / (5 / 2)
    assert qc.lesion.elongation(tube, spacing) == pytest.approx(expected, rel=0.1)
    assert qc.lesion.elongation(ball & (z == 40), spacing) < math.inf  # a flat disc stays finite


@pytest.mark.parametrize("max_voxels", [qc.lesion.LESION_MAX_VOXELS, 40_000])
def test_find_lesion_prefers_a_compact_blob_to_a_larger_tube(max_voxels):
    """A thick tube (radius 5 mm, 56 mm long, ~4.4 ml: the aorta a real mask takes in) beside
    the 8 mm sphere (2.1 ml): the sphere is the lesion, though the tube is the larger."""
    volume = _lesion_phantom()
    z, y, x = (np.indices(volume.hu.shape).T * np.asarray(volume.spacing)).T
    tube = ((z - 52) ** 2 + (y - 52) ** 2 <= 5.0**2) & (np.abs(x - 32) < 28)
    volume.hu[tube & (volume.lung_mask > 0)] = VESSEL_HU
    tube_ml = np.count_nonzero(tube & (volume.lung_mask > 0)) * qc.lesion.ML_PER_MM3
    sphere_ml = 4.0 / 3.0 * math.pi * SPHERE_RADIUS_MM**3 * qc.lesion.ML_PER_MM3
    assert tube_ml > 1.5 * sphere_ml
    lesion = qc.lesion.find_lesion(volume.hu, volume.lung_mask, volume.spacing, max_voxels)
    assert lesion is not None
    assert np.abs(np.subtract(lesion.centre, SPHERE_CENTRE_MM)).max() <= 1.0
    assert lesion.elongation < 1.2
    assert not lesion.mask[tube].any()


def _lesion_pixels(path) -> int:
    image = imread(path)[..., :3]
    return int(np.count_nonzero(np.all(np.abs(image - qc.overlays.LESION_RGB) < 0.02, axis=-1)))


@pytest.mark.parametrize("sphere", [True, False])
def test_write_patient_png(tmp_path, sphere):
    path = qc.write_patient_png(_lesion_phantom(sphere=sphere), tmp_path / "p1.png")
    image = imread(path)
    width, height = qc.PATIENT_FIGURE_INCHES
    assert image.shape[:2] == (round(height * qc.overlays.DPI), round(width * qc.overlays.DPI))
    rgb = image[..., :3]
    top = rgb[: rgb.shape[0] // 2]
    # The lung mask (a 56 mm box) is outlined in the three lung-centre views of the top row.
    outline = np.all(np.abs(top - qc.overlays.OUTLINE_RGB) < 0.02, axis=-1)
    assert np.count_nonzero(outline) > 3 * 4 * 56
    # The lung window shows lung (-850 HU) dark and tissue (40 HU) light grey in that row.
    grey = top[(np.ptp(top, axis=-1) < 0.01)].mean(axis=-1)
    assert np.count_nonzero(grey < 0.2) > 3 * 40**2
    assert np.count_nonzero((grey > 0.6) & (grey < 0.9)) > 3 * 10**2
    # The lesion is outlined in its colour in the three lesion views (bottom row only);
    # nothing when there is none.
    assert (_lesion_pixels(path) > 3 * 2 * math.pi * SPHERE_RADIUS_MM) == sphere
    assert _lesion_pixels(path) == 0 or sphere
    lesion = np.all(np.abs(top - qc.overlays.LESION_RGB) < 0.02, axis=-1)
    assert not lesion.any()


@pytest.mark.parametrize(("radius_mm", "side_mm"),
                         [(5.0, qc.lesion.LESION_FIELD_MM), (20.0, 120.0)])
def test_lesion_views_zoom_on_the_lesion(radius_mm, side_mm):
    shape, spacing = (100, 160, 160), (2.0, 1.0, 1.0)
    z, y, x = (np.indices(shape).T * spacing).T
    ball = (z - 100) ** 2 + (y - 80) ** 2 + (x - 80) ** 2 <= radius_mm**2
    hu = np.where(ball, LESION_HU, PARENCHYMA_HU).astype(np.int16)
    volume = volumes.Volume("p", hu, np.ones(shape, np.uint8), spacing, (0.0, 0.0, 0.0))
    lesion = qc.lesion.Lesion((50.0, 80.0, 80.0), 1.0, radius_mm, 1.0, ball)
    views = qc.lesion.lesion_views(volume, lesion)
    # A box of side max(80 mm, 3 diameters) around the centre: (side / spacing + 1) pixels.
    width = round(side_mm) + 1
    height = round(side_mm / 2) + 1
    assert views["axial"][0].shape == (width, width, 3)
    assert views["coronal"][0].shape == (height, width, 3)
    assert views["sagittal"][1] == 2.0
    # The lesion is outlined in its colour across the middle row of the axial view.
    middle = views["axial"][0][width // 2]
    outlined = np.flatnonzero(np.all(np.isclose(middle, qc.overlays.LESION_RGB), axis=-1))
    assert outlined.tolist() == [width // 2 - round(radius_mm), width // 2 + round(radius_mm)]


def test_short_id_keeps_short_ids_and_the_end_of_long_ones():
    assert qc.sheet.short_id("LIDC-IDRI-0001") == "LIDC-IDRI-0001"
    short = qc.sheet.short_id(LUNA16_UID)
    assert len(LUNA16_UID) == 64 and len(short) == qc.sheet.LABEL_CHARS
    assert qc.sheet.ELLIPSIS in short
    head, tail = short.split(qc.sheet.ELLIPSIS)
    assert LUNA16_UID.startswith(head) and LUNA16_UID.endswith(tail)
    assert len(tail) > len(head) and tail.endswith("836860")


def _grey_tile() -> np.ndarray:
    return np.full((qc.sheet.TILE_PX, qc.sheet.TILE_PX, 3), 0.5, dtype=np.float32)


def test_contact_sheet_marks_failed_patients(tmp_path):
    tiles = {"a": _grey_tile(), "b": None, "c": _grey_tile()}
    paths = qc.sheet.write_contact_sheet(tiles, tmp_path / "sheet.png", {"b": "b: no lungs"})
    assert paths == [tmp_path / "sheet.png"]
    image = imread(paths[0])[..., :3]
    cell = qc.sheet.TILE_PX + qc.sheet.LABEL_PX
    assert image.shape[:2] == (2 * cell, 2 * qc.sheet.TILE_PX)  # 3 patients: a 2 × 2 grid
    # Bottom-right pixel of each tile (free of text): grey for a, red for failed b.
    corner = cell - 2
    np.testing.assert_allclose(image[corner, qc.sheet.TILE_PX - 2], 0.5, atol=0.01)
    np.testing.assert_allclose(image[corner, 2 * qc.sheet.TILE_PX - 2], qc.sheet.FAILED_RGB,
                               atol=0.01)


def test_contact_sheet_pages_and_removes_stale_pages(tmp_path):
    tile = _grey_tile()
    cell = qc.sheet.TILE_PX + qc.sheet.LABEL_PX
    (tmp_path / "p1.png").write_bytes(b"a patient image, not a page")
    paths = qc.sheet.write_contact_sheet(
        {f"{LUNA16_UID[:-3]}{i:03d}": tile for i in range(250)}, tmp_path / "contact_sheet.png"
    )
    names = ["contact_sheet_001.png", "contact_sheet_002.png", "contact_sheet_003.png"]
    assert paths == [tmp_path / name for name in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "p1.png"])
    # Full pages are 10 × 10 tiles; the last holds 50 in 5 rows of the same 10 columns.
    columns = math.isqrt(qc.sheet.PAGE_TILES)
    assert imread(paths[0]).shape[:2] == (columns * cell, columns * qc.sheet.TILE_PX)
    assert imread(paths[2]).shape[:2] == (5 * cell, columns * qc.sheet.TILE_PX)

    paths = qc.sheet.write_contact_sheet({f"p{i:03d}": tile for i in range(120)}, paths[0].parent /
                                         "contact_sheet.png")
    assert [p.name for p in paths] == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[:2], "p1.png"])

    paths = qc.sheet.write_contact_sheet({f"p{i:03d}": tile for i in range(50)},
                                         tmp_path / "contact_sheet.png")
    assert paths == [tmp_path / "contact_sheet.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contact_sheet.png", "p1.png"]
    # One page of 50: 8 columns, 7 rows, the same cell size as on a full page.
    assert imread(paths[0]).shape[:2] == (7 * cell, 8 * qc.sheet.TILE_PX)

    paths = qc.sheet.write_contact_sheet({f"p{i:03d}": tile for i in range(101)},
                                         tmp_path / "contact_sheet.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[:2], "p1.png"])


@pytest.mark.parametrize("corrupt", [False, True, "plot error"])
def test_write_qc_writes_every_png(tmp_path, corrupt, caplog, monkeypatch):
    """A patient whose QC fails (an unreadable file; found in review: any other error, too,
    ended the QC of the whole cohort) is shown failed, the others drawn."""
    if corrupt == "plot error":
        draw = qc.write_patient_png

        def fails_for_p2(volume, path, *args):
            if path.stem == "p2":
                raise ValueError("a plotting error")
            return draw(volume, path, *args)

        monkeypatch.setattr(qc, "write_patient_png", fails_for_p2)
    volume_files = {}
    for pid in ("p1", "p2"):
        volume = _volume(pid)
        volume_files[pid] = volumes.write_volume(
            tmp_path / f"{pid}.h5", volume.hu, volume.lung_mask, volume.spacing, volume.origin
        )
    if corrupt is True:
        volume_files["p2"].write_bytes(b"not hdf5")
    (tmp_path / "qc").mkdir()
    (tmp_path / "qc" / "p3.png").write_bytes(b"an earlier run's image of p3")  # p3 fails now
    (tmp_path / "qc" / "p2.png").write_bytes(b"an earlier run's image of p2")  # gone if p2 fails
    with caplog.at_level(logging.WARNING, logger="kdsb.preprocessing.qc"):
        sheets = qc.write_qc(volume_files, {"p3": "p3: not DICOM"}, tmp_path / "qc")
    assert sheets == [tmp_path / "qc" / qc.sheet.CONTACT_SHEET_NAME]
    written = {p.name for p in (tmp_path / "qc").iterdir()}
    expected = {"p1.png", qc.sheet.CONTACT_SHEET_NAME} | (set() if corrupt else {"p2.png"})
    assert written == expected
    assert ("QC of p2 skipped" in caplog.text and "p2.h5" in caplog.text) == (corrupt is True)
    assert ("QC of p2 skipped: a plotting error" in caplog.text) == (corrupt == "plot error")
    if corrupt is False:  # drawn from these very volumes: kept on a rerun, the sheet anew
        images = {p: (tmp_path / "qc" / p).stat().st_mtime_ns for p in ("p1.png", "p2.png")}
        draw = qc.write_patient_png
        monkeypatch.setattr(qc, "write_patient_png", lambda *a: pytest.fail("drawn again"))
        assert qc.write_qc(volume_files, {}, tmp_path / "qc") == sheets
        assert {p: (tmp_path / "qc" / p).stat().st_mtime_ns for p in images} == images
        # Another OUT_DIR's volume of p1 (a shared --qc folder), written before the image:
        # drawn again all the same (found in review: file times alone kept the image).
        other = tmp_path / "other" / "p1.h5"
        other.parent.mkdir()
        other.write_bytes(volume_files["p1"].read_bytes())
        os.utime(other, ns=(1, 1))
        drawn = []
        monkeypatch.setattr(qc, "write_patient_png", lambda v, path, *a: drawn.append(path.name)
                            or draw(v, path, *a))
        qc.write_qc({"p1": other, "p2": volume_files["p2"]}, {}, tmp_path / "qc")
        assert drawn == ["p1.png"]


def test_a_failure_reason_is_wrapped_at_words_without_the_id():
    """Found in review: the tile's four lines of 24 characters began with the id it shows
    above them, broke words ("expected lu|ngs") and were cut without a mark."""
    kaggle_id = "0a0c32c9e08cc2ea76a71649de56be6d"
    reason = (f"patient {kaggle_id}: expected lungs of 0.5–10 L, received 0.15 L (a scan "
              "without lungs, or lungs the field of view cuts off)")
    lines = qc.sheet.reason_lines(kaggle_id, reason)
    assert lines[0] == "expected lungs of 0.5–10"
    assert len(lines) == qc.sheet.REASON_LINES and lines[-1].endswith("…")
    assert all(len(line) <= qc.sheet.REASON_CHARS for line in lines)
    assert qc.sheet.reason_lines("p1", "p1: not DICOM") == ["not DICOM"]


def test_ids_with_dollar_signs_are_drawn_as_text(tmp_path):
    """Matplotlib reads "$…$" as mathematics: such an id stopped the whole QC run (found in
    review); it is drawn as it is written."""
    from kdsb.preprocessing.qc import write_qc

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 100, (12, 16, 16)).astype(np.int16)
    lung = np.zeros(hu.shape, np.uint8)
    lung[3:9, 4:12, 4:12] = 1
    odd = "p$\\foo$b"
    path = volumes.write_volume(tmp_path / "data" / "p.h5", hu, lung, (2, 2, 2), (0, 0, 0),
                                {"patient_id": odd})
    pages = write_qc({odd: path}, {"q$_$": "failed: a $x$ reason"}, tmp_path / "qc")
    assert (tmp_path / "qc" / f"{odd}.png").is_file() and all(p.is_file() for p in pages)


def test_a_patient_named_like_the_contact_sheet_keeps_its_image(tmp_path, caplog):
    """Ids `contact_sheet` and `contact_sheet_001`: their PNGs stay theirs; the sheet takes a
    name no id has, with a warning (found in review: overwritten, or deleted as a stale page)."""
    rng = np.random.default_rng(0)
    tiles = {pid: rng.integers(0, 255, (qc.sheet.TILE_PX, qc.sheet.TILE_PX, 3), dtype=np.uint8)
             for pid in ("contact_sheet", "contact_sheet_001", "p1")}
    for pid in tiles:
        qc.sheet.write_contact_sheet({pid: tiles[pid]}, tmp_path / f"{pid}.png")  # stand-in images
    before = {pid: (tmp_path / f"{pid}.png").read_bytes() for pid in tiles}
    with caplog.at_level("WARNING", logger="kdsb.preprocessing.qc"):
        pages = qc.sheet.write_contact_sheet(tiles, qc.sheet.sheet_path(tmp_path, tiles))
    assert [p.name for p in pages] == ["_contact_sheet.png"]
    assert {pid: (tmp_path / f"{pid}.png").read_bytes() for pid in tiles} == before
    assert "share the contact sheet's name: the sheet is _contact_sheet.png" in caplog.text
    default = tmp_path / qc.sheet.CONTACT_SHEET_NAME
    assert qc.sheet.sheet_path(tmp_path, ["p1", "__contact_sheet"]) == default
