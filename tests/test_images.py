"""NIfTI, MetaImage and NRRD volume files: the reader and `kdsb preprocess` on them."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kdsb.cli import main
from kdsb.errors import UsageError, VolumeFileError
from kdsb.hu import AIR_HU
from kdsb.io import volumes
from kdsb.io.images import read_image
from kdsb.io.volume_files import metaimage_data_file, volume_id, volume_in_folder
from kdsb.phantoms.anatomy import make_phantom
from kdsb.phantoms.dicom_write import write_ct_series
from kdsb.preprocessing.out_dir import read_manifest
from kdsb.preprocessing.patients import find_patients

SMALL = np.full((6, 7, 8), -1000, np.int16)  # (z, y, x) air, for the bad files below

REPO = Path(__file__).resolve().parents[1]
# NIfTI stores spacing and origin as float32: spacings exactly representable in binary keep
# every format on the same grid as DICOM, so the resampled HU can be compared for equality.
PIXEL_MM = 4.5
SIZE = 64
PHANTOM_SCALE = 0.7  # lungs of about 0.6 L: above the 0.5 L a scan must hold
SLICE_MM = 2.0
ORIGIN_ATOL_MM = 0.01
LUNA_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
OUTSIDE_FIELD_HU = -3024  # what many scanners store outside the reconstructed circle
REAL_SHAPE = (191, 167, 233)
REAL_SPACING_MM = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def phantom():
    """A small phantom chest CT with a large nodule, on a float32-exact grid."""
    return make_phantom(np.random.default_rng(0), size=SIZE, cancer=True, scale=PHANTOM_SCALE,
                        fov_mm=SIZE * PIXEL_MM, slice_mm=SLICE_MM)


def write_volume(
    path: Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    *,
    order: Sequence[int] = (0, 1, 2),
    flips: Sequence[int] = (),
) -> Path:
    """Write a canonical (z, y, x) volume with SimpleITK, stored in another axis order.

    The stored array is `hu` flipped along the canonical axes `flips`, then transposed so that
    stored axis a is canonical axis `order[a]`; the direction matrix (LPS), spacing and origin
    written say where each stored voxel lies, so a correct reader recovers `hu` exactly.

    Args:
        path: the file; SimpleITK picks the format from its suffix.
        hu: canonical volume (z, y, x), any numeric dtype.
        spacing: voxel size in mm, (z, y, x).
        origin: patient (LPS) coordinate of canonical voxel [0, 0, 0] in mm, (z, y, x).
        order: canonical axis of each stored NumPy axis.
        flips: canonical axes stored in reverse.
    """
    stored = np.flip(hu, axis=tuple(flips)) if flips else hu
    stored = np.ascontiguousarray(stored.transpose(order))
    image = sitk.GetImageFromArray(stored)
    direction = np.zeros((3, 3))
    index_spacing = []
    for index_axis in range(3):  # ITK index axis d is stored NumPy axis 2 - d
        canonical_axis = order[2 - index_axis]
        direction[2 - canonical_axis, index_axis] = -1.0 if canonical_axis in flips else 1.0
        index_spacing.append(float(spacing[canonical_axis]))
    first = np.array([hu.shape[c] - 1 if c in flips else 0 for c in range(3)])
    corner = np.asarray(origin, dtype=np.float64) + first * np.asarray(spacing)
    image.SetSpacing(index_spacing)
    image.SetOrigin(corner[::-1].tolist())  # LPS (X, Y, Z)
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(path))
    return path


def _kdsb(*args: str) -> subprocess.CompletedProcess:
    """`python -m kdsb ARGS` in a fresh process: its stderr is what a user sees."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kdsb", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


# --- one scan in every format -----------------------------------------------------------------

FORMATS = ("nifti", "nifti_permuted", "metaimage", "metaimage_single", "nrrd", "nrrd_detached",
           "in_folder")


@pytest.fixture(scope="module")
def every_format(phantom, tmp_path_factory):
    """The phantom as DICOM and as every volume format, preprocessed in one run."""
    root = tmp_path_factory.mktemp("formats") / "input"
    hu, spacing, origin = phantom.hu, phantom.spacing, phantom.origin
    write_ct_series(root / "dicom", hu, spacing, origin, patient_id="dicom")
    write_volume(root / "nifti.nii.gz", hu, spacing, origin)
    # Stored as (x, z, y) with x and y reversed: RAS-like axes, permuted.
    write_volume(root / "nifti_permuted.nii", hu, spacing, origin, order=(2, 0, 1), flips=(1, 2))
    write_volume(root / "metaimage.mhd", hu, spacing, origin, order=(0, 2, 1), flips=(0,))
    # Float values off the HU grid are rounded.
    write_volume(root / "metaimage_single.mha", hu.astype(np.float32) + 0.25, spacing, origin)
    # The outside-field value becomes air.
    padded = np.where(phantom.padding_mask[None], np.int16(OUTSIDE_FIELD_HU), hu)
    write_volume(root / "nrrd.nrrd", padded, spacing, origin, flips=(1,))
    # A detached header (.nhdr) beside its data file (.raw): one patient.
    write_volume(root / "nrrd_detached.nhdr", hu, spacing, origin, order=(1, 0, 2))
    (root / "in_folder").mkdir()
    write_volume(root / "in_folder" / "scan.nii.gz", hu, spacing, origin, flips=(2,))
    (root / "in_folder" / "notes.txt").write_text("not DICOM, not a volume")
    (root / "labels.csv").write_text("id,cancer\n")
    out = root.parent / "out"
    status = main(["preprocess", str(root), str(out), "--workers", "2"])
    return status, out


def test_phantom_has_real_padding(phantom):
    assert phantom.padding_mask.any() and (phantom.hu[:, phantom.padding_mask] == AIR_HU).all()


def test_every_format_preprocesses_like_dicom(every_format):
    status, out = every_format
    assert status == 0
    rows = _manifest(out)
    assert sorted(rows) == sorted(["dicom", *FORMATS])  # labels.csv and the .raw are no patients
    assert all(row["status"] == "ok" for row in rows.values()), rows
    reference = volumes.read_volume(out / "dicom.h5")
    assert reference.lung_mask.sum() > 0
    for pid in FORMATS:
        volume = volumes.read_volume(out / f"{pid}.h5")
        np.testing.assert_array_equal(volume.hu, reference.hu, err_msg=pid)
        np.testing.assert_array_equal(volume.lung_mask, reference.lung_mask, err_msg=pid)
        np.testing.assert_allclose(volume.origin, reference.origin, atol=ORIGIN_ATOL_MM,
                                   err_msg=pid)
        assert volume.spacing == reference.spacing
        np.testing.assert_allclose(volume.attrs["source_spacing"],
                                   reference.attrs["source_spacing"], rtol=1e-6, err_msg=pid)
        assert tuple(volume.attrs["source_shape"]) == tuple(reference.attrs["source_shape"])
        assert volume.patient_id == pid
    assert volumes.read_attrs(out / "nifti.h5")["series_uid"] == "file:nifti.nii.gz"
    assert volumes.read_attrs(out / "in_folder.h5")["series_uid"] == "file:scan.nii.gz"


def test_reader_recovers_the_canonical_volume(phantom, tmp_path):
    hu, spacing, origin = phantom.hu, phantom.spacing, phantom.origin
    for index, (order, flips) in enumerate([((2, 1, 0), (0,)), ((1, 0, 2), (0, 1, 2))]):
        path = write_volume(tmp_path / f"scan{index}.nrrd", hu, spacing, origin,
                            order=order, flips=flips)
        series = read_image(path)
        np.testing.assert_array_equal(series.hu, hu)
        assert series.hu.dtype == np.int16 and series.hu.flags.c_contiguous
        assert series.spacing == tuple(spacing)
        np.testing.assert_allclose(series.origin, origin, atol=1e-9)
        assert series.series_uid == f"file:scan{index}.nrrd"


def test_nifti_geometry_reads_as_the_decimals_meant_not_float32_noise(tmp_path):
    """NIfTI keeps spacing and affine in float32 (0.7 is 0.699999988): read as the shortest
    decimal of that float32, they equal what a MetaImage header (text) gives."""
    hu = np.full((4, 5, 6), -800, np.int16)
    # Short decimals, and short binary fractions that float32 holds exactly (347/512 mm).
    for spacing, origin in (((2.5, 0.7, 0.7), (-172.4, -150.3, 12.1)),
                            ((1.25, 0.677734375, 0.677734375), (-174.658203125, 0.5, 12.1))):
        nifti = read_image(write_volume(tmp_path / "a.nii.gz", hu, spacing, origin, flips=(1,)))
        text = read_image(write_volume(tmp_path / "a.mha", hu, spacing, origin, flips=(1,)))
        assert nifti.spacing == text.spacing == spacing
        assert nifti.origin == text.origin
        assert nifti.origin == pytest.approx(origin, abs=1e-9)


def test_float_values_are_rounded_and_clipped(tmp_path):
    values = np.full((3, 4, 5), -1000.0)
    values[0, 0, :] = [-2500.0, -1999.6, 0.49, 40000.0, -0.5]
    series = read_image(write_volume(tmp_path / "f.nii.gz", values, (1, 1, 1), (0, 0, 0)))
    # -2500 is outside the field (air); -1999.6 rounds to -2000, also outside; rint halves to even.
    assert series.hu[0, 0].tolist() == [AIR_HU, AIR_HU, 0, 32767, 0]


# --- LUNA16 layout ----------------------------------------------------------------------------


def test_luna16_folder_uses_the_series_uid_as_id(phantom, tmp_path, caplog):
    subset = tmp_path / "subset0"
    subset.mkdir()
    write_volume(subset / f"{LUNA_UID}.mhd", phantom.hu, phantom.spacing, phantom.origin)
    assert metaimage_data_file(subset / f"{LUNA_UID}.mhd") == subset / f"{LUNA_UID}.raw"
    (subset / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    (subset / ".DS_Store").write_bytes(b"\0" * 8)
    out = tmp_path / "out"
    assert main(["preprocess", str(subset), str(out), "--workers", "1"]) == 0
    rows = read_manifest(out)
    assert list(rows) == [LUNA_UID] and rows[LUNA_UID]["status"] == "ok"
    attrs = volumes.read_attrs(out / f"{LUNA_UID}.h5")
    assert attrs["patient_id"] == LUNA_UID and attrs["series_uid"] == f"file:{LUNA_UID}.mhd"
    # The scan's link left dangling (its disk not mounted, say) beside another patient: it is
    # ignored with a warning, its volume and row kept (found in review: a FileNotFoundError
    # ended the whole run before any work).
    volume_before = (out / f"{LUNA_UID}.h5").read_bytes()
    for name in (f"{LUNA_UID}.mhd", f"{LUNA_UID}.raw"):
        (subset / name).rename(tmp_path / name)
    (subset / f"{LUNA_UID}.mhd").symlink_to(tmp_path / "gone" / f"{LUNA_UID}.mhd")
    write_volume(subset / "other.mhd", phantom.hu, phantom.spacing, phantom.origin)
    caplog.set_level("WARNING")
    assert main(["preprocess", str(subset), str(out), "--workers", "1"]) == 0
    assert f"ignored {LUNA_UID}.mhd, a link to a missing path" in caplog.text
    assert (out / f"{LUNA_UID}.h5").read_bytes() == volume_before
    assert {pid: row["status"] for pid, row in read_manifest(out).items()} == {
        LUNA_UID: "ok", "other": "ok"}


def test_find_patients_lists_folders_and_volume_files(tmp_path, caplog):
    for name in ("a.nii", "b.nii.gz", "c.mhd", "c.raw", "d.mha", "e.NRRD", "g.nhdr", "g.raw.gz",
                 "labels.csv", ".hidden.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "f").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "qc").mkdir()  # a QC folder inside INPUT_ROOT is no patient either
    # Nor a folder holding this run's output deeper (found in review: it failed as a patient
    # on every rerun).
    (tmp_path / "derived" / "vol").mkdir(parents=True)
    # An earlier run's OUT_DIR and QC folder, and images kdsb cannot read, are not patients
    # either, and are named (found in review: they failed as patients, or went unsaid).
    for folder, name in (("vol1mm", "manifest.csv"), ("locked", ".kdsb-preprocess.lock"),
                         ("oldqc", "contact_sheet_001.png")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    for name in ("p2.img", "p2.hdr", "p3.nii.bz2", "h.mhd", "h.img",  # h.img: h.mhd's data
                 "lost.raw"):  # a data file whose header went missing (found by a user's check)
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level("WARNING"):
        patients = find_patients(tmp_path, tmp_path / "out", tmp_path / "qc",
                                 tmp_path / "derived" / "vol", None)
    assert patients == {pid: tmp_path / name for pid, name in [
        ("a", "a.nii"), ("b", "b.nii.gz"), ("c", "c.mhd"), ("d", "d.mha"), ("e", "e.NRRD"),
        ("f", "f"), ("g", "g.nhdr"), ("h", "h.mhd"),
    ]}
    for folder in ("vol1mm", "locked", "oldqc"):
        assert f"ignored {folder}, the output of an earlier kdsb preprocess" in caplog.text
    assert (f"ignored derived, which holds this run's output folder "
            f"{(tmp_path / 'derived' / 'vol').resolve()}") in caplog.text
    assert "ignored 3 file(s) in a format kdsb does not read (p2.hdr, p2.img, p3.nii.bz2)" in \
        caplog.text
    assert ("ignored 1 data file(s) without a MetaImage or NRRD header of their name "
            "(lost.raw): is a .mhd or .nhdr missing?") in caplog.text
    assert "c.raw" not in caplog.text and "g.raw.gz" not in caplog.text


def test_data_files_of_dotted_ids_or_named_by_a_header_are_no_lost_scans(tmp_path, caplog):
    """Found in review: a LUNA16 id's `.raw` (`1.3.6….raw`) was taken for the data of `1.mhd`
    and warned of as headerless, as was a data file a header names by another name."""
    (tmp_path / f"{LUNA_UID}.mhd").write_text(f"ElementDataFile = {LUNA_UID}.raw\n")
    (tmp_path / f"{LUNA_UID}.raw").write_bytes(b"")
    (tmp_path / "scan1.mhd").write_text("NDims = 3\nElementDataFile = data_001.raw\n")
    (tmp_path / "data_001.raw").write_bytes(b"")
    (tmp_path / "scan2.nhdr").write_text("NRRD0004\ndata file: voxels.raw.gz\n\n")
    (tmp_path / "voxels.raw.gz").write_bytes(b"")
    with caplog.at_level("WARNING"):
        patients = find_patients(tmp_path)
    assert sorted(patients) == sorted([LUNA_UID, "scan1", "scan2"])
    assert "ignored" not in caplog.text
    (tmp_path / "scan1.mhd").unlink()  # its data file is now a lost scan's
    with caplog.at_level("WARNING"):
        find_patients(tmp_path)
    assert "without a MetaImage or NRRD header of their name (data_001.raw)" in caplog.text
    assert "notes.txt" not in caplog.text and "labels.csv" not in caplog.text


def test_find_patients_refuses_two_entries_for_one_id(tmp_path):
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1.nii.gz").write_bytes(b"")
    with pytest.raises(UsageError, match="two for p1: p1 and p1.nii.gz"):
        find_patients(tmp_path)


def test_find_patients_refuses_ids_that_differ_only_by_case(tmp_path):
    """Their `<id>.h5` would be one file on a case-insensitive disk (macOS, Windows)."""
    (tmp_path / "P1").mkdir()
    (tmp_path / "p1.nii.gz").write_bytes(b"")
    (tmp_path / "p2").mkdir()
    with pytest.raises(UsageError, match="differ by more than letter case .* received P1 and p1: "
                                         "rename one"):
        find_patients(tmp_path)


@pytest.mark.parametrize("name", [" p1", "p1 ", "p1 .nii.gz"])
def test_find_patients_refuses_ids_with_spaces_at_either_end(tmp_path, name):
    """Found in review: CSV ids are read stripped, so a folder " p1" got a volume whose labels,
    `--ids` and predictions never matched ("received 1 of 1 without one: p1")."""
    (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_bytes(b"")
    (tmp_path / "p 2").mkdir()  # inside: kept
    with pytest.raises(UsageError, match="expected patient ids without leading or trailing "
                                         f"spaces in {tmp_path} .*, received '{name.split('.')[0]}"
                                         "': rename it"):
        find_patients(tmp_path)
    (tmp_path / name).rename(tmp_path / name.replace(" ", ""))
    assert sorted(find_patients(tmp_path)) == ["p 2", "p1"]


def test_dicom_files_in_the_input_root_itself_are_named(tmp_path, caplog):
    """One patient's series passed as INPUT_ROOT: the error says why none was found and what to
    pass instead; beside patient folders such files are ignored with a warning (found by a
    user's check: both were silent)."""
    dicom_preamble = bytes(128) + b"DICM"
    for name in ("IM0001", "IM0002.dcm"):
        (tmp_path / name).write_bytes(dicom_preamble)
    with pytest.raises(UsageError, match=r"received none; 2 DICOM file\(s\) \(IM0001, …\) lie in "
                                         r"it: a patient's series is a sub-folder \(for one "
                                         r"patient, pass the folder above it\)"):
        find_patients(tmp_path)
    (tmp_path / "p1").mkdir()
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # a dangling link is no DICOM file
    os.mkfifo(tmp_path / "fifo")  # nor a FIFO (opening it would block)
    assert find_patients(tmp_path) == {"p1": tmp_path / "p1"}
    assert "ignored 2 DICOM file(s) (IM0001, …) beside the patients" in caplog.text
    # A patient folder's link whose target moved is named, not silently one patient less.
    assert f"ignored gone, a link to a missing path ({tmp_path / 'nowhere'})" in caplog.text
    (tmp_path / "IM0002.dcm").unlink()
    caplog.clear()
    find_patients(tmp_path)
    assert "ignored 1 DICOM file(s) (IM0001) beside" in caplog.text


def test_only_volume_files_give_ids():
    assert volume_id("x/1.2.3.mhd") == "1.2.3"
    assert volume_id("scan.nii.gz") == "scan" and volume_id("scan.nii") == "scan"
    assert volume_id("1.2.3.raw") is None and volume_id("labels.csv") is None
    assert volume_id(".nii.gz") is None


def test_a_folder_with_dicom_is_read_as_dicom(tmp_path):
    hu = np.full((3, 8, 8), -1000, np.int16)
    write_ct_series(tmp_path / "p", hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), patient_id="p")
    write_volume(tmp_path / "p" / "mask.nii.gz", hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert volume_in_folder(tmp_path / "p") is None
    assert volume_in_folder(tmp_path) is None  # no volume file at all


def test_a_folder_with_one_metaimage_is_read_as_it(tmp_path):
    hu = np.full((3, 8, 8), -1000, np.int16)
    header = write_volume(tmp_path / "scan.mhd", hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert volume_in_folder(tmp_path) == header  # its .raw is neither DICOM nor a second volume


def test_a_folder_with_two_volume_files_is_an_error(tmp_path):
    hu = np.full((3, 8, 8), -1000, np.int16)
    for name in ("a.nii", "b.nrrd"):
        write_volume(tmp_path / name, hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(VolumeFileError, match="expected one volume file .* received 2: a.nii"):
        volume_in_folder(tmp_path, patient_id="p")


def test_volume_files_a_folder_too_deep_are_named_as_such(tmp_path):
    """Found by a user's trial: a patient folder whose volume files lay in a sub-folder failed
    with "expected DICOM files, received 2 non-DICOM file(s)" alone."""
    from kdsb.preprocessing.pipeline import read_patient

    hu = np.full((3, 8, 8), -1000, np.int16)
    (tmp_path / "p" / "series").mkdir(parents=True)
    for name in ("a.nii.gz", "b.nii.gz"):
        write_volume(tmp_path / "p" / "series" / name, hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(VolumeFileError, match=r"^patient p: expected its volume file in .*/p "
                                              r"itself, received volume file\(s\) in a "
                                              r"sub-folder only \(series/a.nii.gz, …\)"):
        read_patient(tmp_path / "p", "p")


# --- errors -----------------------------------------------------------------------------------



def _oblique(path: Path) -> Path:
    write_volume(path, SMALL, (1, 1, 1), (0, 0, 0))
    image = sitk.ReadImage(str(path))
    # A rotation about Z: i and j are oblique. 2°: under ~2.6° passed as straight before (found
    # in review).
    angle = np.deg2rad(2.0)
    c, s = np.cos(angle), np.sin(angle)
    image.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    sitk.WriteImage(image, str(path))
    return path


def _missing_raw(path: Path) -> Path:
    write_volume(path, SMALL, (1, 1, 1), (0, 0, 0))
    path.with_suffix(".raw").unlink()
    return path


def _two_d(path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(SMALL[0]), str(path))
    return path


def _four_d(path: Path) -> Path:
    frame = sitk.GetImageFromArray(SMALL)
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    return path


def _one_nan(path: Path) -> Path:
    values = SMALL.astype(np.float32)
    values[2, 3, 4] = np.nan
    return write_volume(path, values, (1, 1, 1), (0, 0, 0))


def _truncated(path: Path) -> Path:
    """A file cut in the middle of its voxels (noise, so that gzip cannot shrink them away)."""
    noise = np.random.default_rng(0).integers(-1000, 1000, (8, 32, 32), dtype=np.int16)
    write_volume(path, noise, (1, 1, 1), (0, 0, 0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_raw(path: Path) -> Path:
    """A `.mhd` whose `.raw` data file holds half its voxels."""
    write_volume(path, np.zeros((8, 32, 32), np.int16), (1, 1, 1), (0, 0, 0))
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[: 8 * 32 * 32])
    return path


def _written_as(name: str):
    """A writer of `SMALL` under the file name `name` (its format), then renamed to the path."""
    return lambda path: write_volume(path.with_name(name), SMALL, (1, 1, 1), (0, 0, 0)).rename(path)


def _garbage_header(path: Path) -> Path:
    path.write_bytes(b"not a MetaImage header\n" * 4)
    return path


def _nifti(path: Path, qform_code: int, sform_code: int, pixdim=(0.7, 0.7, 2.5),
           values: np.ndarray = SMALL) -> Path:
    """`values` (z, y, x) as a NIfTI file (x, y, z voxel axes, RAS) of 0.7 × 0.7 × 2.5 mm
    voxels written by nibabel, with the given codes (both transforms hold those sizes) and
    pixdim."""
    nib = pytest.importorskip("nibabel")
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = (-100.0, -120.0, -300.0)
    image = nib.Nifti1Image(values.transpose(2, 1, 0).copy(), affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header["pixdim"][1:4] = pixdim
    nib.save(image, path)
    return path


def _nifti2(path: Path) -> Path:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti2Image(SMALL.transpose(2, 1, 0).copy(), np.eye(4)), path)
    return path


def _nrrd_without_space(path: Path) -> Path:
    header = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 7 6\nspacings: 0.7 0.7 2.5\n"
              b"encoding: raw\nendian: little\n\n")
    path.write_bytes(header + SMALL.astype("<i2").tobytes())
    return path


def _nrrd_in_scanner_space(path: Path) -> Path:
    header = (b"NRRD0004\ntype: short\ndimension: 3\nspace: scanner-xyz\nsizes: 8 7 6\n"
              b"space directions: (0.7,0,0) (0,0.7,0) (0,0,2.5)\nspace origin: (0,0,0)\n"
              b"encoding: raw\nendian: little\n\n")
    path.write_bytes(header + SMALL.astype("<i2").tobytes())
    return path


def _shifted_hu() -> np.ndarray:
    """A chest stored as HU + 1024 (body 1024, lungs 174) with part of a row of -1024 padding."""
    values = np.full((8, 40, 40), 1024, np.int16)
    values[:, 10:30, 6:18] = 174
    values[0, 0, :10] = -1024
    return values


def _garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


# Writer of a bad file, its name, and what its one-line error must say.
BAD_FILES = {
    "oblique": (_oblique, "oblique.nii.gz", "expected the i axis aligned with a patient axis, "
                                            "received an oblique direction"),
    "not_hu": (lambda p: write_volume(p, (SMALL + 1024).astype(np.uint16), (1, 1, 1), (0, 0, 0)),
               "not_hu.nrrd", "expected a CT in Hounsfield units (air at or below -500 HU in at "
                              "least 1% of the voxels), received values from 24 to 24"),
    # HU + 1024 (an intercept lost) with a row of -1024 padding: the padding alone is dark
    # (found in review: it passed, lungs read as +174 HU).
    "shifted_hu": (lambda p: write_volume(p, _shifted_hu(), (1, 1, 1), (0, 0, 0)),
                   "shifted_hu.mha", "received values from -1024 to 1024, 0.31% of them at or "
                                     "below -500"),
    "missing_raw": (_missing_raw, "missing_raw.mhd",
                    "expected the MetaImage data file missing_raw.raw beside its header, "
                    "received none"),
    "flat": (_two_d, "flat.nii.gz", "expected a 3D image, received a 2D image of 8×7 voxels"),
    "four_d": (_four_d, "four_d.nii.gz",
               "expected a 3D image, received a 4D image of 8×7×6×2 voxels"),
    "vector": (lambda p: sitk.WriteImage(sitk.GetImageFromArray(
        np.zeros((6, 7, 8, 3), np.uint8), isVector=True), str(p)) or p,
        "vector.mha", "expected one integer or real value per voxel, received vector of"),
    "one_slice": (lambda p: write_volume(p, SMALL[:1], (1, 1, 1), (0, 0, 0)), "one_slice.mha",
                  "expected at least 2 voxels along every axis, received 8×7×1"),
    "nan": (_one_nan, "nan.nrrd", "expected finite values, received 1 NaN or infinite voxels"),
    # SimpleITK reads a NIfTI file's NaN as 0 HU (found by a user's check).
    "nan_nifti": (_one_nan, "nan_nifti.nii.gz",
                  "expected finite values, received 1 NaN or infinite voxels"),
    "nan_nii": (_one_nan, "nan_nii.nii",
                "expected finite values, received 1 NaN or infinite voxels"),
    "garbage": (_garbage, "garbage.nii", "expected a readable NIfTI file, received an error:"),
    # Orientation unstated: SimpleITK reads identity directions at origin 0 (found in review).
    "no_codes": (lambda p: _nifti(p, 0, 0), "no_codes.nii.gz",
                 "expected the patient orientation in the NIfTI header (sform_code or qform_code "
                 "above 0), received neither"),
    "no_space": (_nrrd_without_space, "no_space.nrrd",
                 "expected the patient space in the NRRD header (a 'space:' field, e.g. "
                 "left-posterior-superior), received none"),
    # Read as LPS by SimpleITK (found in review).
    "scanner_space": (_nrrd_in_scanner_space, "scanner_space.nrrd",
                      "received scanner-xyz: its orientation is unknown"),
    # SimpleITK took 1 mm voxels from pixdim and the rest from the sform (found in review).
    "pixdim": (lambda p: _nifti(p, 0, 1, pixdim=(1.0, 1.0, 1.0)), "pixdim.nii.gz",
               "expected the NIfTI header's pixdim and its coded sform to agree, received voxel "
               "sizes [1.0, 1.0, 1.0] mm and origin [-100.0, -120.0, -300.0] mm (RAS) as read, "
               "against [0.7, 0.7, 2.5] mm and [-100.0, -120.0, -300.0] mm in the sform"),
    "mixed_case": (_written_as("m.nii.gz"), "mixed_case.Nii.gz",
                   "expected the NIfTI suffix in one case (.nii.gz or .NII.GZ: the NIfTI library "
                   "refuses others), received .Nii.gz: rename the file"),
    # SimpleITK alone would read these two, the missing voxels set to 0.
    "cut_nii": (_truncated, "cut_nii.nii",
                "expected 16736 bytes of NIfTI header and voxels, received 8368"),
    "cut_nii_gz": (_truncated, "cut_nii_gz.nii.gz",
                   "expected a complete gzip-compressed NIfTI file, received a truncated"),
    "cut_mha": (_truncated, "cut_mha.mha",
                "expected 16384 bytes of voxels, received 8045: the MetaImage data is truncated"),
    "cut_raw": (_truncated_raw, "cut_raw.mhd", "expected 16384 bytes of voxels, received 8192: "
                                               "the MetaImage data file cut_raw.raw is truncated"),
    # Found in review: said "truncated or corrupt"; and MetaImage errors carried a stale errno.
    "not_gzipped": (_written_as("plain.nii"), "not_gzipped.nii.gz",
                    "expected gzip-compressed data (the .nii.gz suffix), received an "
                    "uncompressed file: name it .nii or compress it"),
    # SimpleITK said "bad dim[0]", as of a damaged file (found in review).
    "nifti2": (_nifti2, "nifti2.nii.gz", "expected a NIfTI-1 file, received a NIfTI-2 one, which "
                                         "kdsb does not read: save it as NIfTI-1"),
    "garbage_mha": (_garbage_header, "garbage_mha.mha",
                    "garbage_mha.mha for reading (Incomplete file record definition NDims "
                    "required and not defined."),
}


@pytest.mark.parametrize("pid", sorted(BAD_FILES))
def test_bad_files_raise_one_line_errors(tmp_path, pid):
    write, name, reason = BAD_FILES[pid]
    path = write(tmp_path / name)
    with pytest.raises(VolumeFileError) as error:
        read_image(path)
    message = str(error.value)
    assert message.startswith(f"patient {pid}: ") and message.endswith(f"(file {name})")
    assert reason in message and "\n" not in message, message
    assert "itk" not in message.lower().replace("simpleitk", ""), message


def test_a_nifti_file_with_either_transform_coded_reads_with_its_geometry(tmp_path):
    """What `no_codes` and `pixdim` refuse, written right: an sform or a qform alone."""
    marked = SMALL.copy()
    marked[1, 2, 3] = 40
    for qform_code, sform_code in ((1, 0), (0, 1), (1, 2)):
        series = read_image(_nifti(tmp_path / f"q{qform_code}s{sform_code}.nii.gz", qform_code,
                                   sform_code, values=marked))
        assert series.spacing == (2.5, 0.7, 0.7)
        # RAS (-100, -120, -300) is LPS (100, 120, -300); (z, y, x) order.
        assert series.origin == (-300.0, 120.0 - 0.7 * 6, 100.0 - 0.7 * 7)
        np.testing.assert_array_equal(series.hu, marked[:, ::-1, ::-1])  # RAS: y, x flipped


def test_bad_files_fail_in_preprocess_with_exit_1(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    for write, name, _ in BAD_FILES.values():
        write(root / name)
    out = tmp_path / "out"
    process = _kdsb("preprocess", str(root), str(out), "--workers", "2")
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr and "ITK" not in process.stderr, process.stderr
    rows = _manifest(out)
    assert sorted(rows) == sorted(BAD_FILES)
    for pid, (_, name, reason) in BAD_FILES.items():
        row = rows[pid]
        assert row["status"] == "failed" and row["shape"] == ""
        assert reason in row["error"] and name in row["error"], row
        lines = [line for line in process.stderr.splitlines() if f"patient {pid}:" in line]
        assert len(lines) == 1 and "ERROR" in lines[0], (pid, process.stderr)
    assert not list(out.glob("*.h5"))


# --- the real chest CT ------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_chest_nifti_geometry(real_chest_nifti):
    nib = pytest.importorskip("nibabel")
    series = read_image(real_chest_nifti)
    assert series.hu.shape == REAL_SHAPE and series.hu.dtype == np.int16
    assert series.spacing == REAL_SPACING_MM
    image = nib.load(real_chest_nifti)
    ras = image.affine @ np.array([0.0, 0.0, 0.0, 1.0])
    lps = np.array([-ras[0], -ras[1], ras[2]])
    np.testing.assert_allclose(series.origin, lps[::-1], atol=1e-4)
    # This file's voxel axes already run along L, P, S (LPS increasing): its data, transposed to
    # (z, y, x), is the canonical volume.
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(series.hu, np.asarray(image.dataobj).transpose(2, 1, 0))


@pytest.mark.slow
@pytest.mark.realdata
def test_real_chest_nifti_preprocesses(real_chest_nifti, tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    (root / "example_ct.nii.gz").symlink_to(real_chest_nifti)
    out = tmp_path / "out"
    assert main(["preprocess", str(root), str(out), "--workers", "1"]) == 0
    volume = volumes.read_volume(out / "example_ct.h5")
    litres = volume.lung_mask.sum() * np.prod(volume.spacing) / 1e6
    assert 2.0 <= litres <= 8.0
    assert tuple(volume.attrs["source_shape"]) == REAL_SHAPE


def test_native_stderr_blocks_in_two_threads_keep_their_own_text():
    """Dask workers read volumes in threads; fd 2 is the process's (found in review: overlapping
    blocks swapped their text and left stderr on a deleted file)."""
    import threading
    import time

    from kdsb.io.native_stderr import NativeStderr

    before = os.fstat(2)
    entered, left, texts = threading.Event(), threading.Event(), {}

    def read(name: str, first: bool) -> None:
        # Without taking turns: a enters, b enters, a leaves, b leaves.
        if not first:
            entered.wait()
        with NativeStderr() as captured:
            if first:
                entered.set()
                time.sleep(0.2)  # b tries to enter meanwhile
            else:
                left.wait(timeout=2)
            os.write(2, f"complaint of {name}\n".encode())
        if first:
            left.set()
        texts[name] = captured.text

    threads = [threading.Thread(target=read, args=("a", True)),
               threading.Thread(target=read, args=("b", False))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert texts == {"a": "complaint of a", "b": "complaint of b"}
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_the_stamp_of_a_header_counts_the_data_file_it_names(tmp_path):
    """A .mhd or .nhdr may name a data file of another name: rewriting that file changed no
    stamp, so a rerun kept the old volume (found in review)."""
    from kdsb.io.source_stamp import source_stamp
    from kdsb.io.volume_files import detached_data_file

    (tmp_path / "p1.mhd").write_text("NDims = 3\nElementDataFile = scan_0001.raw\n")
    (tmp_path / "p2.nhdr").write_text("NRRD0004\ntype: short\ndata file: scan_0002.raw\n\n")
    for header, data in (("p1.mhd", "scan_0001.raw"), ("p2.nhdr", "scan_0002.raw")):
        assert detached_data_file(tmp_path / header) == tmp_path / data
        (tmp_path / data).write_bytes(b"\0" * 8)
        before = source_stamp(tmp_path / header)
        (tmp_path / data).write_bytes(b"\0" * 16)
        assert source_stamp(tmp_path / header) != before
    assert detached_data_file(tmp_path / "p3.nii.gz") is None
