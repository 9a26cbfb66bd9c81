"""The cohort runner behind `kdsb preprocess`, end to end on phantom and broken patients."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from kdsb.cli import main
from kdsb.errors import UsageError
from kdsb.io import volumes
from kdsb.phantoms.cohort import load_truth, write_cohort
from kdsb.phantoms.dicom_write import Acquisition, write_ct_series
from kdsb.preprocessing.out_dir import MANIFEST_FIELDS, read_manifest
from kdsb.preprocessing.pipeline import STATUS_OK, PatientResult
from kdsb.preprocessing.resample import resample_mask
from kdsb.preprocessing.workers import WORKER_DIED_MESSAGE, run_tasks
from tests.locks import lock_held_elsewhere

REPO = Path(__file__).resolve().parents[1]
SEED = 0  # this seed's 4 patients hold large juxtapleural nodules (8.3 and 13.9 mm radius)
PATIENTS = 4
SIZE = 96  # pixels; with SCALE 0.7 the pixels are about 2.5 mm
SCALE = 0.7  # smaller patients keep the test fast while their lungs stay above 0.5 L
# Each bad patient and a word its one-line failure must hold.
BAD_REASONS = {
    "random_bytes": "",
    "empty": "",
    "mr_modality": "MR",
    "water_cylinder": "lung",
    "truncated": "truncated or corrupt",
    "no_pixel_data": "without PixelData",
    "single_slice": "at least 2 slices",
    "mixed_sizes": "expected every slice to be 64×64 pixels",
}
BAD_IDS = tuple(BAD_REASONS)
MIN_DICE = 0.97
KILL_WAIT_S = 120.0
MAX_REAL_LUNG_L = 0.1  # the real upper-abdomen series holds far less lung than this


def _kdsb(*args: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run `python -m kdsb ARGS` in a fresh process (like a user at a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kdsb", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, env=env, cwd=REPO, **kwargs)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _water_cylinder() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 0 HU cylinder in air: a body without lungs. Returns (hu, spacing)."""
    spacing = (5.0, 4.0, 4.0)
    y, x = np.mgrid[:64, :64]
    inside = (y - 31.5) ** 2 + (x - 31.5) ** 2 < 25**2
    hu = np.where(inside, 0, -1000).astype(np.int16)
    return np.repeat(hu[None], 24, axis=0), spacing


def _write_broken_series(root: Path) -> None:
    """Patients whose DICOM files are broken in one way each (see BAD_REASONS)."""
    hu, spacing = _water_cylinder()

    def write(pid: str, volume: np.ndarray = hu) -> list[Path]:
        return write_ct_series(root / pid, volume, spacing, (0.0, 0.0, 0.0), patient_id=pid)

    middle = write("truncated")[len(hu) // 2]
    middle.write_bytes(middle.read_bytes()[: middle.stat().st_size // 2])
    for path in write("no_pixel_data"):
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    write("single_slice", hu[:1])
    # One slice of the series replaced by a smaller image at the same position.
    paths = write("mixed_sizes")
    small = write_ct_series(root.parent / "small", hu[:, :48, :48], spacing, (0.0, 0.0, 0.0),
                            patient_id="mixed_sizes")
    series, swapped = pydicom.dcmread(paths[0]), pydicom.dcmread(small[3])
    swapped.StudyInstanceUID, swapped.SeriesInstanceUID = (
        series.StudyInstanceUID, series.SeriesInstanceUID
    )
    swapped.ImagePositionPatient = pydicom.dcmread(paths[3]).ImagePositionPatient
    swapped.save_as(paths[3])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """A phantom cohort root (dicom/, truth/) of PATIENTS patients."""
    root = tmp_path_factory.mktemp("phantoms")
    write_cohort(root, patients=PATIENTS, seed=SEED, size=SIZE, scale=SCALE)
    return root


def _phantom_ids(phantoms: Path) -> list[str]:
    return sorted(p.name for p in (phantoms / "dicom").iterdir())


def _link_patients(root: Path, phantoms: Path, ids: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for pid in ids:
        (root / pid).symlink_to(phantoms / "dicom" / pid, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def mixed_run(phantoms, tmp_path_factory):
    """`kdsb preprocess` over the phantoms plus one patient of each bad kind, with --qc."""
    work = tmp_path_factory.mktemp("mixed")
    root = _link_patients(work / "dicom", phantoms, _phantom_ids(phantoms))
    rng = np.random.default_rng(1)
    (root / "random_bytes").mkdir()
    for index in range(3):
        (root / "random_bytes" / f"{index}.dcm").write_bytes(rng.bytes(4096))
    (root / "empty").mkdir()
    hu, spacing = _water_cylinder()
    write_ct_series(
        root / "mr_modality", hu, spacing, (0.0, 0.0, 0.0), patient_id="mr_modality",
        acquisition=Acquisition(modality="MR"),
    )
    write_ct_series(root / "water_cylinder", hu, spacing, (0.0, 0.0, 0.0),
                    patient_id="water_cylinder")
    _write_broken_series(root)
    out, qc = work / "out", work / "qc"
    process = _kdsb("preprocess", str(root), str(out), "--workers", "2", "--qc", str(qc))
    return process, out, qc


def test_bad_patients_fail_on_one_line_while_good_ones_are_written(mixed_run, phantoms):
    process, out, _ = mixed_run
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr
    for pid in BAD_IDS:
        lines = [line for line in process.stderr.splitlines() if pid in line and "ERROR" in line]
        assert len(lines) == 1, (pid, process.stderr)
    assert sorted(volumes.list_volumes(out)) == _phantom_ids(phantoms)
    assert f"4 ok, 0 skipped, {len(BAD_IDS)} failed" in process.stderr


def test_manifest_has_one_row_per_patient(mixed_run, phantoms):
    _, out, _ = mixed_run
    with open(out / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == MANIFEST_FIELDS
        rows = {row["id"]: row for row in reader}
    assert sorted(rows) == sorted([*_phantom_ids(phantoms), *BAD_IDS])
    for pid in _phantom_ids(phantoms):
        row = rows[pid]
        assert (row["status"], row["error"]) == ("ok", "")
        assert float(row["seconds"]) > 0
        assert row["shape"] == "x".join(map(str, volumes.read_attrs(out / f"{pid}.h5")["shape"]))
    for pid in BAD_IDS:
        assert rows[pid]["status"] == "failed"
        assert pid in rows[pid]["error"] and "\n" not in rows[pid]["error"]
        assert rows[pid]["shape"] == ""
    for pid, reason in BAD_REASONS.items():
        assert reason in rows[pid]["error"], (pid, rows[pid]["error"])


def test_volume_files_follow_the_data_contract(mixed_run, phantoms):
    _, out, _ = mixed_run
    assert not list(out.glob(".tmp-*"))  # no temporary files left
    for pid in _phantom_ids(phantoms):
        volume = volumes.read_volume(out / f"{pid}.h5")
        truth = load_truth(phantoms, pid)
        assert volume.hu.dtype == np.int16 and volume.lung_mask.dtype == np.uint8
        assert volume.hu.shape == volume.lung_mask.shape
        assert set(np.unique(volume.lung_mask)) == {0, 1}
        assert volume.spacing == (1.0, 1.0, 1.0)
        assert volume.patient_id == pid
        assert volume.attrs["series_uid"]
        np.testing.assert_allclose(volume.attrs["source_spacing"], truth.spacing)
        assert tuple(volume.attrs["source_shape"]) == truth.lung_mask.shape
        assert "kdsb_version" in volume.attrs
        # The crop lies inside the scanned volume.
        end = np.add(truth.origin, np.multiply(np.subtract(truth.lung_mask.shape, 1),
                                               truth.spacing))
        last = np.add(volume.origin, np.subtract(volume.hu.shape, 1))
        assert np.all(np.array(volume.origin) >= np.array(truth.origin) - 1e-6)
        assert np.all(last <= end + 1e-6)


def _truth_in_output(truth, volume: volumes.Volume) -> np.ndarray:
    """The truth lung mask cropped and resampled exactly as kdsb treats its own mask.

    The output's origin is a source voxel (origin + start index · spacing), so the truth is
    cropped from that index and resampled with `resample_mask` to the output spacing: any
    difference left is segmentation, not geometry.
    """
    start = (np.subtract(volume.origin, truth.origin)) / np.asarray(truth.spacing)
    np.testing.assert_allclose(start, np.round(start), atol=1e-6)  # origin on the source grid
    crop = truth.lung_mask[tuple(slice(int(round(i)), None) for i in start)]
    resampled = resample_mask(crop, truth.spacing, volume.spacing)
    assert all(r >= n for r, n in zip(resampled.shape, volume.hu.shape, strict=True))
    return resampled[tuple(slice(0, n) for n in volume.hu.shape)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_segmentation_matches_truth_and_keeps_juxtapleural_nodules(mixed_run, phantoms):
    _, out, _ = mixed_run
    juxtapleural = 0
    for pid in _phantom_ids(phantoms):
        volume = volumes.read_volume(out / f"{pid}.h5")
        truth = load_truth(phantoms, pid)
        expected = _truth_in_output(truth, volume)
        # The crop keeps the whole truth lung (volumes in mm³).
        truth_mm3 = truth.lung_mask.sum() * np.prod(truth.spacing)
        assert expected.sum() * np.prod(volume.spacing) == pytest.approx(truth_mm3, rel=0.02)
        dice = _dice(expected, volume.lung_mask)
        assert dice >= MIN_DICE, (pid, dice)
        for nodule in truth.nodules:
            if nodule.juxtapleural and nodule.radius_mm >= 8.0:
                juxtapleural += 1
                centre = np.round(np.subtract(nodule.center_mm, volume.origin)).astype(int)
                ball = np.linalg.norm(np.indices(volume.hu.shape).T - centre, axis=-1).T
                # The nodule is painted only inside the truth lung: those voxels must be in the
                # mask (a tumour cut out of the mask leaves a dent here).
                nodule_voxels = (ball <= nodule.radius_mm) & (expected == 1)
                kept = volume.lung_mask[nodule_voxels].mean()
                assert kept >= 0.95, (pid, nodule, kept)
    assert juxtapleural >= 2


def test_origin_puts_nodules_where_the_truth_says(mixed_run, phantoms):
    """A voxel's patient coordinate is right within half a voxel: nodule centroids agree."""
    _, out, _ = mixed_run
    checked = 0
    for pid in _phantom_ids(phantoms):
        volume = volumes.read_volume(out / f"{pid}.h5")
        for nodule in load_truth(phantoms, pid).nodules:
            if nodule.radius_mm < 8.0:
                continue
            centre = np.subtract(nodule.center_mm, volume.origin)
            index = np.indices(volume.hu.shape).astype(np.float64)
            near = np.sqrt(sum((index[a] - centre[a]) ** 2 for a in range(3)))
            solid = (volume.hu > -400) & (near <= nodule.radius_mm * 1.05)
            found = np.array(ndimage.center_of_mass(solid))
            assert np.abs(found - centre).max() <= 0.5, (pid, found, centre)
            checked += 1
    assert checked >= 3


def test_qc_images_are_written_for_every_volume(mixed_run, phantoms):
    _, _, qc = mixed_run
    expected = {f"{pid}.png" for pid in _phantom_ids(phantoms)} | {"contact_sheet.png"}
    assert {p.name for p in qc.iterdir()} == expected
    for name in expected:
        assert (qc / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: [str(d / "missing"), str(d / "out")], "missing path"),
        (lambda d: [str(d / "file.txt"), str(d / "out")], "received a file"),
        (lambda d: [str(d / "no_patients"), str(d / "out")], "one sub-folder per patient"),
        (lambda d: [str(d / "root"), str(d / "out"), "--spacing", "1", "2"], "--spacing"),
        (lambda d: [str(d / "root"), str(d / "out"), "--spacing", "0"], "positive"),
        # Found in review: 1000 mm wrote 1×1×1 volumes, "ok"; 0.001 mm failed every patient.
        (lambda d: [str(d / "root"), str(d / "out"), "--spacing", "1000"],
         "expected --spacing between 0.25 and 10 mm, received [1000.0]"),
        (lambda d: [str(d / "root"), str(d / "out"), "--spacing", "1", "1", "0.001"],
         "expected --spacing between 0.25 and 10 mm, received [1.0, 1.0, 0.001]"),
        (lambda d: [str(d / "root"), str(d / "out"), "--workers", "0"], "--workers"),
        (lambda d: [str(d / "root"), str(d / "out"), "--margin-mm", "-1"],
         "expected a finite margin of at least 0 mm, received -1.0"),
        (lambda d: [str(d / "root"), str(d / "out"), "--margin-mm", "nan"],
         "expected a finite margin of at least 0 mm, received nan"),
        (lambda d: [str(d / "root"), str(d / "out"), "--margin-mm", "inf"],
         "expected a finite margin of at least 0 mm, received inf"),
        (lambda d: [str(d / "root"), str(d / "file.txt")],
         "expected OUT_DIR, a folder for the volumes, received a file"),
        (lambda d: [str(d / "root"), str(d / "file.txt" / "out")],
         "expected OUT_DIR, a folder for the volumes, received a path under a file"),
        # Found in review: checked only once every patient was done, and exit 1.
        (lambda d: [str(d / "root"), str(d / "out"), "--qc", str(d / "file.txt")],
         "expected --qc DIR, a folder for the QC images, received a file"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, make_args, message):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "no_patients").mkdir()
    (tmp_path / "root" / "patient").mkdir(parents=True)
    assert main(["preprocess", *make_args(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


@pytest.mark.slow
def test_resume_after_kill_and_overwrite(phantoms, tmp_path):
    ids = _phantom_ids(phantoms)[:3]
    root = _link_patients(tmp_path / "dicom", phantoms, ids)
    out = tmp_path / "out"
    process = _kdsb("preprocess", str(root), str(out), "--workers", "1", background=True,
                    start_new_session=True, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_WAIT_S
    try:
        while not (out.is_dir() and volumes.list_volumes(out)) and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the runner and its workers, like an OOM kill
        process.wait()
    done = sorted(volumes.list_volumes(out))
    assert 1 <= len(done) < len(ids)
    for path in volumes.list_volumes(out).values():
        volumes.read_volume(path)  # complete, never partial

    assert main(["preprocess", str(root), str(out), "--workers", "1"]) == 0
    rows = read_manifest(out)
    assert sorted(rows) == ids
    assert {pid for pid, row in rows.items() if row["status"] == "skipped"} == set(done)
    assert all(rows[pid]["status"] == "ok" for pid in ids if pid not in done)
    assert not list(out.glob(".tmp-*"))
    assert sorted(volumes.list_volumes(out)) == ids

    before = {pid: (out / f"{pid}.h5").stat().st_mtime_ns for pid in ids}
    assert main(["preprocess", str(root), str(out), "--workers", "2", "--overwrite"]) == 0
    assert all(row["status"] == "ok" for row in read_manifest(out).values())
    assert all((out / f"{pid}.h5").stat().st_mtime_ns > before[pid] for pid in ids)


def test_manifest_keeps_rows_of_earlier_runs(phantoms, tmp_path):
    ids = _phantom_ids(phantoms)[:2]
    out = tmp_path / "out"
    first = _link_patients(tmp_path / "first", phantoms, ids[:1])
    second = _link_patients(tmp_path / "second", phantoms, ids[1:])
    assert main(["preprocess", str(first), str(out), "--workers", "1"]) == 0
    assert main(["preprocess", str(second), str(out), "--workers", "1"]) == 0
    rows = read_manifest(out)
    assert sorted(rows) == ids and all(row["status"] == "ok" for row in rows.values())
    # --overwrite redoes the patients of its INPUT_ROOT only: the other's volume and row stay.
    kept = (out / f"{ids[0]}.h5").stat().st_mtime_ns
    assert main(["preprocess", str(second), str(out), "--workers", "1", "--overwrite"]) == 0
    assert (out / f"{ids[0]}.h5").stat().st_mtime_ns == kept
    assert read_manifest(out)[ids[0]] == rows[ids[0]]


def test_another_cohorts_volume_of_the_same_id_is_refused_not_replaced(phantoms, tmp_path,
                                                                        capsys):
    """Found in review: a second cohort with the same ids (two synth draws without
    --id-prefix) replaced the first's volumes as "changed since", so training read held-out
    images under training ids. A moved INPUT_ROOT whose files are the same is still skipped."""
    first_id, other_id = _phantom_ids(phantoms)[:2]
    out = tmp_path / "out"
    first = _link_patients(tmp_path / "first", phantoms, [first_id])
    assert main(["preprocess", str(first), str(out), "--workers", "1"]) == 0
    written = (out / f"{first_id}.h5").stat().st_mtime_ns
    second = tmp_path / "second"  # another patient's scan under the same id
    second.mkdir()
    (second / first_id).symlink_to(phantoms / "dicom" / other_id, target_is_directory=True)
    assert main(["preprocess", str(second), str(out), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert f"received 1 made from other files elsewhere (another cohort with the same ids?): " \
        f"{first_id}.h5 (made from {first / first_id}, here {second / first_id}); use another " \
        "OUT_DIR, or --overwrite to replace them" in error and len(error.splitlines()) == 1
    assert (out / f"{first_id}.h5").stat().st_mtime_ns == written
    moved = _link_patients(tmp_path / "moved", phantoms, [first_id])
    assert main(["preprocess", str(moved), str(out), "--workers", "1"]) == 0
    assert read_manifest(out)[first_id]["status"] == "skipped"
    assert main(["preprocess", str(second), str(out), "--workers", "1", "--overwrite"]) == 0
    assert (out / f"{first_id}.h5").stat().st_mtime_ns > written


@pytest.mark.parametrize("again", [[], ["--overwrite"]])
def test_a_killed_overwrite_run_continues_where_it_stopped(phantoms, tmp_path, again):
    """Found in review: a killed --overwrite run began again from its first patient when rerun
    with the flag, and without it kept the old volumes it had not reached. Another cohort in
    the same OUT_DIR neither continues it nor ends it (found in review of the fix)."""
    from kdsb.preprocessing.out_dir import begin_overwrite, overwrite_marker

    ids = _phantom_ids(phantoms)[:4]
    root = _link_patients(tmp_path / "dicom", phantoms, ids[:3])
    other = _link_patients(tmp_path / "other", phantoms, ids[3:])
    out = tmp_path / "out"
    assert main(["preprocess", str(root), str(out), "--workers", "1"]) == 0
    assert main(["preprocess", str(other), str(out), "--workers", "1"]) == 0
    old = {pid: (out / f"{pid}.h5").stat().st_mtime_ns for pid in ids}
    # An --overwrite run of root killed after its first patient: its marker, then that volume.
    begin_overwrite(out, root, (1.0, 1.0, 1.0), 10.0)
    os.utime(out / f"{ids[0]}.h5")
    redone = (out / f"{ids[0]}.h5").stat().st_mtime_ns
    assert main(["preprocess", str(other), str(out), "--workers", "1"]) == 0
    assert read_manifest(out)[ids[3]]["status"] == "skipped"
    assert overwrite_marker(out, root).is_file()
    assert main(["preprocess", str(root), str(out), "--workers", "1", *again]) == 0
    rows = read_manifest(out)
    assert rows[ids[0]]["status"] == "skipped" and \
        (out / f"{ids[0]}.h5").stat().st_mtime_ns == redone
    assert all(rows[pid]["status"] == "ok" and (out / f"{pid}.h5").stat().st_mtime_ns > old[pid]
               for pid in ids[1:3])
    assert not overwrite_marker(out, root).exists()
    # Finished: a run without the flag now skips every patient.
    assert main(["preprocess", str(root), str(out), "--workers", "1"]) == 0
    assert {read_manifest(out)[pid]["status"] for pid in ids[:3]} == {"skipped"}


def test_an_overwrite_marker_is_of_one_input_root_settings_and_kdsb(tmp_path, monkeypatch):
    from kdsb.preprocessing import out_dir
    from kdsb.preprocessing.out_dir import begin_overwrite, overwrite_in_progress

    root, other = tmp_path / "root", tmp_path / "other"
    begin_overwrite(tmp_path, root, (2.0, 2.0, 2.0), 10.0)
    assert overwrite_in_progress(tmp_path, root, (2.0, 2.0, 2.0), 10.0) is not None
    assert overwrite_in_progress(tmp_path, other, (2.0, 2.0, 2.0), 10.0) is None
    assert overwrite_in_progress(tmp_path, root, (1.0, 1.0, 1.0), 10.0) is None
    assert overwrite_in_progress(tmp_path, root, (2.0, 2.0, 2.0), 5.0) is None
    monkeypatch.setattr(out_dir, "__version__", "9.9")  # an upgrade starts it over
    assert overwrite_in_progress(tmp_path, root, (2.0, 2.0, 2.0), 10.0) is None


def test_a_refused_overwrite_run_leaves_no_marker(phantoms, tmp_path, capsys):
    """Found in review of the fix: a refused --overwrite run left its marker, and a later run
    "continued" an overwrite that never ran."""
    ids = _phantom_ids(phantoms)[:2]
    out = tmp_path / "out"
    first = _link_patients(tmp_path / "first", phantoms, ids[:1])
    assert main(["preprocess", str(first), str(out), "--workers", "1", "--spacing", "2"]) == 0
    second = _link_patients(tmp_path / "second", phantoms, ids[1:])
    assert main(["preprocess", str(second), str(out), "--workers", "1", "--overwrite"]) == 2
    assert "a patient not in this INPUT_ROOT" in capsys.readouterr().err
    assert not list(out.glob(".kdsb-overwrite*"))


def test_a_folder_this_user_may_not_search_is_a_patient_that_cannot_be_read(tmp_path,
                                                                             monkeypatch):
    """Found in review: one patient folder of another user (mode 700) stopped the whole run
    before any work with a PermissionError naming a lock file, and os.walk would have read it
    as empty. Now it is listed as a patient (a link to one too, under its own id) and reading
    it is a one-line error naming it (its patient then fails alone, as any unreadable one).
    The tests run as root: the refusals are monkeypatched as another user meets them."""
    import pathlib

    from kdsb.errors import KdsbError
    from kdsb.io.folders import files_under
    from kdsb.preprocessing.patients import find_patients

    root = tmp_path / "root"
    (root / "locked" / "series").mkdir(parents=True)
    (root / "open").mkdir()
    real_stat, real_scandir = pathlib.Path.stat, os.scandir

    def stat(self, *args, follow_symlinks=True):
        if self.parent.name == "locked" or (self.name in ("link", "p9.nii.gz")
                                            and follow_symlinks):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, follow_symlinks=follow_symlinks)

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    (root / "link").symlink_to(root / "locked" / "series", target_is_directory=True)
    (root / "p9.nii.gz").symlink_to(root / "locked" / "p9.nii.gz")  # a file patient's link
    latin1_note = os.fsencode(root) + b"/notes_M\xfcller.txt"  # not a patient: ignored
    with open(latin1_note, "w") as f:
        f.write("notes")
    monkeypatch.setattr(pathlib.Path, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    assert sorted(find_patients(root)) == ["link", "locked", "open", "p9"]
    with pytest.raises(KdsbError, match=f"^{root / 'locked'}: expected folders this user may "
                                        f"read, received Permission denied for {root / 'locked'}$"):
        files_under(root / "locked")


def test_a_volume_whose_source_cannot_be_read_now_is_kept(tmp_path, monkeypatch, caplog):
    """Found in review: on a rerun, a patient folder this user may no longer search ended the
    whole run (its source stamp), where the patient could only fail and lose its volume."""
    import kdsb.preprocessing.cohort as cohort
    from kdsb.errors import KdsbError
    from kdsb.preprocessing.pipeline import SOURCE_STAMP_ATTR

    source = tmp_path / "root" / "p1"
    source.mkdir(parents=True)
    volumes.write_volume(volumes.volume_path(tmp_path / "out", "p1"), np.zeros((2, 2, 2)),
                         np.zeros((2, 2, 2)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                         {"margin_mm": 10.0, SOURCE_STAMP_ATTR: "1 files, 1 bytes"})

    def unreadable(path):
        raise KdsbError(f"{path}: expected folders this user may read, received Permission "
                        "denied")

    monkeypatch.setattr(cohort, "source_stamp", unreadable)
    tasks, skipped = cohort._plan({"p1": source}, tmp_path / "out", (1.0, 1.0, 1.0), 10.0, None)
    assert not tasks and list(skipped) == ["p1"]
    assert "p1: kept p1.h5, its source cannot be read now" in caplog.text


def test_another_source_is_one_elsewhere_or_gone_with_other_files(tmp_path):
    """Found in review of the fix: a gone source counted as moved, so a deleted cohort's
    volumes were replaced by another cohort's of the same ids without a word."""
    import kdsb.preprocessing.cohort as cohort

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    stamp = "3 files, 300 bytes, newest 2026-12-01T00:00:00.000000+00:00"
    copied = "3 files, 300 bytes, newest 2026-12-04T00:00:00.000000+00:00"
    other = "4 files, 410 bytes, newest 2026-12-04T00:00:00.000000+00:00"
    assert cohort._another_source(str(there), here, stamp, other)  # still there
    assert not cohort._another_source(str(here), here, stamp, other)
    assert not cohort._another_source(None, here, stamp, other)  # before kdsb recorded it
    gone = str(tmp_path / "gone")
    assert cohort._another_source(gone, here, stamp, other)  # gone, other files
    assert not cohort._another_source(gone, here, stamp, copied)  # moved, times lost


def test_overwrite_replaces_another_cohorts_volume_in_a_continued_run(tmp_path):
    """Found in review of the fix: a continued --overwrite run refused another cohort's volume
    with "use --overwrite", which had been given."""
    import kdsb.preprocessing.cohort as cohort
    from kdsb.preprocessing.pipeline import SOURCE_ATTR, SOURCE_STAMP_ATTR

    source, elsewhere = tmp_path / "root" / "p1", tmp_path / "other" / "p1"
    source.mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    volumes.write_volume(volumes.volume_path(tmp_path / "out", "p1"), np.zeros((2, 2, 2)),
                         np.zeros((2, 2, 2)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                         {"margin_mm": 10.0, SOURCE_STAMP_ATTR: "9 files, 9 bytes",
                          SOURCE_ATTR: str(elsewhere)})
    plan = ({"p1": source}, tmp_path / "out", (1.0, 1.0, 1.0), 10.0, 0)  # began long ago
    with pytest.raises(UsageError, match="made from other files elsewhere"):
        cohort._plan(*plan)
    tasks, _ = cohort._plan(*plan, overwrite=True)
    assert list(tasks) == ["p1"]


def test_a_killed_overwrite_run_not_continued_is_said_so(tmp_path, caplog):
    from kdsb.preprocessing.out_dir import begin_overwrite, overwrite_in_progress

    begin_overwrite(tmp_path, tmp_path / "root", (2.0, 2.0, 2.0), 10.0)
    assert overwrite_in_progress(tmp_path, tmp_path / "root", (1.0, 1.0, 1.0), 10.0) is None
    assert f"a killed --overwrite run of {tmp_path / 'root'} with other settings or another " \
        "kdsb" in caplog.text and "is not continued by this one" in caplog.text


def test_a_source_spelled_otherwise_is_the_same_source(phantoms, tmp_path, caplog):
    """Found in review of the fix: INPUT_ROOT reached through a symlinked parent (or `..`),
    its scan changed since, was refused as another cohort; it is redone, as before."""
    pid = _phantom_ids(phantoms)[0]
    (tmp_path / "real" / "root").mkdir(parents=True)
    shutil.copytree(phantoms / "dicom" / pid, tmp_path / "real" / "root" / pid)
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    out = tmp_path / "out"
    assert main(["preprocess", str(tmp_path / "real" / "root"), str(out), "--workers", "1"]) == 0
    first = next((tmp_path / "real" / "root" / pid).iterdir())
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert main(["preprocess", str(tmp_path / "via" / "root"), str(out), "--workers", "1"]) == 0
    assert read_manifest(out)[pid]["status"] == "ok" and "changed since" in caplog.text


def test_a_patient_name_not_in_utf8_is_a_usage_error(tmp_path, capsys):
    """Found in review: a Latin-1 folder name crashed the run with a traceback after the other
    patients had started (its id cannot be written into the volume or the manifest)."""
    root = tmp_path / "root"
    root.mkdir()
    latin1 = os.fsencode(root) + b"/M\xfcller"
    os.mkdir(latin1)
    assert main(["preprocess", str(root), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error == f"kdsb preprocess: error: expected patient names in UTF-8, received " \
        f"{latin1!r}: rename it (e.g. convmv -f latin1 -t utf8)\n"


def test_real_series_fails_on_one_line_for_too_little_lung(real_ct_dicom_dir, tmp_path, caplog):
    """The real 20-slice Siemens series covers the upper abdomen: only a sliver of lung."""
    root = tmp_path / "dicom"
    root.mkdir()
    (root / "siemens").symlink_to(real_ct_dicom_dir, target_is_directory=True)
    status = main(["preprocess", str(root), str(tmp_path / "out"), "--workers", "1"])
    assert status == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "siemens" in errors[0] and "\n" not in errors[0], errors
    # A sliver of lung: a few hundredths of a litre (the exact figure follows the segmentation).
    found = re.search(r"patient siemens: expected lungs of 0\.5–10 L, received (\d+\.\d+) L "
                      r"\(the scan covers only \d\d mm head to foot, .*: is it a chest CT\?\)",
                      errors[0])
    assert found and float(found[1]) < MAX_REAL_LUNG_L, errors[0]
    row = read_manifest(tmp_path / "out")["siemens"]
    assert (row["status"], row["shape"], row["error"]) == ("failed", "", errors[0])
    assert not (tmp_path / "out" / "siemens.h5").exists()


def _crash_or_succeed(patient_id: str) -> PatientResult:
    """A worker that kills its own process for patient "crash" (importable by spawned workers)."""
    if patient_id == "crash":
        os._exit(3)
    return PatientResult(patient_id, STATUS_OK, 0.1, (1, 1, 1))


def _warn_and_succeed(patient_id: str) -> PatientResult:
    """A worker that logs a warning about its patient (importable by spawned workers)."""
    logging.getLogger("kdsb.io.dicom").warning("%s: two series tie; kept the first", patient_id)
    return PatientResult(patient_id, STATUS_OK, 0.1, (1, 1, 1))


def _crash_or_succeed_slowly(patient_id: str) -> PatientResult:
    """`_crash_or_succeed`, the others taking a while: queued beside the crash, as scans are."""
    if patient_id != "crash":
        time.sleep(0.5)
    return _crash_or_succeed(patient_id)


def test_a_dying_worker_fails_only_its_own_patient():
    tasks = {pid: (pid,) for pid in ("a", "crash", "b", "c")}
    results = {r.patient_id: r for r in run_tasks(tasks, 2, worker=_crash_or_succeed)}
    assert sorted(results) == sorted(tasks)
    # The patient is named on its one line (found in review: the bare message named none).
    assert results["crash"].status == "failed"
    assert results["crash"].error == f"patient crash: {WORKER_DIED_MESSAGE}"
    assert all(results[pid].status == STATUS_OK for pid in ("a", "b", "c"))


def test_a_worker_dying_while_patients_are_submitted_fails_no_one(monkeypatch):
    """Found in review: BrokenProcessPool from `submit` (a worker dead before every patient
    was handed out) escaped as a traceback."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from kdsb.preprocessing import workers

    class BreaksAtTheThird(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.submitted = 0

        def submit(self, *args, **kwargs):
            self.submitted += 1
            if self.submitted == 3:
                raise BrokenProcessPool("a process in the pool was terminated abruptly")
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", BreaksAtTheThird)
    tasks = {pid: (pid,) for pid in ("a", "b", "c", "d")}
    results = {r.patient_id: r for r in run_tasks(tasks, 2, worker=_crash_or_succeed)}
    assert sorted(results) == sorted(tasks)
    assert all(r.status == STATUS_OK for r in results.values())


def _crash_or_meet(patient_id: str, folder: str) -> PatientResult:
    """Like `_crash_or_succeed`; every other patient waits (up to 10 s) for another one to be
    running beside it (a marker file each in `folder`); `detail` says whether one was."""
    if patient_id == "crash":
        os._exit(3)
    mine = Path(folder) / patient_id
    mine.touch()
    met = False
    for _ in range(100):
        if any(path != mine for path in Path(folder).iterdir()):
            met = True
            break
        time.sleep(0.1)
    time.sleep(0.3)  # the other sees this marker too before it goes
    mine.unlink()
    return PatientResult(patient_id, STATUS_OK, 0.1, (1, 1, 1), detail="met" if met else "")


def test_patients_retried_after_a_worker_died_still_run_side_by_side(tmp_path):
    """Each unfinished patient is retried in a process of its own, `workers` at a time (found in
    review: one death made the rest of the cohort run one by one)."""
    tasks = {pid: (pid, str(tmp_path)) for pid in ("crash", "a", "b", "c", "d")}
    results = {r.patient_id: r for r in run_tasks(tasks, 2, worker=_crash_or_meet)}
    assert results["crash"].error == f"patient crash: {WORKER_DIED_MESSAGE}"
    assert all(results[pid].status == STATUS_OK for pid in "abcd")
    assert sum(results[pid].detail == "met" for pid in "abcd") >= 2


def _mark_then_sleep(patient_id: str, folder: str) -> PatientResult:
    """A patient that takes a minute: marks its start in `folder`, then sleeps. Patient "dies"
    kills its worker the first time (its retry then marks and sleeps)."""
    if patient_id == "dies" and not (Path(folder) / "died").exists():
        (Path(folder) / "died").touch()
        os._exit(3)
    (Path(folder) / patient_id).touch()
    time.sleep(60.0)
    return PatientResult(patient_id, STATUS_OK, 60.0, (1, 1, 1))


INTERRUPTED_RUN = """
import signal, sys
# Ctrl-C as a terminal's command gets it: a suite started in the background of a shell without
# job control hands its children SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from kdsb.interrupts import interrupt_on_sigterm
interrupt_on_sigterm()  # as the kdsb command does
from kdsb.preprocessing.workers import run_tasks
from tests.test_cohort import _mark_then_sleep
tasks = {pid: (pid, sys.argv[1]) for pid in sys.argv[2:]}
try:
    list(run_tasks(tasks, 3, worker=_mark_then_sleep))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("patients, started, stop", [
    (("a", "b"), {"a", "b"}, "ctrl-c"),  # two workers busy, the third waits for a task
    (("dies",), {"died", "dies"}, "ctrl-c"),  # the patient's retry, in a pool of its own
    (("a", "b"), {"a", "b"}, "sigterm"),  # `timeout` or `kill`: the main process alone
])
def test_ctrl_c_stops_the_workers_at_once(tmp_path, patients, started, stop):
    """Ctrl-C reaches every process of the terminal's group: the run ends at once, without the
    patients under way, a worker's traceback or a process left behind (found by a user's check:
    an idle worker interrupted in its queue left the run hanging at exit; found in review: a
    retry under way was waited for). SIGTERM to the main process alone does the same (found in
    review: the workers were left writing)."""
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_RUN, str(tmp_path), *patients], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + KILL_WAIT_S
    try:
        while ({p.name for p in tmp_path.iterdir()} != started
               and time.monotonic() < deadline):
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        # The patients under way, not a run still starting (found in review: at the deadline
        # the signal went anyway).
        assert {p.name for p in tmp_path.iterdir()} == started
        time.sleep(0.5)
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    for _ in range(50):  # the forkserver leaves once its parent has gone
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("processes of the interrupted run were left behind")


def _fake_volume(out: Path, pid: str, spacing: tuple[float, float, float], **attrs) -> Path:
    hu = np.zeros((4, 5, 6), np.int16)
    return volumes.write_volume(volumes.volume_path(out, pid), hu, hu + 1, spacing, (0.0, 0.0, 0.0),
                                {"patient_id": pid, **attrs})


@pytest.mark.parametrize(
    "options, stored, message",
    [
        (["--spacing", "2"], {"margin_mm": 10.0}, "spacing [1.0, 1.0, 1.0] mm"),
        (["--margin-mm", "5"], {"margin_mm": 10.0}, "margin 10.0 mm"),
        ([], {}, "an unrecorded margin"),
    ],
)
@pytest.mark.parametrize("written", ["p1", "other_cohort"])
def test_resume_refuses_volumes_of_other_settings(tmp_path, capsys, options, stored, message,
                                                  written):
    """Also a volume of a patient not in INPUT_ROOT (another cohort into the same OUT_DIR:
    found in review, the two spacings mixed without a word)."""
    (tmp_path / "root" / "p1").mkdir(parents=True)
    out = tmp_path / "out"
    path = _fake_volume(out, written, (1.0, 1.0, 1.0), **stored)
    before = path.stat().st_mtime_ns
    assert main(["preprocess", str(tmp_path / "root"), str(out), *options]) == 2
    if written == "other_cohort":  # --overwrite redoes INPUT_ROOT's only: refused as well
        capsys.readouterr()
        assert main(["preprocess", str(tmp_path / "root"), str(out), *options,
                     "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert message in error and "--overwrite" in error and str(path) in error
    assert len(error.strip().splitlines()) == 1
    assert path.stat().st_mtime_ns == before and not (out / "manifest.csv").exists()


def test_resume_skips_volumes_of_the_same_settings(tmp_path):
    (tmp_path / "root" / "p1").mkdir(parents=True)
    out = tmp_path / "out"
    _fake_volume(out, "p1", (2.0, 1.5, 1.5), margin_mm=5.0)
    options = ["--spacing", "2", "1.5", "1.5", "--margin-mm", "5"]
    assert main(["preprocess", str(tmp_path / "root"), str(out), *options]) == 0
    assert read_manifest(out)["p1"]["status"] == "skipped"


def test_resume_redoes_a_patient_whose_source_changed(tmp_path, caplog):
    """Found in review: a volume was kept whatever became of its scan (a cohort drawn again
    with another seed kept the old images beside the new labels)."""
    from kdsb.io.source_stamp import source_stamp

    folder = tmp_path / "root" / "p1"
    folder.mkdir(parents=True)
    (folder / "IM1").write_bytes(b"first scan")
    out = tmp_path / "out"
    _fake_volume(out, "p1", (1.0, 1.0, 1.0), margin_mm=10.0, source_stamp=source_stamp(folder))
    assert main(["preprocess", str(tmp_path / "root"), str(out)]) == 0
    assert read_manifest(out)["p1"]["status"] == "skipped"
    (folder / "IM1").write_bytes(b"other scan")  # same size, written later
    os.utime(folder / "IM1", ns=(1, 10**18))
    with caplog.at_level(logging.WARNING):
        assert main(["preprocess", str(tmp_path / "root"), str(out)]) == 1  # no DICOM: fails
    assert f"p1: {folder} changed since p1.h5 was written" in caplog.text
    assert read_manifest(out)["p1"]["status"] == "failed"
    assert not (out / "p1.h5").exists()  # never the old scan's volume under the new scan's id


def test_hidden_files_in_a_patient_folder_are_no_part_of_it(tmp_path):
    """Found in review: a Finder window opened on a patient folder wrote `.DS_Store` into it,
    its source stamp changed, and the next run preprocessed the patient again."""
    from kdsb.io.folders import files_under
    from kdsb.io.source_stamp import source_stamp

    folder = tmp_path / "p1"
    (folder / "series").mkdir(parents=True)
    (folder / "series" / "IM1").write_bytes(b"slice one")
    (folder / "IM2").write_bytes(b"slice two")
    stamp = source_stamp(folder)
    assert stamp.startswith("2 files, 18 bytes, newest ")
    (folder / ".DS_Store").write_bytes(b"Finder's view")
    (folder / "series" / "._IM1").write_bytes(b"AppleDouble")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_bytes(b"ref")
    (folder / "__MACOSX").mkdir()  # a Mac archive's, unpacked
    (folder / "__MACOSX" / "._IM2").write_bytes(b"AppleDouble")
    assert files_under(folder) == [folder / "IM2", folder / "series" / "IM1"]
    assert source_stamp(folder) == stamp
    # Nor do notes and screenshots beside the scan change it (a user's trial: a README.txt
    # touched redid the patient).
    (folder / "README.TXT").write_text("scanned twice")
    (folder / "series" / "dose_report.png").write_bytes(b"a screenshot")
    assert source_stamp(folder) == stamp
    # A volume stamped by an older kdsb, which counted them, is of the same files (found in
    # review: the first rerun after the change would have redone every such patient).
    from kdsb.io.source_stamp import matches

    older = source_stamp(folder, every_file=True)
    assert older != stamp and matches(older, folder, source_stamp(folder))
    (folder / "IM2").write_bytes(b"slice two, rewritten")
    assert source_stamp(folder) != stamp
    assert not matches(older, folder, source_stamp(folder))
    # Nor is an unpacked archive's __MACOSX a patient (found by a user's trial: it failed as
    # one on every run).
    from kdsb.preprocessing.patients import find_patients

    (tmp_path / "__MACOSX" / "p1").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "p1" / "._IM2").write_bytes(b"AppleDouble")
    assert list(find_patients(tmp_path)) == ["p1"]


def test_a_source_stamp_counts_a_volume_file_and_its_data_file(tmp_path):
    from kdsb.io.source_stamp import source_stamp

    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    (tmp_path / f"{uid}.mhd").write_text("header")
    (tmp_path / f"{uid}.raw").write_bytes(b"12345678")
    (tmp_path / "1.3.6.other.mhd").write_text("another patient")
    stamp = source_stamp(tmp_path / f"{uid}.mhd")
    assert stamp.startswith("2 files, 14 bytes, newest ")
    (tmp_path / "1.3.6.other.mhd").write_text("another patient, rewritten")
    assert source_stamp(tmp_path / f"{uid}.mhd") == stamp
    # Its own volume and QC image written beside it (OUT_DIR or --qc = INPUT_ROOT) are no
    # change of its source (found in review: each run's QC image redid the patient).
    (tmp_path / f"{uid}.h5").write_bytes(b"kdsb volume")
    (tmp_path / f"{uid}.png").write_bytes(b"kdsb QC image")
    assert source_stamp(tmp_path / f"{uid}.mhd") == stamp
    (tmp_path / f"{uid}.raw").write_bytes(b"123456789")
    assert source_stamp(tmp_path / f"{uid}.mhd") != stamp


def test_resume_removes_every_temporary_a_killed_run_left(tmp_path):
    """...and only its own: another command writing into OUT_DIR keeps its file in progress
    (found in review: every `.tmp-*` went)."""
    (tmp_path / "root" / "p1").mkdir(parents=True)
    out = tmp_path / "out"
    _fake_volume(out, "p1", (1.0, 1.0, 1.0), margin_mm=0.0)
    left = [out / ".tmp-8978-manifest.csv", out / ".tmp-8978-p2.h5",
            out / ".tmp-8978-ab12-.kdsb-overwrite-0123456789abcdef.json"]
    others = [out / ".tmp-4242-cd34-submission.csv", out / ".tmp-4242-ef56-reliability.png"]
    for path in left + others:
        path.write_bytes(b"partial")
    options = ["--spacing", "1", "1", "1", "--margin-mm", "0"]
    assert main(["preprocess", str(tmp_path / "root"), str(out), *options]) == 0
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in others)
    assert read_manifest(out)["p1"]["status"] == "skipped"


@pytest.mark.parametrize(("patients", "workers", "threads"), [(3, 2, 2), (1, 2, 4), (5, 8, 1)])
def test_each_worker_gets_its_share_of_the_cores(tmp_path, monkeypatch, patients, workers,
                                                 threads):
    """4 cores: 2 workers of 2 threads; one patient left runs alone on all 4; 8 workers, 1."""
    import kdsb.preprocessing.cohort as cohort

    for i in range(patients):
        (tmp_path / "in" / f"p{i}").mkdir(parents=True)
    seen = {}

    def fake_run_tasks(tasks, pool_size, scheduler=None):
        seen.update(tasks=tasks, pool_size=pool_size)
        return (PatientResult(pid, "failed", error=f"{pid}: not run") for pid in tasks)

    monkeypatch.setattr(cohort, "usable_cores", lambda: 4)
    monkeypatch.setattr(cohort, "run_tasks", fake_run_tasks)
    cohort.run_cohort(tmp_path / "in", tmp_path / "out", workers=workers)
    assert seen["pool_size"] == min(workers, patients)
    assert {task[-1] for task in seen["tasks"].values()} == {threads}


def test_a_dead_worker_s_temporary_is_swept_when_the_run_ends(tmp_path, monkeypatch):
    """A worker that died mid-write leaves its temporary; the run (which holds OUT_DIR) sweeps
    it at its end rather than leaving it to the next run (found by a user's check)."""
    import kdsb.preprocessing.cohort as cohort

    (tmp_path / "in" / "p0").mkdir(parents=True)
    out = tmp_path / "out"

    def dying_then_retried(tasks, pool_size, scheduler=None):
        (out / ".tmp-123-abcd-p0.h5").write_bytes(b"half a volume")
        yield PatientResult("p0", "failed", error="p0: not run")

    monkeypatch.setattr(cohort, "run_tasks", dying_then_retried)
    cohort.run_cohort(tmp_path / "in", out, workers=1)
    assert not list(out.glob(".tmp-*"))


def test_an_unexpected_error_names_a_short_patient_id(monkeypatch, tmp_path):
    """Id "0" occurs in almost any message; the patient is named all the same (found in review:
    a substring test left "index 0 is out of bounds" without the patient)."""
    from kdsb.preprocessing import workers as workers_module

    def broken(*args, **kwargs):
        raise IndexError("index 0 is out of bounds for axis 0 with size 0")

    monkeypatch.setattr(workers_module, "preprocess_patient", broken)
    result = workers_module.preprocess_safely(tmp_path, tmp_path, "0", (1.0,) * 3, 10.0, 1)
    assert result.status == "failed"
    assert result.error.startswith("patient 0: unexpected IndexError: index 0 is out of bounds")


def test_a_second_run_into_the_same_out_dir_is_refused(phantoms, tmp_path, capsys):
    """Two runs writing one OUT_DIR would delete each other's temporaries and manifest rows
    (found in review): the second is refused while the first holds the lock, and runs once the
    first is gone (a killed run leaves no lock)."""
    from kdsb.preprocessing.out_dir import LOCK_NAME

    out = tmp_path / "out"
    out.mkdir()
    with lock_held_elsewhere(out / LOCK_NAME):
        assert main(["preprocess", str(phantoms / "dicom"), str(out)]) == 2
        assert f"expected no other kdsb preprocess writing {out}" in capsys.readouterr().err
        assert not list(out.glob("*.h5")) and not (out / "manifest.csv").exists()
    one = _link_patients(tmp_path / "one", phantoms, _phantom_ids(phantoms)[:1])
    assert main(["preprocess", str(one), str(out)]) == 0
    assert not (out / LOCK_NAME).exists()  # removed as the run ended (a user's trial)


def test_a_file_system_without_locks_runs_unguarded(phantoms, tmp_path, monkeypatch, caplog):
    """NFS without a lock daemon answers ENOLCK: a warning, not "another run holds it"."""
    import errno
    import fcntl
    import logging

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    one = _link_patients(tmp_path / "one", phantoms, _phantom_ids(phantoms)[:1])
    with caplog.at_level(logging.WARNING, logger="kdsb.io.atomic"):
        assert main(["preprocess", str(one), str(tmp_path / "out")]) == 0
    assert "file locks unavailable (No locks available)" in caplog.text


def test_the_default_workers_follow_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """Found in review: os.cpu_count() (the machine's) set the default: a Slurm job of 2 CPUs on
    a 64-core node started 4 workers on its 2 cores. The margin left out is run_cohort's own."""
    import kdsb.preprocessing.cohort

    given = {}
    monkeypatch.setattr(kdsb.preprocessing.cohort, "run_cohort",
                        lambda *args, **kwargs: given.update(kwargs) or 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out")]) == 0
    assert given["workers"] == 2 and "margin_mm" not in given
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out"), "--workers", "3",
                 "--margin-mm", "5"]) == 0
    assert given["workers"] == 3 and given["margin_mm"] == 5.0


def test_a_worker_leaves_when_the_run_is_killed_outright(tmp_path):
    """Found by a user's trial: after `kill -9` of `kdsb preprocess`, its worker (a child of the
    forkserver, which no parent-death signal reaches) went on through its queued patients for
    minutes, writing volumes after the run's lock was gone. A worker now leaves within
    `PARENT_CHECK_SECONDS` of its run's end."""
    from kdsb.preprocessing.workers import PARENT_CHECK_SECONDS

    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code = ("import sys, time\n"
            "from kdsb.preprocessing.workers import exit_with\n"
            f"exit_with({run.pid})\n"
            "print('watching', flush=True)\n"
            "time.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert worker.stdout.readline() == "watching\n"
        time.sleep(2 * PARENT_CHECK_SECONDS)
        assert worker.poll() is None  # the run lives: so does the worker
        run.kill()  # and not reaped yet: a zombie, which `kill(pid, 0)` still finds (review)
        assert worker.wait(timeout=10 * PARENT_CHECK_SECONDS + 5) == 1
    finally:
        for process in (run, worker):
            process.kill()
            process.wait()
