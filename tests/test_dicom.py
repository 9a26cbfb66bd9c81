"""Tests of kdsb.io.dicom.read_series on written phantom series, broken folders and a real scan."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import generate_uid

import kdsb.io.dicom
from kdsb.errors import DicomError, MissingDecoderError
from kdsb.hu import AIR_HU
from kdsb.io.dicom import read_series
from kdsb.io.series import CTSeries
from kdsb.phantoms.dicom_write import Acquisition, write_ct_series

SHAPE = (6, 10, 12)  # (z, y, x)
SPACING = (2.5, 0.7, 0.8)  # mm, (z, y, x)
ORIGIN = (-120.0, -50.5, -60.25)  # mm, (Z, Y, X)
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture
def hu() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 2000, SHAPE).astype(np.int16)


def _write(folder, hu, *, patient_id="p1", padding_mask=None, **options):
    return write_ct_series(folder, hu, SPACING, ORIGIN, patient_id=patient_id,
                           padding_mask=padding_mask, acquisition=Acquisition(**options))


def _assert_same(series: CTSeries, hu: np.ndarray) -> None:
    assert series.hu.dtype == np.int16
    np.testing.assert_array_equal(series.hu, hu)
    assert series.spacing == SPACING
    assert series.origin == ORIGIN
    assert series.hu.shape == SHAPE


def _edit(path, **attributes):
    """Rewrite one file with some attributes changed (a new SOPInstanceUID when copying)."""
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path)


def _copy_slice(source, target, **attributes):
    shutil.copy(source, target)
    uid = generate_uid()
    _edit(target, SOPInstanceUID=uid, **attributes)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"storage": "uint16"}, {"storage": "uint16", "intercept": -2048.0},
     {"slope": 0.5, "intercept": -1000.0}, {"storage": "int16", "intercept": 0.0},
     {"flip_rows": True}, {"flip_columns": True}, {"flip_rows": True, "flip_columns": True},
     {"slice_order": "descending"}, {"slice_order": "random", "shuffle_names": True, "seed": 3},
     {"photometric": "MONOCHROME1"}, {"compression": "rle", "storage": "uint16"}],
    ids=lambda kwargs: "-".join(f"{k}={v}" for k, v in kwargs.items()) or "default",
)
def test_round_trip(tmp_path, hu, kwargs):
    paths = _write(tmp_path, hu, **kwargs)
    series = read_series(tmp_path)
    _assert_same(series, hu)
    assert series.series_uid == pydicom.dcmread(paths[0]).SeriesInstanceUID


def test_jpeg2000_round_trip(tmp_path):
    hu = np.random.default_rng(1).integers(-1000, 2000, (3, 40, 48)).astype(np.int16)
    write_ct_series(
        tmp_path, hu, SPACING, ORIGIN, patient_id="p",
        acquisition=Acquisition(compression="jpeg2000", flip_rows=True),
    )
    series = read_series(tmp_path)
    np.testing.assert_array_equal(series.hu, hu)
    assert (series.spacing, series.origin) == (SPACING, ORIGIN)


@pytest.mark.parametrize(("storage", "intercept"), [("uint16", -1024.0), ("int16", 0.0)])
def test_unused_high_bits_are_not_part_of_the_value(tmp_path, hu, storage, intercept):
    """BitsStored 12 of 16: the reader (native slices straight from their bytes) ignores the 4
    high bits, whatever they hold, as pydicom's decoder does."""
    paths = _write(tmp_path, hu, storage=storage, intercept=intercept)
    for path in paths:
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array.copy()
        raw = np.frombuffer(ds.PixelData, "<u2")
        ds.PixelData = ((raw & 0x0FFF) | 0xA000).astype("<u2").tobytes()  # garbage high bits
        ds.BitsStored, ds.HighBit = 12, 11
        np.testing.assert_array_equal(ds.pixel_array, expected)  # pydicom's reading of them
        ds.save_as(path)
    _assert_same(read_series(tmp_path), hu)


def test_slope_two_rounds_to_the_nearest_stored_step(tmp_path):
    hu = (np.random.default_rng(2).integers(-500, 1000, SHAPE) * 2).astype(np.int16)
    _write(tmp_path, hu, slope=2.0, intercept=-1024.0, storage="uint16")
    _assert_same(read_series(tmp_path), hu)


def test_order_from_positions_not_instance_numbers(tmp_path, hu):
    paths = _write(tmp_path, hu, shuffle_names=True)
    for path, number in zip(paths, [3, 1, 6, 2, 5, 4], strict=True):
        _edit(path, InstanceNumber=number, SliceLocation=0.0)
    _assert_same(read_series(tmp_path), hu)


def test_spacing_from_positions_not_slice_thickness(tmp_path, hu):
    _write(tmp_path, hu, slice_thickness=5.0)
    assert read_series(tmp_path).spacing[0] == SPACING[0]


def test_feet_first_with_flipped_orientation_matches_ascending(tmp_path, hu):
    _write(tmp_path / "a", hu)
    _write(tmp_path / "b", hu, slice_order="descending", flip_rows=True, shuffle_names=True)
    a, b = read_series(tmp_path / "a"), read_series(tmp_path / "b")
    np.testing.assert_array_equal(a.hu, b.hu)
    assert (a.spacing, a.origin) == (b.spacing, b.origin)


def test_coronal_acquisition_is_transposed(tmp_path, hu):
    # Slice j holds hu[:, j, :]: rows run along +Z, columns along +X, slices along Y.
    coronal = hu.transpose(1, 0, 2)
    paths = write_ct_series(
        tmp_path, coronal, (SPACING[1], SPACING[0], SPACING[2]), (0.0, 0.0, 0.0), patient_id="p",
        acquisition=Acquisition(slice_order="random"),
    )
    z0, y0, x0 = ORIGIN
    for j, path in enumerate(paths):
        _edit(path, ImageOrientationPatient=[1, 0, 0, 0, 0, 1],
              ImagePositionPatient=[x0, y0 + j * SPACING[1], z0])
    series = read_series(tmp_path)
    np.testing.assert_array_equal(series.hu, hu)
    assert (series.spacing, series.origin) == (SPACING, ORIGIN)
    assert series.hu.shape == hu.shape  # canonical (z, y, x), not acquisition order


def test_padding_value_and_outside_field_become_air(tmp_path, hu):
    mask = np.zeros(SHAPE, bool)
    mask[:, :2, :] = True
    expected = np.where(mask, AIR_HU, hu)
    _write(tmp_path / "declared", hu, padding_mask=mask, padding_value=-3000)
    _write(tmp_path / "uint16", hu, padding_mask=mask, padding_value=0, storage="uint16",
           intercept=-1010.0)
    _write(tmp_path / "implicit", hu, padding_mask=mask)
    for name in ("declared", "uint16", "implicit"):
        _assert_same(read_series(tmp_path / name), expected)


def test_a_series_that_lost_its_rescale_is_not_hu_whatever_its_padding(tmp_path):
    """Found in review: its padding (a fifth of each slice outside a round field of view) read
    as air, so a series stored as HU + 1024 with its intercept lost passed as HU and failed
    later as "no air-filled region inside the body"."""
    chest = np.zeros(SHAPE, np.int16)
    chest[:, 3:9, 2:10] = -850  # lungs
    outside = np.zeros(SHAPE, bool)
    outside[:, :3, :] = True  # a quarter of every slice
    paths = _write(tmp_path, chest, padding_mask=outside, padding_value=0, storage="uint16",
                   intercept=-1024.0)
    np.testing.assert_array_equal(read_series(tmp_path).hu, np.where(outside, AIR_HU, chest))
    for path in paths:
        _edit(path, RescaleIntercept=0)
    with pytest.raises(DicomError, match=r"expected a CT in Hounsfield units .* received values "
                                         r"from -1000 to 1024, 0.00% of them at or below -500 "
                                         r"\(padding aside\) \(RescaleSlope / RescaleIntercept "
                                         r"missing\?\)"):
        read_series(tmp_path)


def test_padding_range_limit(tmp_path, hu):
    hu[:, 0, 0] = -1000
    paths = _write(tmp_path, hu, storage="uint16", intercept=-1024.0)
    for path in paths:  # stored 0 … 30 (HU -1024 … -994) declared as padding
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "US", 30)  # PixelPaddingValue, the range's upper end here
        ds.add_new(0x00280121, "US", 0)  # PixelPaddingRangeLimit
        ds.save_as(path)
    stored = hu.astype(int) + 1024
    expected = np.where(stored <= 30, AIR_HU, hu)
    np.testing.assert_array_equal(read_series(tmp_path).hu, expected)


def test_a_padding_value_read_as_unsigned_is_the_signed_one():
    """Found in review: a signed 12-bit series' PixelPaddingValue of -1500 written as US 0xFA24
    (the tag's 16 bits) read as 59940; written in its 12 stored bits (0xA24) it was right."""
    from kdsb.io.dicom.headers import padding_range

    for tag_value in (0xFA24, 0x0A24, -1500):
        ds = pydicom.Dataset()
        ds.BitsStored, ds.PixelRepresentation = 12, 1
        ds.add_new(0x00280120, "SS" if tag_value < 0 else "US", tag_value)
        assert padding_range("p1", ds, Path("a.dcm")) == (-1500, -1500), hex(tag_value)
    # Found in review: a value that is no single whole number was a traceback.
    from kdsb.errors import DicomError

    ds = pydicom.Dataset()
    ds.add_new(0x00280120, "US", [5, 6])
    with pytest.raises(DicomError, match=r"^patient p1: expected a whole PixelPaddingValue and "
                                         r"PixelPaddingRangeLimit, received .* \(file a\.dcm\)$"):
        padding_range("p1", ds, Path("a.dcm"))


def test_every_transfer_syntax_of_a_series_needs_its_decoder(monkeypatch):
    """Found in review: only the first file's syntax was checked; a series mixing syntaxes
    failed later as "truncated or corrupt data", over several lines."""
    from types import SimpleNamespace

    from kdsb.io.dicom import pixels

    checked = []
    monkeypatch.setattr(pixels, "_check_decoder", lambda patient, header: checked.append(
        header.transfer_syntax))
    monkeypatch.setattr(pixels, "_read_slice", lambda *args: 0)
    headers = [SimpleNamespace(transfer_syntax=syntax, rows=2, columns=2, frame=None)
               for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90",
                              "1.2.840.10008.1.2.1")]
    pixels.read_pixels("p1", headers)
    assert checked == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"]


def test_a_series_in_symlinked_sub_folders_is_read(tmp_path, hu):
    """`Path.rglob` does not follow links to folders (found in review: a patient folder of
    links read as empty); a link back up the tree is walked once."""
    _write(tmp_path / "store" / "series", hu)
    patient = tmp_path / "patient"
    patient.mkdir()
    (patient / "series").symlink_to(tmp_path / "store" / "series")
    (patient / "loop").symlink_to(patient)
    _assert_same(read_series(patient), hu)


def test_hu_clipped_into_int16(tmp_path, hu):
    hu[0, 0, 0] = 32000
    paths = _write(tmp_path, hu, storage="uint16", flip_columns=True)
    _assert_same(read_series(tmp_path), hu)
    # Stored 33024 + 1000 exceeds int16. (One slice: a whole series without air below -500 HU
    # is refused as not HU.)
    _edit(paths[0], RescaleIntercept=1000)
    assert read_series(tmp_path).hu[0, 0, 0] == np.iinfo(np.int16).max


def test_localizers_and_smaller_series_are_dropped(tmp_path, hu, caplog):
    paths = _write(tmp_path, hu)
    _write(tmp_path, hu[:4], series_number=2)  # a smaller series
    scout = np.zeros((3, 10, 12), np.int16)
    _write(tmp_path, scout, series_number=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    # A localizer inside the main series, at a new position.
    _copy_slice(paths[0], tmp_path / "scout_in_series.dcm",
                ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                ImagePositionPatient=[-60.25, -50.5, 300.0])
    # An image of another orientation inside the main series.
    _copy_slice(paths[0], tmp_path / "coronal.dcm",
                ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with caplog.at_level(logging.INFO, logger="kdsb.io.dicom"):
        series = read_series(tmp_path)
    _assert_same(series, hu)
    assert series.series_uid == pydicom.dcmread(paths[0]).SeriesInstanceUID
    log = caplog.text
    assert "localizer" in log and "dropped series" in log and "another orientation" in log


def test_series_of_several_patients_in_one_folder_are_refused(tmp_path, hu):
    """A cohort's dicom/ folder given as one patient (found by a user's check: its longest
    series was kept as "patient dicom", the others dropped at INFO)."""
    _write(tmp_path / "a", hu, patient_id="phantom_000")
    _write(tmp_path / "b", hu[:-2], patient_id="phantom_001")
    with pytest.raises(DicomError, match=r"^patient dicom: expected one patient's series in a "
                                         r"patient folder, received CT series of 2 patients "
                                         r"\(PatientID phantom_000, phantom_001\): INPUT_ROOT "
                                         r"is the folder holding one sub-folder per patient$"):
        read_series(tmp_path, patient_id="dicom")


@pytest.mark.parametrize("small_number, big_number", [(1, 2), (2, 1)])
def test_bigger_series_wins_regardless_of_order(tmp_path, hu, small_number, big_number):
    _write(tmp_path, hu[:3], series_number=small_number)
    big = _write(tmp_path, hu, series_number=big_number)
    series = read_series(tmp_path)
    assert series.series_uid == pydicom.dcmread(big[0]).SeriesInstanceUID
    _assert_same(series, hu)


def test_two_series_of_the_same_slices_are_a_warning(tmp_path, hu, caplog):
    """Two reconstructions of one scan (e.g. two kernels) in one folder: one is kept by its
    SeriesInstanceUID, arbitrary for the cohort, so it is said at warning level (review)."""
    first = _write(tmp_path, hu, series_number=1)
    second = _write(tmp_path, hu, series_number=2)
    uids = sorted(pydicom.dcmread(paths[0]).SeriesInstanceUID for paths in (first, second))
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        assert read_series(tmp_path).series_uid == uids[0]
    assert (f"series {uids[0]} and {uids[1]} cover the same {hu.shape[0]} slice positions; kept "
            f"{uids[0]} (the smallest SeriesInstanceUID)") in caplog.text
    # Named by description and kernel where they have them (found by a user's trial: the UIDs
    # alone told a clinician nothing).
    for paths, (description, kernel) in zip((first, second), (("Lung 1.0", ["B70f", "Sharp"]),
                                                              ("Mediastinum", "B30f")),
                                             strict=True):
        for path in paths:
            _edit(path, SeriesDescription=description, ConvolutionKernel=kernel)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        read_series(tmp_path)
    named = {pydicom.dcmread(first[0]).SeriesInstanceUID: "Lung 1.0, kernel B70f/Sharp",
             pydicom.dcmread(second[0]).SeriesInstanceUID: "Mediastinum, kernel B30f"}
    assert (f"series {uids[0]} ({named[uids[0]]}) and {uids[1]} ({named[uids[1]]}) cover the "
            "same") in caplog.text
    # One series without a UID comes first, and is said to (found by a user's trial: "kept the
    # one without a SeriesInstanceUID (the smallest SeriesInstanceUID)").
    for path in second:
        dataset = pydicom.dcmread(path)
        del dataset.SeriesInstanceUID
        dataset.save_as(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        read_series(tmp_path)
    assert ("kept the one without a SeriesInstanceUID (a series without one comes first)"
            in caplog.text), caplog.text


def test_duplicate_slice_kept_once_with_warning(tmp_path, hu, caplog):
    paths = _write(tmp_path, hu)
    _copy_slice(paths[2], tmp_path / "copy.dcm", InstanceNumber=99)
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        _assert_same(read_series(tmp_path), hu)
    assert "already used position dropped" in caplog.text and "copy.dcm" in caplog.text


def test_a_series_held_twice_with_positions_a_hair_apart_reads_once(tmp_path, hu, caplog):
    """Found in review: with every slice duplicated 1e-6 mm away (a re-export beside the
    original), the median gap was the hair itself and the series failed as missing slices."""
    paths = _write(tmp_path, hu)
    for index, path in enumerate(paths):
        position = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
        _copy_slice(path, tmp_path / f"again{index}.dcm", InstanceNumber=100 + index,
                    ImagePositionPatient=[*position[:2], position[2] + 1e-6])
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        _assert_same(read_series(tmp_path), hu)
    assert f"{len(paths)} slice(s) at an already used position dropped" in caplog.text


def test_direction_cosines_written_short_of_unit_length_do_not_scale_the_spacing(tmp_path, hu):
    """Found in review: cosines (0.99, 0, 0), (0, 0.99, 0) gave a slice spacing of 2.45 mm."""
    for path in _write(tmp_path, hu):
        _edit(path, ImageOrientationPatient=[0.99, 0, 0, 0, 0.99, 0])
    series = read_series(tmp_path)
    assert series.spacing == pytest.approx(SPACING, abs=1e-9)
    np.testing.assert_array_equal(series.hu, hu)


def test_a_rescale_error_in_an_enhanced_ct_frame_is_said_once(tmp_path, hu):
    """Found in review: the message of a bad RescaleSlope in a frame's functional group was
    wrapped again as a geometry error, naming the file twice."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag

    ds = _enhanced_ct(hu)
    rescale = Dataset()
    rescale.RescaleIntercept, rescale.RescaleType = "0", "HU"
    # Written as raw bytes: pydicom refuses to set a DS of "abc".
    rescale[0x00281053] = RawDataElement(Tag(0x00281053), "DS", 4, b"abc ", 0, False, True)
    ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence = Sequence([rescale])
    ds.save_as(tmp_path / "enhanced.dcm")
    with pytest.raises(DicomError) as raised:
        read_series(tmp_path)
    message = str(raised.value)
    assert "RescaleSlope" in message and message.count("enhanced.dcm") == 1, message


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_bare_data_sets_without_the_part_10_header_read(tmp_path, hu, implicit_vr):
    """Found in review: files without the 128-byte preamble and "DICM" (older archives) were
    skipped as "not a DICOM file"."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    for path in _write(tmp_path, hu):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
        write_dataset(buffer, ds)
        path.write_bytes(buffer.getvalue())
        assert kdsb.io.dicom.is_dicom_file(path) and not pydicom.misc.is_dicom(path)
    _assert_same(read_series(tmp_path), hu)


def test_a_bare_data_set_is_told_from_other_binary_files(tmp_path, hu, caplog):
    for voxels in ([8, 5, -1000, -1000], [8, 5, 0, 0]):  # a MetaImage's voxels (group 0008?)
        raw = tmp_path / "volume.raw"
        raw.write_bytes(np.array(voxels + [0] * 40, "<i2").tobytes())
        assert not kdsb.io.dicom.is_dicom_file(raw), voxels
    # One that looks like a bare data set's first element but holds none is skipped as no
    # DICOM, beside a series (found in review: it failed the patient as a truncated file).
    _write(tmp_path / "series", hu)
    stray = tmp_path / "series" / "stray.bin"
    stray.write_bytes(b"\x08\x00\x05\x00\x04\x00\x00\x00ABCD" + bytes(range(256)) * 4)
    assert kdsb.io.dicom.is_dicom_file(stray)
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        _assert_same(read_series(tmp_path / "series"), hu)
    assert "skipping 1 file(s) that are not DICOM (stray.bin)" in caplog.text
    text = tmp_path / "labels.csv"
    text.write_text("id,cancer\n")
    assert not kdsb.io.dicom.is_dicom_file(text)
    assert not kdsb.io.dicom.is_dicom_file(tmp_path / "missing.dcm")


def test_of_slices_a_hair_apart_the_lowest_instance_number_is_kept(tmp_path, hu):
    """Found in review: a copy 0.001 mm below its slice, of a higher InstanceNumber and other
    values, replaced it (position came before InstanceNumber)."""
    paths = _write(tmp_path, hu)
    original = pydicom.dcmread(paths[2])
    position = [float(v) for v in original.ImagePositionPatient]
    _copy_slice(paths[2], tmp_path / "copy.dcm", InstanceNumber=int(original.InstanceNumber) + 50,
                ImagePositionPatient=[*position[:2], position[2] - 0.001],
                RescaleIntercept=float(original.RescaleIntercept) + 7)
    _assert_same(read_series(tmp_path), hu)


def _count_reads(monkeypatch) -> Counter:
    """Count pydicom.dcmread calls per file name (full reads and header-only reads)."""
    reads = Counter()
    original = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads[(path.name, kwargs.get("stop_before_pixels", False))] += 1
        return original(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return reads


def test_each_file_is_read_once_and_only_the_chosen_series_decoded(tmp_path, hu, monkeypatch):
    paths = _write(tmp_path, hu)
    scout = _write(tmp_path, hu[:2], series_number=2, image_type=("ORIGINAL", "LOCALIZER"))
    # Damaged pixel data in a dropped series is never decoded, so it is no error.
    scout[0].write_bytes(scout[0].read_bytes()[:-100])
    reads = _count_reads(monkeypatch)
    _assert_same(read_series(tmp_path), hu)
    assert reads == Counter({(p.name, False): 1 for p in [*paths, *scout]})


def test_files_past_the_cache_budget_are_read_again(tmp_path, hu, monkeypatch):
    paths = _write(tmp_path, hu)
    budget = sum(p.stat().st_size for p in paths[:2])
    monkeypatch.setattr(kdsb.io.dicom.headers, "CACHE_BYTES", budget)
    reads = _count_reads(monkeypatch)
    _assert_same(read_series(tmp_path), hu)
    assert reads == Counter({(p.name, False): 1 for p in paths[:2]}) + Counter(
        {(p.name, stop): 1 for p in paths[2:] for stop in (True, False)}
    )


def test_missing_slice(tmp_path, hu):
    paths = _write(tmp_path, hu)
    paths[3].unlink()
    expected = r"patient p7: .*CT001_00003\.dcm and CT001_00005\.dcm: missing slice"
    with pytest.raises(DicomError, match=expected):
        read_series(tmp_path, patient_id="p7")


def test_small_spacing_irregularity_is_absorbed(tmp_path, hu):
    paths = _write(tmp_path, hu)
    _edit(paths[2], ImagePositionPatient=[-60.25, -50.5, -120.0 + 2 * 2.5 + 0.2])
    _assert_same(read_series(tmp_path), hu)


def test_uneven_spacing(tmp_path, hu):
    paths = _write(tmp_path, hu)
    _edit(paths[2], ImagePositionPatient=[-60.25, -50.5, -120.0 + 2 * 2.5 + 0.9])
    with pytest.raises(DicomError, match="uneven spacing.*CT001_00003"):
        read_series(tmp_path)


def test_gantry_tilt(tmp_path, hu):
    paths = _write(tmp_path, hu)
    for k, path in enumerate(paths):  # 15° tilt: y shifts by tan(15°) × z
        _edit(path, ImagePositionPatient=[-60.25, -50.5 + k * 2.5 * 0.268, -120.0 + k * 2.5])
    with pytest.raises(DicomError, match="gantry tilt"):
        read_series(tmp_path)


@pytest.mark.parametrize("degrees", [10.0, 2.5, 1.0])
def test_oblique_orientation(tmp_path, hu, degrees):
    """Also slightly oblique: found in review, up to ~2.6° passed as straight (the main component
    of a cosine stays within 1e-3 of 1 that far), 15 mm off at a 512-pixel image's far corner."""
    paths = _write(tmp_path, hu)
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    for path in paths:
        _edit(path, ImageOrientationPatient=[c, s, 0, -s, c, 0])
    with pytest.raises(DicomError, match="oblique"):
        read_series(tmp_path)


def test_rounding_noise_in_the_direction_cosines_is_not_oblique(tmp_path, hu):
    paths = _write(tmp_path, hu)
    c, s = np.cos(np.radians(0.01)), np.sin(np.radians(0.01))
    for path in paths:
        _edit(path, ImageOrientationPatient=[c, s, 0, -s, c, 0])
    np.testing.assert_array_equal(read_series(tmp_path).hu, hu)


def test_a_series_without_its_rescale_is_not_taken_for_hu(tmp_path, hu):
    """Found in review: unsigned values without their intercept (air at +24) were read as HU;
    volume files were already refused."""
    paths = _write(tmp_path, hu, storage="uint16")
    for path in paths:
        _edit(path, RescaleIntercept=0)
    with pytest.raises(DicomError, match=r"^patient p1: expected a CT in Hounsfield units \(air "
                                         r"at or below -500 HU in at least 1% of the voxels\), "
                                         r"received values from 24 to"):
        read_series(tmp_path, "p1")


def test_a_malformed_rescale_names_the_file(tmp_path, hu):
    """Found in review: a bare ValueError ("could not convert string to float")."""
    paths = _write(tmp_path, hu, slope=0.4375)
    data = paths[2].read_bytes()
    assert b"0.4375" in data
    paths[2].write_bytes(data.replace(b"0.4375", b"abcdef"))
    with pytest.raises(DicomError, match=rf"patient p1: expected a numeric RescaleSlope and "
                                         rf"RescaleIntercept, .*\(file {paths[2].name}\)"):
        read_series(tmp_path, "p1")


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="patient empty: expected DICOM files, .*empty folder"):
        read_series(tmp_path / "empty")
    with pytest.raises(DicomError, match="patient nope: expected a folder"):
        read_series(tmp_path / "nope")


def test_no_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DicomError, match=r"expected DICOM files, received 2 non-DICOM .*noise"):
        read_series(tmp_path, patient_id="p2")


def test_non_dicom_files_are_skipped_with_a_warning(tmp_path, hu, caplog):
    _write(tmp_path, hu)
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="kdsb.io.dicom"):
        _assert_same(read_series(tmp_path), hu)
    skipped = [r.getMessage() for r in caplog.records if "not DICOM" in r.getMessage()]
    assert len(skipped) == 1 and "skipping 2 file(s) that are not DICOM (" in skipped[0]
    assert "random.bin" in skipped[0] and "README" in skipped[0]


@pytest.mark.parametrize("keep_bytes", [300, 700, -200])
def test_truncated_file(tmp_path, hu, keep_bytes):
    paths = _write(tmp_path, hu)
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[:keep_bytes])
    with pytest.raises(DicomError, match=r"patient p1: .*(truncated|corrupt).*CT001_00005\.dcm"):
        read_series(tmp_path, patient_id="p1")


@pytest.mark.realdata
def test_a_file_cut_in_its_pixel_data_gives_only_kdsb_s_error(real_ct_dicom_dir, tmp_path,
                                                              caplog):
    """pydicom's own warning and log line about the cut file (one with a source line) stay off
    the terminal: the error names the file (found by a user's check)."""
    import shutil
    import warnings

    folder = tmp_path / "p1"
    shutil.copytree(real_ct_dicom_dir, folder)
    cut = sorted(folder.iterdir())[4]
    cut.write_bytes(cut.read_bytes()[:50_000])  # inside the JPEG 2000 fragments
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomError, match=rf"patient p1: .*ends early.*{cut.name}"):
            read_series(folder, patient_id="p1")
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pydicom")] == []


def test_no_pixel_data(tmp_path, hu):
    paths = _write(tmp_path, hu)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    with pytest.raises(DicomError, match="expected pixel data.*CT001_00001"):
        read_series(tmp_path)


def test_objects_without_images_only(tmp_path, hu):
    paths = _write(tmp_path, hu[:2])
    for path in paths:
        ds = pydicom.dcmread(path)
        for name in ("PixelData", "Rows", "Columns"):
            delattr(ds, name)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
        ds.save_as(path)
    with pytest.raises(DicomError, match="only DICOM objects without an image"):
        read_series(tmp_path)


def test_single_slice(tmp_path, hu):
    _write(tmp_path, hu[:1])
    with pytest.raises(DicomError, match="expected at least 2 slices.*received 1"):
        read_series(tmp_path)


def test_non_ct_modality(tmp_path, hu):
    _write(tmp_path, hu, modality="MR")
    with pytest.raises(DicomError, match="patient p3: expected modality CT, received MR"):
        read_series(tmp_path, patient_id="p3")


def test_only_localizers(tmp_path, hu):
    _write(tmp_path, hu[:2], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(DicomError, match="only localizer"):
        read_series(tmp_path)


def test_slices_of_different_sizes(tmp_path, hu):
    paths = _write(tmp_path, hu)
    uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    extra = np.zeros((1, 8, 12), np.int16)
    write_ct_series(
        tmp_path / "x", extra, SPACING, (ORIGIN[0] + 6 * 2.5, *ORIGIN[1:]), patient_id="p1",
        acquisition=Acquisition(series_uid=uid),
    )
    shutil.move(tmp_path / "x" / "CT001_00001.dcm", tmp_path / "small.dcm")
    shutil.rmtree(tmp_path / "x")
    with pytest.raises(DicomError, match=r"10×12 pixels.*received 8×12.*small\.dcm"):
        read_series(tmp_path)


def test_rejects_colour_images(tmp_path, hu):
    paths = _write(tmp_path, hu)
    for path in paths:
        _edit(path, PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(DicomError, match="MONOCHROME1/2"):
        read_series(tmp_path)


# --- real data: a 20-slice Siemens JPEG 2000 series ---------------------------------------


@pytest.mark.realdata
def test_real_series(real_ct_dicom_dir, tmp_path):
    series = read_series(real_ct_dicom_dir)
    assert series.hu.shape == (20, 512, 512) and series.hu.dtype == np.int16
    headers = [pydicom.dcmread(p, stop_before_pixels=True)
               for p in sorted(real_ct_dicom_dir.iterdir())]
    lowest = min(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))
    x, y, z = (float(v) for v in lowest.ImagePositionPatient)
    assert series.origin == pytest.approx((z, y, x))
    pixel = float(lowest.PixelSpacing[0])
    assert series.spacing == pytest.approx((2.0, pixel, pixel))
    assert series.series_uid == lowest.SeriesInstanceUID
    # Plausible HU: air outside the body, soft tissue inside it.
    assert -1100 <= series.hu.min() <= -900
    corner = series.hu[:, :20, :20]
    assert abs(np.median(corner) - AIR_HU) < 60
    assert np.mean((series.hu > -100) & (series.hu < 100)) > 0.05
    # The canonical slice 0 is the lowest slice's pixels (axial, unflipped acquisition).
    pixels = pydicom.dcmread(lowest.filename).pixel_array
    expected = pixels * float(lowest.RescaleSlope) + float(lowest.RescaleIntercept)
    np.testing.assert_array_equal(series.hu[0], expected)

    rng = np.random.default_rng(0)
    for source in sorted(real_ct_dicom_dir.iterdir()):
        shutil.copy(source, tmp_path / rng.bytes(6).hex())
    shuffled = read_series(tmp_path)
    np.testing.assert_array_equal(shuffled.hu, series.hu)
    assert (shuffled.spacing, shuffled.origin) == (series.spacing, series.origin)


def test_missing_decoder_names_the_package(tmp_path, monkeypatch):
    """On a JPEG 2000 series written here, so it runs offline too (the real one below)."""
    hu = np.random.default_rng(1).integers(-1000, 2000, (2, 40, 48)).astype(np.int16)
    write_ct_series(tmp_path, hu, SPACING, ORIGIN, patient_id="p",
                    acquisition=Acquisition(compression="jpeg2000"))
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(MissingDecoderError, match="install pylibjpeg-openjpeg"):
        read_series(tmp_path, patient_id="p")


@pytest.mark.realdata
def test_missing_decoder_names_the_package_on_real_files(real_ct_dicom_dir, monkeypatch):
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(MissingDecoderError, match="install pylibjpeg-openjpeg"):
        read_series(real_ct_dicom_dir, patient_id="real")


def _enhanced_ct_template():
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("pydicom-data's Enhanced CT file unavailable")
    return path


def test_real_enhanced_ct_file_reads_every_frame(tmp_path):
    """pydicom-data's 2-frame Enhanced CT (Siemens perfusion): geometry from the functional
    groups (shared orientation, spacing and rescale; per-frame positions)."""
    shutil.copy(_enhanced_ct_template(), tmp_path / "ect.dcm")
    series = read_series(tmp_path, "ect")
    ds = pydicom.dcmread(tmp_path / "ect.dcm")
    assert series.hu.shape == (2, 512, 512) and series.spacing == (10.0, 0.388672, 0.388672)
    # Rows run +Y, columns -X (row cosine (-1, 0, 0)): the canonical x axis is flipped.
    np.testing.assert_array_equal(series.hu, ds.pixel_array.astype(int)[:, :, ::-1] - 1024)
    np.testing.assert_allclose(series.origin, (-159.0, -301.5, 99.5 - 511 * 0.388672))


ENHANCED_SPACING, ENHANCED_ORIGIN = (2.5, 0.75, 0.8), (-200.0, -120.0, -150.0)


def _enhanced_ct(hu: np.ndarray) -> pydicom.Dataset:
    """`hu` as one Enhanced CT dataset: the real file's functional groups, new pixels and
    per-frame positions, frames in reverse order."""
    ds = pydicom.dcmread(_enhanced_ct_template())
    spacing, origin = ENHANCED_SPACING, ENHANCED_ORIGIN
    nz, ny, nx = hu.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence[0].PixelSpacing = [spacing[1], spacing[2]]
    template = ds.PerFrameFunctionalGroupsSequence[0]
    frames = []
    for k in reversed(range(nz)):
        item = pydicom.Dataset()
        item.PlanePositionSequence = [pydicom.Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [
            origin[2], origin[1], origin[0] + k * spacing[0]]
        item.FrameContentSequence = template.FrameContentSequence
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = (hu[::-1].astype(np.int32) + 1024).astype(np.uint16).tobytes()
    return ds


def test_enhanced_ct_frames_in_any_order_read_back_exactly(tmp_path, hu):
    """A volume written as one Enhanced CT file reads back voxel for voxel."""
    (tmp_path / "enhanced").mkdir()
    _enhanced_ct(hu).save_as(tmp_path / "enhanced" / "volume.dcm")
    series = read_series(tmp_path / "enhanced", "enhanced")
    np.testing.assert_array_equal(series.hu, hu)
    assert series.spacing == ENHANCED_SPACING and series.origin == ENHANCED_ORIGIN


def test_enhanced_ct_with_its_rescale_and_padding_at_the_top_level(tmp_path, hu):
    """Found in review: a rescale only at the file's top level was ignored (raw values read as
    HU), and PixelPaddingValue was ignored in Enhanced CT files."""
    ds = _enhanced_ct(hu)
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    stored = (hu[::-1].astype(np.int32) + 1024).astype(np.uint16)
    stored[-1, 0, 0] = 5  # frame 0 of the file is the last slice: its corner is padding
    ds.add_new(0x00280120, "US", 5)  # PixelPaddingValue
    ds.PixelData = stored.tobytes()
    (tmp_path / "enhanced").mkdir()
    ds.save_as(tmp_path / "enhanced" / "volume.dcm")
    expected = hu.copy()
    expected[0, 0, 0] = -1000
    np.testing.assert_array_equal(read_series(tmp_path / "enhanced", "enhanced").hu, expected)


def test_a_pixel_spacing_of_three_values_names_the_file(tmp_path, hu):
    """Found in review: it failed as "unexpected ValueError: too many values to unpack"."""
    paths = _write(tmp_path, hu)
    ds = pydicom.dcmread(paths[2])
    ds.PixelSpacing = [0.7, 0.7, 0.7]
    ds.save_as(paths[2])
    with pytest.raises(DicomError, match=r"patient p1: expected PixelSpacing of two positive "
                       r"numbers \(row, column mm\), received \[0\.7, 0\.7, 0\.7\] "
                       r"\(file CT001_00003"):
        read_series(tmp_path, patient_id="p1")


def test_without_the_real_scans_their_tests_skip_or_fail_where_required(monkeypatch):
    from _pytest.outcomes import Failed, Skipped

    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "reference_files", lambda: None)
    monkeypatch.delenv("KDSB_REQUIRE_REALDATA", raising=False)
    with pytest.raises(Skipped, match="real CT reference files unavailable"):
        conftest._reference_files_or_skip()
    monkeypatch.setenv("KDSB_REQUIRE_REALDATA", "1")
    with pytest.raises(Failed, match="and KDSB_REQUIRE_REALDATA=1"):
        conftest._reference_files_or_skip()


def _as_ct_series(folder, template, slices=3):
    """`slices` CT files of one compressed image of pydicom-data (kept compressed), 2.5 mm
    apart, HU = stored value − 1024."""
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file(template)
    if path is None:
        pytest.skip(f"pydicom-data's {template} unavailable")
    folder.mkdir()
    series_uid = generate_uid()
    for k in range(slices):
        ds = pydicom.dcmread(path)
        ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", "p", series_uid
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.ImageType = k + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.5 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.5, 0.5], 1, -1024
        ds.save_as(folder / f"im{k}.dcm")
    return path


@pytest.mark.parametrize("template, reference", [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS, 16-bit signed
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),  # lossless JPEG (process 14), 8-bit
])
def test_jpeg_ls_and_lossless_jpeg_series_decode(tmp_path, template, reference):
    """README names JPEG-LS and lossless JPEG among the decoded syntaxes (found in review:
    only JPEG 2000 and RLE were tested). The JPEG-LS image against its uncompressed twin."""
    path = _as_ct_series(tmp_path / "series", template)
    if reference is None:
        stored = pydicom.dcmread(path).pixel_array
    else:
        stored = pydicom.dcmread(pydicom.data.get_testdata_file(reference)).pixel_array
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID != \
            pydicom.dcmread(pydicom.data.get_testdata_file(reference)).file_meta.TransferSyntaxUID
    series = read_series(tmp_path / "series", "p")
    assert series.hu.shape == (3, *stored.shape) and series.spacing == (2.5, 0.5, 0.5)
    for k in range(3):
        np.testing.assert_array_equal(series.hu[k], stored.astype(np.int32) - 1024)
