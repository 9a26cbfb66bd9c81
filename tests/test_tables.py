"""Tests of kdsb.io.tables: reading labels, predictions and id lists, and their error messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kdsb.errors import LabelsError
from kdsb.io.tables import (
    check_labels_match,
    read_ids,
    read_labels,
    read_predictions,
    write_predictions,
)


def _write(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_labels_keeps_file_order_and_accepts_swapped_columns(tmp_path):
    path = _write(tmp_path, "cancer,id\n1,b\n0,a\n\n0,c\n")
    assert read_labels(path) == {"b": 1, "a": 0, "c": 0}
    assert list(read_labels(path)) == ["b", "a", "c"]


def test_read_labels_takes_a_capitalised_header_and_labels_written_as_floats(tmp_path):
    """Found by a user's check: pandas writes `1.0` for a float column, other tools `ID,Cancer`."""
    path = _write(tmp_path, "ID,Cancer\nb,1.0\na,0.0\nc,1\n")
    assert read_labels(path) == {"b": 1, "a": 0, "c": 1}


def test_read_labels_ignores_other_columns_with_a_note(tmp_path, caplog):
    # Kaggle's solution files carry a Usage column beside id and cancer.
    path = tmp_path / "solution.csv"
    path.write_text("id,cancer,Usage\nx,1,Public\ny,0,Private\n")
    with caplog.at_level(logging.INFO, logger="kdsb.io.tables"):
        assert read_labels(path) == {"x": 1, "y": 0}
    assert "column(s) Usage ignored" in caplog.text
    path.write_text("id,cancer,Usage\nx,1\n")
    with pytest.raises(LabelsError, match="line 2: expected 3 comma-separated values"):
        read_labels(path)


def test_read_labels_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("id,cancer\nx,1\n".encode("utf-8-sig"))
    assert read_labels(path) == {"x": 1}


def test_a_csv_that_is_not_utf8_says_so(tmp_path):
    """Found by a user's check: "'utf-8' codec can't decode byte 0xeb…" alone."""
    path = tmp_path / "labels.csv"
    path.write_bytes("id,cancer\nAnnë,1\n".encode("latin-1"))
    with pytest.raises(LabelsError, match=r"labels.csv: expected a UTF-8 text CSV, received "
                                          r"byte 0xeb, which is not UTF-8: save"):
        read_labels(path)


def test_read_labels_accepts_a_spreadsheets_trailing_commas(tmp_path):
    """Found in review: `id,cancer,,` was refused as a repeated column ''; a row's empty
    trailing cells as a wrong count."""
    path = _write(tmp_path, "id,cancer,,\na,1,,\nb,0\nc,1,\n")
    assert read_labels(path) == {"a": 1, "b": 0, "c": 1}
    path = _write(tmp_path, "id,cancer\na,1,\nb,0,,\n")
    assert read_labels(path) == {"a": 1, "b": 0}
    path = _write(tmp_path, "id,cancer\na,1,x\n")
    with pytest.raises(LabelsError, match="line 2: expected 2 comma-separated values, received 3"):
        read_labels(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "expected a header line, received an empty file"),
        ("a,1\nb,0\n", r"expected a header with column\(s\) id, cancer, received 'a,1'"),
        ("id,label\na,1\n", "missing cancer"),
        ("id,cancer\na,1\nb\n", "line 3: expected 2 comma-separated values, received 1"),
        ("id,cancer\na,1\nb,0\na,0\n", "line 4: expected each id once, received a again"),
        ("id,cancer\na,1\nb,2\n", "line 3: expected a label 0 or 1 for b, received '2'"),
        ("id,cancer\na,yes\n", "line 2: expected a label 0 or 1 for a, received 'yes'"),
        # Blank lines count (found in review: this said line 3).
        ("id,cancer\n\n\na,1\nb,2\n", "line 5: expected a label 0 or 1 for b, received '2'"),
        ("id,cancer\n,1\n", "line 2: expected a patient id, received ''"),
        # Found in review: a repeated column was read from its first copy; a quoted line break
        # in an id split error messages over two lines.
        ("id,cancer,cancer\na,1,0\n", "expected each column once in the header, received "
                                       "'id,cancer,cancer' \\('cancer' repeated\\)"),
        ('id,cancer\n"a\nb",1\n', "line 3: expected a patient id usable as a file name "
                                   "\\(no '/' or control characters\\), received 'a\\\\nb'"),
        ("id,cancer\nsub/a,1\n", "line 2: expected a patient id usable as a file name"),
        ("id,cancer\n", "expected at least one labelled patient, received none"),
    ],
)
def test_read_labels_errors_name_the_problem(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(LabelsError, match=match):
        read_labels(path)


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(LabelsError, match="expected a CSV file, received a missing path"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(LabelsError, match="expected a CSV file, received a folder: "):
        read_labels(tmp_path)


def test_read_ids_reads_only_the_id_column_in_order(tmp_path):
    path = _write(tmp_path, "id,cancer\nz,0.5\na,0.5\nm,0.5\n", "sample.csv")
    assert read_ids(path) == ["z", "a", "m"]
    with pytest.raises(LabelsError, match="missing id"):
        read_ids(_write(tmp_path, "patient\nx\n", "bad.csv"))
    with pytest.raises(LabelsError, match="line 3: expected each id once, received z again"):
        read_ids(_write(tmp_path, "id\nz\nz\n", "dup.csv"))
    with pytest.raises(LabelsError, match="line 2: expected a patient id usable as a file name"):
        read_ids(_write(tmp_path, "id\n../z\n", "path.csv"))
    with pytest.raises(LabelsError, match="'id' repeated"):
        read_ids(_write(tmp_path, "id,id\nz,y\n", "twice.csv"))


def test_check_labels_match_errors_and_warning(tmp_path, caplog):
    labels = {"a": 0, "b": 1, "c": 1}
    assert check_labels_match(labels, ["c", "b", "a"]) == ["a", "b", "c"]
    with pytest.raises(
        LabelsError,
        match=r"expected a volume in data for every labelled id, received 1 of 3 without one: c",
    ):
        check_labels_match(labels, ["a", "b"], labels_path="l.csv", data_dir="data")
    many = {f"p{i:02d}": 0 for i in range(8)}
    with pytest.raises(LabelsError, match=r"8 of 8 without one: p00, p01, p02, p03, p04 and 3 m"):
        check_labels_match(many, [])
    with pytest.raises(
        LabelsError, match=r"expected a label for every volume, received 1 of 4 volumes .* d"
    ):
        check_labels_match(labels, ["a", "b", "c", "d"])
    with caplog.at_level(logging.WARNING, logger="kdsb.io.tables"):
        usable = check_labels_match(labels, ["a", "b", "c", "d"], allow_unlabelled=True)
    assert usable == ["a", "b", "c"]
    assert "skipping unlabelled volumes" in caplog.text
    # A whole cohort's labels beside a preprocessed part of it (found by a user's check: a dead
    # end without a flag).
    with pytest.raises(LabelsError, match=r"without one: c \(pass --allow-missing-volumes"):
        check_labels_match(labels, ["a", "b"])
    with caplog.at_level(logging.WARNING, logger="kdsb.io.tables"):
        assert check_labels_match(labels, ["a", "b"], allow_missing_volumes=True) == ["a", "b"]
    assert "skipping labelled patients without a volume in the data folder: 1 of 3 without " \
           "one: c" in caplog.text


def test_labelled_patients_whose_preprocessing_failed_are_skipped(tmp_path, caplog):
    """A scan that failed preprocessing is in the manifest, not in the folder: training goes on
    without it, saying so; a labelled id the manifest does not name stays an error."""
    from kdsb.preprocessing.out_dir import failed_patients

    (tmp_path / "manifest.csv").write_text(
        "id,status,seconds,shape,error\na,ok,1.0,2x2x2,\nc,failed,0.1,,c: truncated\n"
    )
    labels = {"a": 0, "b": 1, "c": 1}
    failed = failed_patients(tmp_path)
    assert failed == {"c"} and failed_patients(tmp_path / "none") == set()
    with caplog.at_level(logging.WARNING, logger="kdsb.io.tables"):
        assert check_labels_match(labels, ["a", "b"], data_dir=tmp_path, failed=failed,
                                  failed_in=tmp_path / "manifest.csv") == ["a", "b"]
    assert "skipping 1 labelled patient(s) whose preprocessing failed" in caplog.text
    assert f"{tmp_path}/manifest.csv): c" in caplog.text
    with pytest.raises(LabelsError, match=r"received 1 of 3 without one: b"):
        check_labels_match(labels, ["a"], failed=failed)


def test_predictions_round_trip_and_errors(tmp_path):
    path = write_predictions(tmp_path / "out" / "sub.csv", {"b": 0.25, "a": 1.0})
    assert path.read_text() == "id,cancer\nb,0.25\na,1.0\n"
    assert read_predictions(path) == {"b": 0.25, "a": 1.0}
    # Every probability reads back as the float written (found in review: 2e-07 was written
    # as 0.000000, which log loss charges as a certain miss).
    tiny = {"c": 2e-07, "d": 1 - 1e-9, "e": 0.1 + 0.2, "f": np.float32(0.3)}
    path = write_predictions(tmp_path / "out" / "exact.csv", tiny)
    assert read_predictions(path) == {k: float(v) for k, v in tiny.items()}
    assert sorted(p.name for p in path.parent.iterdir()) == ["exact.csv", "sub.csv"]  # no temp
    with pytest.raises(LabelsError, match=r"line 3: expected a probability in \[0, 1\] for b, "
                                          r"received '1.5'"):
        read_predictions(_write(tmp_path, "id,cancer\na,0.1\nb,1.5\n", "p.csv"))
    with pytest.raises(LabelsError, match="received 'nan'"):
        read_predictions(_write(tmp_path, "id,cancer\na,nan\n", "p.csv"))
    with pytest.raises(LabelsError, match="received '-0.1'"):
        read_predictions(_write(tmp_path, "id,cancer\na,-0.1\n", "p.csv"))
