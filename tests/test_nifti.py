"""NIfTI export (kdsb.io.nifti, `kdsb export`): RAS affine, data order, heatmaps, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from kdsb.cli import main
from kdsb.io import volumes
from kdsb.io.heatmaps import heatmap_path, read_heatmap, write_heatmap
from kdsb.io.nifti import ras_affine
from tests.locks import lock_held_elsewhere

SPACING = (2.5, 0.8, 0.7)  # (z, y, x) mm
ORIGIN = (-310.0, 25.5, -170.25)  # LPS (z, y, x) mm of voxel [0, 0, 0]


def _volume(tmp_path, patient_id="p1", shape=(6, 7, 8), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 400, size=shape).astype(np.int16)
    mask = (rng.random(shape) > 0.5).astype(np.uint8)
    path = volumes.write_volume(volumes.volume_path(tmp_path / "data", patient_id), hu, mask,
                                SPACING, ORIGIN)
    return path, hu, mask


def _ids(tmp_path, *ids):
    path = tmp_path / "ids.csv"
    path.write_text("id\n" + "".join(f"{i}\n" for i in ids))
    return path


def _lps(index_zyx):
    return np.asarray(ORIGIN) + np.asarray(index_zyx) * np.asarray(SPACING)


def test_affine_maps_voxels_to_dicom_coordinates_with_x_and_y_negated():
    affine = ras_affine(SPACING, ORIGIN)
    for index in [(0, 0, 0), (5, 6, 7), (2, 3, 1)]:
        z, y, x = _lps(index)
        ras = affine @ np.array([index[2], index[1], index[0], 1.0])
        np.testing.assert_allclose(ras[:3], [-x, -y, z])


def test_export_writes_volume_and_mask_that_viewers_place_at_the_scanner_position(tmp_path):
    _, hu, mask = _volume(tmp_path)
    assert main(["export", str(tmp_path / "data"), str(tmp_path / "out")]) == 0
    image = nib.load(tmp_path / "out" / "p1_hu.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # axis directions, RAS-named
    data = np.asarray(image.dataobj)
    assert data.dtype == np.int16 and data.shape == (8, 7, 6)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), hu)
    assert image.header.get_qform(coded=True)[1] == 1 and image.header.get_sform(coded=True)[1] == 1
    # An independent reader (ITK, as in 3D Slicer and ITK-SNAP) puts each voxel at its DICOM
    # patient (LPS) coordinate.
    itk = sitk.ReadImage(str(tmp_path / "out" / "p1_hu.nii.gz"))
    for index in [(0, 0, 0), (5, 6, 7), (3, 2, 4)]:
        point = itk.TransformIndexToPhysicalPoint((index[2], index[1], index[0]))
        np.testing.assert_allclose(point, _lps(index)[::-1], atol=1e-4)
    lungs = nib.load(tmp_path / "out" / "p1_lung_mask.nii.gz")
    np.testing.assert_array_equal(lungs.affine, image.affine)
    np.testing.assert_array_equal(np.asarray(lungs.dataobj).transpose(2, 1, 0), mask)
    assert np.asarray(lungs.dataobj).dtype == np.uint8


def test_export_heatmaps_and_only_the_ids_asked_for(tmp_path):
    _volume(tmp_path, "p1")
    _volume(tmp_path, "p2")
    heat = np.linspace(0, 1, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    write_heatmap(heatmap_path(tmp_path / "heat", "p2"), heat, SPACING, ORIGIN, {"method": "x"})
    np.testing.assert_array_equal(read_heatmap(heatmap_path(tmp_path / "heat", "p2"))[0], heat)
    (tmp_path / "ids.csv").write_text("id\np2\n")
    code = main(["export", str(tmp_path / "data"), str(tmp_path / "out"),
                 "--ids", str(tmp_path / "ids.csv"), "--heatmaps", str(tmp_path / "heat")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "p2_heatmap.nii.gz", "p2_hu.nii.gz", "p2_lung_mask.nii.gz"]
    exported = nib.load(tmp_path / "out" / "p2_heatmap.nii.gz")
    np.testing.assert_allclose(np.asarray(exported.dataobj).transpose(2, 1, 0), heat)
    np.testing.assert_allclose(exported.affine, ras_affine(SPACING, ORIGIN), atol=1e-5)
    # Display ranges for viewers that read them (found by a user's trial: none were set).
    for name, display in (("heatmap", (0, 1)), ("lung_mask", (0, 1)), ("hu", (-1000, 400))):
        header = nib.load(tmp_path / "out" / f"p2_{name}.nii.gz").header
        assert (float(header["cal_min"]), float(header["cal_max"])) == display


def test_an_earlier_heatmap_of_another_grid_and_killed_temporaries_are_removed(tmp_path, caplog):
    """Found in review: re-exporting a patient preprocessed again, without --heatmaps, left the
    old heatmap beside the new volume (a viewer overlays it on the wrong voxels), and a killed
    export's temporaries stayed for good."""
    _volume(tmp_path, "p1")
    heat = np.zeros((6, 7, 8), np.float32)
    write_heatmap(heatmap_path(tmp_path / "heat", "p1"), heat, SPACING, ORIGIN)
    out = tmp_path / "out"
    argv = ["export", str(tmp_path / "data"), str(out)]
    assert main([*argv, "--heatmaps", str(tmp_path / "heat")]) == 0
    (out / ".tmp-123-abcd1234-p1_hu.nii.gz").write_bytes(b"cut short")
    (out / ".tmp-123-abcd1234-p2_hu.nii.gz").write_bytes(b"another patient's")
    assert main(argv) == 0  # the same grid: the heatmap stays
    assert (out / "p1_heatmap.nii.gz").is_file()
    assert sorted(p.name for p in out.glob(".tmp-*")) == [".tmp-123-abcd1234-p2_hu.nii.gz"]
    _volume(tmp_path, "p1", shape=(6, 7, 9))  # preprocessed again: another grid
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert not (out / "p1_heatmap.nii.gz").exists()
    assert "an earlier export's heatmap on another grid than the volume exported now" in \
        caplog.text


def test_an_id_without_a_volume_is_refused_before_anything_is_written(tmp_path, capsys):
    """As explain and predict refuse it (found by a user's trial: export failed that patient
    alone while explain refused the run)."""
    _volume(tmp_path, "p1")
    (tmp_path / "ids.csv").write_text("id\np1\np9\n")
    code = main(["export", str(tmp_path / "data"), str(tmp_path / "out"),
                 "--ids", str(tmp_path / "ids.csv")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"kdsb export: error: {tmp_path / 'ids.csv'}: expected a volume in "
        f"{tmp_path / 'data'} for every id, received 1 of 2 without one: p9")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("problem", ["unreadable heatmap", "other grid"])
def test_a_bad_patient_fails_alone_with_a_one_line_reason(tmp_path, capsys, problem):
    _volume(tmp_path, "p1")
    _volume(tmp_path, "p2")
    heat = np.zeros((6, 7, 8), np.float32)
    write_heatmap(heatmap_path(tmp_path / "heat", "p1"), heat, SPACING, ORIGIN)
    if problem == "unreadable heatmap":
        heatmap_path(tmp_path / "heat", "p2").write_bytes(b"not HDF5")
    else:
        write_heatmap(heatmap_path(tmp_path / "heat", "p2"), heat, SPACING, (0.0, 0.0, 0.0))
    (tmp_path / "ids.csv").write_text("id\np1\np2\n")
    code = main(["export", str(tmp_path / "data"), str(tmp_path / "out"),
                 "--ids", str(tmp_path / "ids.csv"), "--heatmaps", str(tmp_path / "heat")])
    assert code == 1
    err = capsys.readouterr().err
    expected = {"unreadable heatmap": "p2.h5",
                "other grid": "expected a heatmap on the volume's grid"}[problem]
    assert expected in err and "p2" in err
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"p1_hu.nii.gz", "p1_lung_mask.nii.gz", "p1_heatmap.nii.gz"} <= written
    assert not any(name.startswith(".tmp-") for name in written)


def test_patients_explain_left_out_are_exported_without_a_heatmap(tmp_path, capsys, caplog):
    """Found in review: `explain --ids` on a few patients, then `export --heatmaps` of the
    cohort, failed every other patient and exported not even their HU and mask."""
    for patient_id in ("p1", "p2", "p3"):
        _volume(tmp_path, patient_id)
    write_heatmap(heatmap_path(tmp_path / "heat", "p2"), np.ones((6, 7, 8), np.float32),
                  SPACING, ORIGIN)
    write_heatmap(heatmap_path(tmp_path / "earlier", "p3"), np.ones((6, 7, 8), np.float32),
                  SPACING, ORIGIN)  # an earlier explain run's, exported before
    assert main(["export", str(tmp_path / "data"), str(tmp_path / "out"), "--ids",
                 str(_ids(tmp_path, "p3")), "--heatmaps", str(tmp_path / "earlier")]) == 0
    assert (tmp_path / "out" / "p3_heatmap.nii.gz").is_file()
    assert main(["export", str(tmp_path / "data"), str(tmp_path / "out"), "--heatmaps",
                 str(tmp_path / "heat")]) == 0
    assert "exported 3 patient(s)" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert written == ["p1_hu.nii.gz", "p1_lung_mask.nii.gz", "p2_heatmap.nii.gz",
                       "p2_hu.nii.gz", "p2_lung_mask.nii.gz", "p3_hu.nii.gz",
                       "p3_lung_mask.nii.gz"]
    assert f"--heatmaps {tmp_path / 'heat'} holds no heatmap of 2 of the 3 patient(s): p1, p3; " \
        "their HU and lung mask are exported without one (and without an earlier export's)" \
        in caplog.text


def test_a_second_export_into_the_same_out_dir_is_refused(tmp_path, capsys):
    """Found in review: two exports into one folder swept each other's temporaries mid-write."""
    from kdsb.io.nifti import EXPORT_LOCK

    _volume(tmp_path, "p1")
    out = tmp_path / "out"
    out.mkdir()
    with lock_held_elsewhere(out / EXPORT_LOCK):
        assert main(["export", str(tmp_path / "data"), str(out)]) == 2
        assert f"expected no other kdsb export writing {out}" in capsys.readouterr().err
        assert not list(out.glob("*.nii.gz"))
    assert main(["export", str(tmp_path / "data"), str(out)]) == 0


def test_a_failed_write_leaves_the_patients_files_as_they_were(tmp_path, capsys, monkeypatch):
    """Found in review: a write that failed after the HU file left a new volume beside the
    previous export's mask. Now every file is written before any is renamed into place."""
    _volume(tmp_path, "p1")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "data"), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _volume(tmp_path, "p1", seed=1)  # new values: a rerun would change both files
    saves = []

    def save_then_fail(image, path):  # the disk fills up on the second file
        saves.append(path)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        real_save(image, path)

    real_save = nib.save
    monkeypatch.setattr(nib, "save", save_then_fail)
    assert main(["export", str(tmp_path / "data"), str(out)]) == 1
    err = capsys.readouterr().err
    assert "failed: p1: expected to write its NIfTI files into" in err
    assert "No space left on device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp left either


def test_a_data_dir_that_cannot_be_listed_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Found in review: a PermissionError listing DATA_DIR exited 1 with a bare "[Errno 13]"."""
    from pathlib import Path

    (tmp_path / "locked").mkdir()

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    assert main(["export", str(tmp_path / "locked"), str(tmp_path / "out")]) == 2
    assert (f"received a folder that cannot be listed: {tmp_path / 'locked'} (Permission "
            f"denied)") in capsys.readouterr().err


def test_a_folder_without_volumes_or_heatmaps_is_refused(tmp_path, capsys):
    """Found by a user's check: a DICOM folder as DATA_DIR "exported 0 patient(s)", exit 0; a
    wrong --heatmaps folder failed every patient on a line of its own."""
    (tmp_path / "dicom").mkdir()
    assert main(["export", str(tmp_path / "dicom"), str(tmp_path / "out")]) == 2
    assert ("expected DATA_DIR, a folder of kdsb volume files (<id>.h5), received a folder "
            "without any") in capsys.readouterr().err
    for command in (["predict", str(tmp_path / "dicom"), "m.keras", "--out", "x.csv"],
                    ["train-gmcae", str(tmp_path / "dicom"), str(tmp_path / "run")]):
        assert main(command) == 2, command  # the same check in every command
        assert "received a folder without any" in capsys.readouterr().err
    _volume(tmp_path, "p1")
    assert main(["export", str(tmp_path / "data"), str(tmp_path / "out"), "--heatmaps",
                 str(tmp_path / "dicom")]) == 2
    assert "expected --heatmaps DIR, a folder of kdsb explain heatmaps (<id>.h5), received " \
        "none in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_data_dir_is_a_usage_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "expected DATA_DIR" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_ct_round_trip_lands_on_the_same_anatomy(real_chest_nifti, tmp_path):
    """A real chest CT (NIfTI) → `kdsb preprocess` (crop, 1 mm) → `kdsb export`: every exported
    voxel's world position, read back from the original file's affine, holds the same HU."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "chest.nii.gz").symlink_to(real_chest_nifti)
    assert main(["preprocess", str(tmp_path / "in"), str(tmp_path / "h5"), "--workers", "1"]) == 0
    assert main(["export", str(tmp_path / "h5"), str(tmp_path / "out")]) == 0
    original = nib.load(real_chest_nifti)
    exported = nib.load(tmp_path / "out" / "chest_hu.nii.gz")
    source, data = np.asarray(original.dataobj), np.asarray(exported.dataobj)
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, data.shape, size=(4000, 3))

    def median_error(shift_mm):
        world = exported.affine @ np.c_[ijk, np.ones(len(ijk))].T
        world[0] += shift_mm
        src = np.rint(np.linalg.inv(original.affine) @ world)[:3].astype(int).T
        inside = np.all((src >= 0) & (src < source.shape), axis=1)
        picked = source[tuple(src[inside].T)].astype(float)
        return np.median(np.abs(picked - data[tuple(ijk[inside].T)]))

    assert median_error(0.0) < 25  # 1.5 mm → 1 mm resampling, nearest source voxel
    assert median_error(6.0) > 2 * median_error(0.0)  # a 6 mm slip is plainly visible


def test_a_heatmap_of_bad_geometry_or_shape_is_a_one_line_error(tmp_path):
    """Found in review: a 2-value spacing reached the export's grid comparison as a bare
    ValueError, and a 2D heatmap was read."""
    import h5py

    from kdsb.errors import StoreError

    path = heatmap_path(tmp_path, "p1")
    write_heatmap(path, np.zeros((6, 7, 8), np.float32), SPACING, ORIGIN)
    with h5py.File(path, "r+") as f:
        f.attrs["spacing"] = [1.0, 1.0]
    with pytest.raises(StoreError, match="p1.h5: expected spacing and origin as 3 finite mm"):
        read_heatmap(path)
    write_heatmap(path, np.zeros((7, 8), np.float32), SPACING, ORIGIN)
    with pytest.raises(StoreError, match=r"p1.h5: expected a 3D heatmap \(z, y, x\)"):
        read_heatmap(path)
