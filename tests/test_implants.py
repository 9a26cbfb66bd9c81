"""Real-anatomy cohorts: a base scan varied, lesions implanted (kdsb.phantoms.implants, kdsb synth
--base),
and the lesion reaching the classifier's input unchanged after `kdsb preprocess`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from kdsb.cli import main
from kdsb.commands.synth import LESION_KINDS, LESION_PLACES, RADIUS_MM
from kdsb.data.inputs import VolumeInput
from kdsb.data.patches import normalize_hu
from kdsb.io import volumes
from kdsb.io.tables import read_labels
from kdsb.phantoms import implants
from kdsb.phantoms.anatomy import make_phantom
from kdsb.phantoms.dicom_write import write_ct_series
from kdsb.phantoms.implants import load_lesion_labels, vary_base
from kdsb.phantoms.lesions import KINDS, PLACES
from kdsb.preprocessing.lungs import segment_lungs


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A healthy phantom chest written as DICOM: the base scan."""
    phantom = make_phantom(np.random.default_rng(11), size=96, cancer=False, scale=1.0,
                           slice_mm=2.5)
    folder = tmp_path_factory.mktemp("base") / "base_scan"
    write_ct_series(folder, phantom.hu, phantom.spacing, phantom.origin, patient_id="base")
    return folder, phantom


def test_cli_lists_agree_with_the_library():
    from kdsb.phantoms.implants import DEFAULT_RADIUS_MM, MAX_RADIUS_MM

    assert LESION_KINDS == KINDS and LESION_PLACES == PLACES
    assert RADIUS_MM == DEFAULT_RADIUS_MM and RADIUS_MM[1] == MAX_RADIUS_MM


def test_lesion_labels_of_a_phantom_cohort_are_a_one_line_error(tmp_path):
    """Found in review: a phantom cohort's truth (no lesion labels) gave a bare KeyError."""
    from kdsb.errors import KdsbError

    (tmp_path / "truth").mkdir()
    np.savez(tmp_path / "truth" / "p0.npz", lung_mask=np.zeros((2, 2, 2), np.uint8))
    (tmp_path / "truth" / "p0.json").write_text(json.dumps({"lesions": []}))
    with pytest.raises(KdsbError, match=r"p0.npz: expected the truth of a cohort implanted by "
                                        r"kdsb synth --base \(lesion_labels\), received a "
                                        r"phantom cohort's"):
        load_lesion_labels(tmp_path, "p0")


def test_smooth_displacement_is_the_cubic_zoom_of_its_control_points():
    """The separable evaluation against scipy's 3D zoom of the same control grid."""
    shape, spacing = (23, 61, 17), np.array([2.5, 3.0, 7.0])
    fields = implants._smooth_displacement(shape, spacing, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for axis, field in enumerate(fields):
        grid = [int(np.ceil(n * s / implants.ELASTIC_GRID_MM)) + 1
                for n, s in zip(shape, spacing, strict=True)]
        control = rng.uniform(-1.0, 1.0, grid).astype(np.float32)
        zoom = [n / c for n, c in zip(shape, control.shape, strict=True)]
        expected = ndimage.zoom(control, zoom, order=3, grid_mode=True, mode="grid-constant")
        expected = expected[: shape[0], : shape[1], : shape[2]]
        expected *= implants.ELASTIC_MM / spacing[axis] / np.abs(expected).max()
        assert field.shape == shape
        np.testing.assert_allclose(field, expected, atol=1e-5)


def test_vary_base_keeps_geometry_consistent(base_folder):
    _, phantom = base_folder
    lungs = segment_lungs(phantom.hu, phantom.spacing) > 0
    hu, spacing, origin, record = vary_base(phantom.hu, phantom.spacing, phantom.origin, lungs,
                                            np.random.default_rng(0))
    assert hu.dtype == np.int16 and hu.ndim == 3
    assert spacing[1:] == phantom.spacing[1:] and spacing[0] == record["slice_mm"]
    start = [c[0] for c in record["crop"]]
    expected = np.asarray(phantom.origin) + np.asarray(start) * np.asarray(phantom.spacing)
    np.testing.assert_allclose(origin, expected, atol=1e-3)
    assert segment_lungs(hu, spacing).any()  # still a chest with lungs


@pytest.mark.slow
def test_synth_base_preprocess_and_classifier_input_keep_the_lesion(base_folder, tmp_path):
    folder, _ = base_folder
    root = tmp_path / "cohort"
    code = main(["synth", str(root), "--base", str(folder), "--patients", "2", "--seed", "4",
                 "--kinds", "solid", "--places", "lateral,paravertebral", "--radius-mm", "10",
                 "12"])
    assert code == 0
    labels = read_labels(root / "labels.csv")
    assert sorted(labels.values()) == [0, 1]
    cancer = next(pid for pid, label in labels.items() if label == 1)
    lesion_labels, records = load_lesion_labels(root, cancer)
    big = next(i for i, r in enumerate(records, start=1) if r["radius_mm"] >= 10)
    assert records[big - 1]["place"] in ("lateral", "paravertebral")
    assert (lesion_labels == big).sum() == records[big - 1]["voxels"]
    truth = json.loads((root / "truth" / f"{cancer}.json").read_text())

    out = tmp_path / "volumes"
    assert main(["preprocess", str(root / "dicom"), str(out), "--workers", "1"]) == 0
    volume = volumes.read_volume(out / f"{cancer}.h5")
    # The lesion's voxels, mapped into the volume file's grid by patient coordinates (mm).
    index = np.argwhere(lesion_labels == big)
    world = np.asarray(truth["origin"]) + index * np.asarray(truth["spacing"])
    grid = np.rint((world - np.asarray(volume.origin)) / np.asarray(volume.spacing)).astype(int)
    inside = np.all((grid >= 0) & (grid < volume.hu.shape), axis=1)
    assert inside.all()
    voxels = tuple(grid.T)
    assert volume.lung_mask[voxels].mean() >= 0.9
    # The classifier's default input preparation leaves every lung-mask voxel as it is.
    network_input = VolumeInput().read(out / f"{cancer}.h5")[..., 0]
    expected = normalize_hu(volume.hu)
    kept = volume.lung_mask[voxels] > 0
    np.testing.assert_array_equal(network_input[voxels][kept], expected[voxels][kept])
    in_mask = volume.lung_mask > 0
    np.testing.assert_array_equal(network_input[in_mask], expected[in_mask])


def test_synth_base_bad_options_are_usage_errors(base_folder, tmp_path, capsys):
    folder, _ = base_folder
    assert main(["synth", str(tmp_path / "a"), "--base", str(folder), "--kinds", "cyst"]) == 2
    assert "expected --kinds among" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "b"), "--base", str(tmp_path / "missing")]) == 2
    assert "expected a base scan (DICOM folder or volume file), received a missing path" in \
        capsys.readouterr().err
    assert main(["synth", str(tmp_path / "c"), "--base", str(folder), "--radius-mm", "3",
                 "5"]) == 2
    assert "expected --radius-mm LOW HIGH with 8 <= LOW <= HIGH <= 35, received 3 5" in \
        capsys.readouterr().err
    # Refused before the base is read, not after every placement try (found by a user's check).
    assert main(["synth", str(tmp_path / "c"), "--base", str(folder), "--radius-mm", "100",
                 "200"]) == 2
    assert "8 <= LOW <= HIGH <= 35, received 100 200" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # Options of the other kind of cohort are refused, not ignored (found in review).
    assert main(["synth", str(tmp_path / "d"), "--base", str(folder), "--size", "64"]) == 2
    assert "expected no --size for an implant cohort (--base)" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "e"), "--places", "apical"]) == 2
    assert "expected no --places for a phantom cohort" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    # OUT_ROOT inside the base's folder, or the base inside OUT_ROOT (found in review: the
    # base's series then took in the cohort's own, and its next run failed).
    # (A base elsewhere under OUT_ROOT is fine: synth writes dicom/, truth/, labels.csv only.)
    inside_dicom = tmp_path / "f" / "dicom" / "base_scan"
    shutil.copytree(folder, inside_dicom)
    for out_root, base in ((folder / "synthetic", folder), (tmp_path / "f", inside_dicom)):
        assert main(["synth", str(out_root), "--base", str(base)]) == 2
        assert "expected OUT_ROOT outside the base scan and the base outside OUT_ROOT's " \
            "dicom/, truth/ and labels.csv" in capsys.readouterr().err
    assert not (folder / "synthetic").exists()


def test_a_lesion_that_cannot_be_placed_is_drawn_elsewhere_then_named(base_folder, monkeypatch,
                                                                      caplog):
    """Found in review: one lesion without room stopped the whole cohort, and a resume hit it
    again (the patient's seed is fixed). It is now drawn at other places; a cancer lesion that
    finds none stops the cohort naming the patient, a small nodule is left out."""
    from kdsb.errors import KdsbError

    _, phantom = base_folder
    real, calls = implants.implant_lesion, []

    def first_place_full(*args, **kwargs):
        calls.append(kwargs["place"])
        if len(calls) == 1:
            raise KdsbError("expected lung surface of place 'apical', received none")
        return real(*args, **kwargs)

    monkeypatch.setattr(implants, "implant_lesion", first_place_full)
    _, _, labels, lesions = implants.implant_patient(
        phantom.hu.copy(), phantom.spacing, phantom.origin, np.random.default_rng(0),
        cancer=True, patient_id="implant_007")
    assert len(calls) >= 2 and lesions[0].radius_mm >= 8.0 and (labels == 1).any()

    def nowhere(*args, **kwargs):
        raise KdsbError("expected lung surface of place 'apical', received none in this scan")

    monkeypatch.setattr(implants, "implant_lesion", nowhere)
    with pytest.raises(KdsbError, match=r"^patient implant_007: expected lung surface of place "
                                        r".* \(5 places tried; a smaller --radius-mm range "
                                        r"or other --places may fit this base\)"):
        implants.implant_patient(phantom.hu.copy(), phantom.spacing, phantom.origin,
                                 np.random.default_rng(0), cancer=True, patient_id="implant_007")
    hu = phantom.hu.copy()
    rng = next(np.random.default_rng(seed) for seed in range(100)  # one with small nodules
               if np.random.default_rng(seed).integers(0, implants.MAX_SMALL_NODULES + 1))
    _, _, labels, lesions = implants.implant_patient(hu, phantom.spacing, phantom.origin, rng,
                                                     cancer=False, patient_id="p2")
    assert lesions == [] and not labels.any() and np.array_equal(hu, phantom.hu)
    assert "patient p2: a small_solid nodule left out: expected lung surface" in caplog.text


def test_an_interrupted_cohort_resumes_only_on_the_same_base_content(base_folder, tmp_path,
                                                                     monkeypatch, caplog):
    """A synth --base killed after its first patient resumes with the same base; a base scan
    replaced at the same path (other content) replaces the cohort instead of mixing two."""
    import shutil

    from kdsb.phantoms import dicom_write

    folder, _ = base_folder
    base = tmp_path / "base_scan"
    shutil.copytree(folder, base)
    out = tmp_path / "cohort"
    argv = ["synth", str(out), "--base", str(base), "--patients", "2", "--seed", "4",
            "--kinds", "solid", "--places", "lateral", "--radius-mm", "10", "12"]
    real_write, written, die = dicom_write.write_ct_series, [], [True]

    def write_then_die(folder, *args, **kwargs):
        written.append(folder.name)
        real_write(folder, *args, **kwargs)
        if die[0] and len(written) == 2:  # the second patient's series, before its record
            raise KeyboardInterrupt

    monkeypatch.setattr(dicom_write, "write_ct_series", write_then_die)
    assert main(argv) == 130  # interrupted
    first = sorted((out / "dicom" / "implant_000").iterdir())[0].read_bytes()
    written.clear()
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert written == ["implant_001"]  # resumed: the first patient kept
    assert "resuming the unfinished cohort" in caplog.text

    shutil.rmtree(out)
    written.clear()
    assert main(argv) == 130
    other = make_phantom(np.random.default_rng(12), size=96, cancer=False, scale=1.0,
                         slice_mm=2.5)
    shutil.rmtree(base)
    write_ct_series(base, other.hu, other.spacing, other.origin, patient_id="base")
    written.clear()
    caplog.clear()
    die[0] = False
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert written == ["implant_000", "implant_001"]  # another base: every patient drawn again
    assert "replacing the unfinished cohort" in caplog.text
    assert sorted((out / "dicom" / "implant_000").iterdir())[0].read_bytes() != first


def test_an_occupied_out_root_is_refused_before_the_base_is_read(base_folder, tmp_path,
                                                                 monkeypatch):
    """Found in review: the base was read and segmented (seconds) before OUT_ROOT was checked."""
    from kdsb.errors import UsageError
    from kdsb.preprocessing import pipeline

    folder, _ = base_folder
    (tmp_path / "dicom").mkdir()
    (tmp_path / "labels.csv").write_text("id,cancer\n")

    def never(*args, **kwargs):
        raise AssertionError("the base was read")

    monkeypatch.setattr(pipeline, "read_patient", never)
    with pytest.raises(UsageError, match="expected a new or empty OUT_ROOT"):
        implants.write_implant_cohort(tmp_path, folder, patients=2, seed=0)
