"""Tests for kdsb.phantoms.cohort: storage styles, truth files, labels and the synth command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from kdsb.cli import main
from kdsb.errors import UsageError
from kdsb.io.dicom import read_series
from kdsb.phantoms.anatomy import make_phantom
from kdsb.phantoms.chest import HU_MAX, HU_MIN
from kdsb.phantoms.cohort import (
    SLICE_ORDERS,
    SLOPES,
    STORAGE_STYLES,
    _acquisition,
    _cohort,
    load_truth,
    padding_raw,
    write_cohort,
)
from kdsb.phantoms.dicom_write import Acquisition, _stored_values
from kdsb.phantoms.nodules import CANCER_RADIUS_MM
from tests.locks import lock_held_elsewhere


def test_acquisition_styles_cover_every_storage_and_order():
    styles = [_acquisition(np.random.default_rng(seed)) for seed in range(60)]
    assert {(s["storage"], s["intercept"]) for s in styles} == set(STORAGE_STYLES)
    assert {s["slice_order"] for s in styles} == set(SLICE_ORDERS)
    assert {s["slope"] for s in styles} == {1.0, 0.5}
    assert any(s["shuffle_names"] for s in styles) and not all(s["shuffle_names"] for s in styles)
    assert all(s["padding_value"] == 0 for s in styles if s["storage"] == "uint16")
    json.dumps(styles)  # recorded in the truth JSON


@pytest.mark.parametrize(("storage", "intercept"), STORAGE_STYLES)
@pytest.mark.parametrize("slope", sorted(set(SLOPES)))
def test_padding_value_is_below_every_real_pixel_for_every_storage_style(
    storage, intercept, slope
):
    # Every HU a phantom can write, air (-1000 HU) included, plus two padded pixels.
    hu = np.arange(HU_MIN, HU_MAX + 3, dtype=np.int16).reshape(1, 1, -1)
    padding = np.zeros(hu.shape, bool)
    padding[..., -2:] = True
    raw = padding_raw(storage, slope, intercept)
    acquisition = Acquisition(storage=storage, slope=slope, intercept=intercept, padding_value=raw)
    stored, declared = _stored_values(hu, acquisition, padding)
    assert declared == raw
    assert raw < stored[~padding].min()
    assert raw * slope + intercept < HU_MIN


@pytest.mark.parametrize("scale", [0.7, 0.8, 1.0])
@pytest.mark.parametrize("size", [64, 96, 128])
def test_every_cohort_patient_stores_without_padding_collisions(size, scale):
    """Regression: seed 0, size 128, scale 0.7 once chose a padding value real air takes."""
    seed_patients = {0: 4, 1: 2}  # seed 0's first patient (int16, slope 0.5) once failed
    for seed, patients in seed_patients.items():
        for pid, phantom, acquisition in _cohort(
            patients=patients, seed=seed, size=size, scale=scale
        ):
            mask = np.broadcast_to(phantom.padding_mask, phantom.hu.shape)
            # The exact conversion and padding checks write_ct_series makes before writing.
            _stored_values(phantom.hu, Acquisition(**acquisition), mask)
            assert phantom.hu[~mask].min() >= HU_MIN, pid


def test_cohort_layout_truth_and_dicom_round_trip(tmp_path):
    patients, seed = 5, 11  # this seed's five series use every storage style, flips, shuffling
    labels_csv = write_cohort(tmp_path, patients=patients, seed=seed, size=48, scale=0.5)
    assert labels_csv == tmp_path / "labels.csv"
    with open(labels_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "cancer"]
    ids = [f"phantom_{i:03d}" for i in range(patients)]
    assert [r[0] for r in rows[1:]] == ids
    assert sum(int(r[1]) for r in rows[1:]) == patients // 2
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == ids

    acquisitions = [
        json.loads((tmp_path / "truth" / f"{pid}.json").read_text())["acquisition"] for pid in ids
    ]
    assert len({(a["storage"], a["intercept"]) for a in acquisitions}) == 3
    assert {a["slope"] for a in acquisitions} == {0.5, 1.0}
    assert any(a["shuffle_names"] for a in acquisitions)
    assert any(a["flip_columns"] or a["flip_rows"] for a in acquisitions)

    children = np.random.SeedSequence(seed).spawn(patients)
    for (pid, label), child in zip(rows[1:], children, strict=True):
        truth = load_truth(tmp_path, pid)
        assert truth.label == int(label)
        assert truth.label == int(any(n.radius_mm >= CANCER_RADIUS_MM for n in truth.nodules))
        # The same seed regenerates the phantom that was written.
        phantom = make_phantom(
            np.random.default_rng(child), size=48, cancer=bool(truth.label), scale=0.5
        )
        np.testing.assert_array_equal(truth.lung_mask, phantom.lung_mask)
        assert truth.nodules == phantom.nodules
        series = read_series(tmp_path / "dicom" / pid)
        np.testing.assert_array_equal(series.hu, phantom.hu)
        np.testing.assert_allclose(series.spacing, truth.spacing, atol=1e-4)
        np.testing.assert_allclose(series.origin, truth.origin, atol=1e-4)

    # Deterministic: a second cohort from the same seed has the same truth and labels.
    again = write_cohort(tmp_path / "again", patients=patients, seed=seed, size=48, scale=0.5)
    assert again.read_text() == labels_csv.read_text()
    for pid in ids:
        assert (tmp_path / "again" / "truth" / f"{pid}.json").read_text() == (
            tmp_path / "truth" / f"{pid}.json"
        ).read_text()

    with pytest.raises(UsageError, match="--overwrite"):
        write_cohort(tmp_path, patients=1, seed=seed, size=48, scale=0.5)


def test_cli_writes_a_cohort_and_rejects_bad_options(tmp_path, capsys, caplog):
    out = tmp_path / "cohort"
    code = main(
        ["synth", str(out), "--patients", "2", "--seed", "1", "--size", "40", "--scale", "0.5"]
    )
    assert code == 0
    # Half-size lungs are too small for preprocessing: said per patient (found in review).
    assert "phantom_000: lungs of 0." in caplog.text
    assert "L at --scale 0.5, outside the 0.5–10 L kdsb preprocess accepts" in caplog.text
    assert str(out / "labels.csv") in capsys.readouterr().out
    assert len(list((out / "dicom").iterdir())) == 2
    assert len(list((out / "truth").glob("*.npz"))) == 2
    assert main(["synth", str(out), "--patients", "2"]) == 2  # exists, no --overwrite
    # Another prefix keeps a held-out cohort's ids apart (found by a user's check: evaluate
    # refused --validation ids that were another cohort's patients of the same names).
    held_out = tmp_path / "held_out"
    assert main(["synth", str(held_out), "--patients", "2", "--seed", "5", "--size", "40",
                 "--scale", "0.5", "--id-prefix", "test_2"]) == 0
    # An underscore too, as its own ids have (found by a user's trial: "my_cohort" refused).
    assert sorted(p.name for p in (held_out / "dicom").iterdir()) == ["test_2_000", "test_2_001"]
    assert (held_out / "labels.csv").read_text().splitlines()[1].startswith("test_2_00")
    assert main(["synth", str(tmp_path / "x"), "--id-prefix", "a/b"]) == 2
    assert "expected --id-prefix of letters, digits" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--size", "8"]) == 2
    assert "expected --size" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "y"), "--patients", "0"]) == 2
    assert "expected --patients >= 1, received 0" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # found in review: a NotADirectoryError traceback
    assert main(["synth", str(tmp_path / "a_file"), "--patients", "2"]) == 2
    assert "expected OUT_ROOT, a folder for the cohort, received a file" in capsys.readouterr().err


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_interrupted_cohort_resumes_or_is_replaced(tmp_path, monkeypatch, caplog):
    """labels.csv marks a complete cohort: a run killed part-way leaves none (nor a temporary);
    a rerun with the same options resumes it, byte for byte the cohort an uninterrupted run
    writes, and one with other options replaces it without --overwrite (found by a user's
    check: a killed or failed synth blocked its own retry)."""
    import kdsb.phantoms.cohort

    fresh = tmp_path / "fresh"
    write_cohort(fresh, patients=3, seed=1, size=40, scale=0.5)
    out = tmp_path / "out"
    real_write = kdsb.phantoms.cohort.write_ct_series
    written, die_after = [], [2]

    def write_then_die(*args, **kwargs):
        written.append(args[0].name)
        real_write(*args, **kwargs)
        if len(written) == die_after[0]:  # killed after this series, before its truth record
            raise KeyboardInterrupt

    monkeypatch.setattr(kdsb.phantoms.cohort, "write_ct_series", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_cohort(out, patients=3, seed=1, size=40, scale=0.5)
    assert not (out / "labels.csv").exists()
    assert [p.name for p in out.glob(".*")] == [".kdsb-synth-unfinished"]
    written.clear()
    die_after[0] = None
    with caplog.at_level("INFO"):
        labels_csv = write_cohort(out, patients=3, seed=1, size=40, scale=0.5)
    assert "resuming the unfinished cohort" in caplog.text and "1 patient(s) written" in caplog.text
    assert written == ["phantom_001", "phantom_002"]
    assert labels_csv.read_text().splitlines()[0] == "id,cancer"
    assert not list(out.glob(".*"))
    assert _files(out) == _files(fresh)

    written.clear()
    die_after[0] = 2
    with pytest.raises(KeyboardInterrupt):
        write_cohort(out, patients=3, seed=1, size=40, scale=0.5, overwrite=True)
    monkeypatch.undo()
    write_cohort(out, patients=2, seed=1, size=40, scale=0.5)
    assert "replacing the unfinished cohort" in caplog.text
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["phantom_000", "phantom_001"]


def test_a_dotted_id_prefix_resumes_without_losing_finished_patients(tmp_path, monkeypatch):
    """Ids like v1.2_000 (an --id-prefix with a dot): the resumed run kept no finished patient's
    files but listed them in labels.csv (found in review: ids were cut at the first dot)."""
    import kdsb.phantoms.cohort

    fresh = tmp_path / "fresh"
    write_cohort(fresh, patients=3, seed=1, size=40, scale=0.5, id_prefix="v1.2")
    out = tmp_path / "out"
    real_write = kdsb.phantoms.cohort.write_ct_series
    written = []

    def write_then_die(*args, **kwargs):
        written.append(args[0].name)
        real_write(*args, **kwargs)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(kdsb.phantoms.cohort, "write_ct_series", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_cohort(out, patients=3, seed=1, size=40, scale=0.5, id_prefix="v1.2")
    monkeypatch.undo()
    write_cohort(out, patients=3, seed=1, size=40, scale=0.5, id_prefix="v1.2")
    assert sorted(p.name for p in (out / "dicom").iterdir()) == [
        "v1.2_000", "v1.2_001", "v1.2_002"]
    assert _files(out) == _files(fresh)


def test_a_cohort_still_being_written_is_not_taken_for_an_unfinished_one(tmp_path):
    """The marker is the writing run's lock: a second synth into the same OUT_ROOT is refused
    rather than deleting the first one's files (found in review)."""
    (tmp_path / "dicom" / "phantom_000").mkdir(parents=True)
    (tmp_path / "truth").mkdir()
    marker = tmp_path / ".kdsb-synth-unfinished"
    with lock_held_elsewhere(marker):
        with pytest.raises(UsageError, match="expected no other kdsb synth writing"):
            write_cohort(tmp_path, patients=2, seed=1, size=40, scale=0.5)
        assert (tmp_path / "dicom" / "phantom_000").is_dir()


def test_a_dicom_folder_synth_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / "dicom" / "real_patient").mkdir(parents=True)
    (tmp_path / "labels.csv").write_text("id,cancer\nreal_patient,1\n")
    with pytest.raises(UsageError, match="already holds dicom"):
        write_cohort(tmp_path, patients=2, seed=1, size=40, scale=0.5)
    # Not with --overwrite either (found in review: a real data root would have been deleted).
    with pytest.raises(UsageError, match="expected --overwrite of a cohort kdsb synth wrote, "
                                         "received .* whose dicom, labels.csv has no synth "
                                         "truth/ records beside it: nothing deleted"):
        write_cohort(tmp_path, patients=2, seed=1, size=40, scale=0.5, overwrite=True)
    assert (tmp_path / "dicom" / "real_patient").is_dir()
    assert (tmp_path / "labels.csv").read_text().startswith("id,cancer\nreal_patient")
    # A real cohort's own truth/ annotations are not synth's records (found in review).
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "annotations.json").write_text("{}")
    with pytest.raises(UsageError, match="expected --overwrite of a cohort kdsb synth wrote"):
        write_cohort(tmp_path, patients=2, seed=1, size=40, scale=0.5, overwrite=True)
    assert (tmp_path / "truth" / "annotations.json").is_file()
    assert (tmp_path / "dicom" / "real_patient").is_dir()
