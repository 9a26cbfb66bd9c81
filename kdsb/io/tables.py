"""The Kaggle `id,cancer` CSV files: labels, submissions (predictions) and id lists.

A labels CSV has a header naming the columns `id` and `cancer` (any order; other columns, such as
the `Usage` column of Kaggle's solution files, are ignored with a note) and one row per patient
with `cancer` either 0 or 1. A submission CSV has the same columns with a probability in [0, 1].
A sample-submission CSV used as an id list only needs an `id` column; its other columns are
ignored.

Which mismatches are errors (for `kdsb train-classifier`):

- a labelled id without a volume is an error: the user expects that patient to be used; unless
  preprocessing failed for it (the caller passes the failed ids from the volume folder's
  manifest), in which case it is skipped with a warning: the user was told when it failed;
- a volume without a label is an error too, unless the caller allows it (`allow_unlabelled`),
  in which case it is skipped with a warning. Kaggle's stage-1 folder holds the unlabelled test
  patients beside the labelled ones, which is why the option exists.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdsb.errors import LabelsError
from kdsb.io.atomic import atomic_path

logger = logging.getLogger(__name__)

ID_COLUMN = "id"
LABEL_COLUMN = "cancer"
LABEL_COLUMNS = (ID_COLUMN, LABEL_COLUMN)
# "1.0": a label column pandas wrote as floats (a column that held a NaN before).
VALID_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
# How many offending ids an error message names before summarising the rest as a count.
IDS_SHOWN = 5


def _open_rows(csv_path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file, each with its line number in the file (from 1)."""
    if not csv_path.is_file():
        what = "a folder" if csv_path.is_dir() else "a missing path"
        raise LabelsError(f"expected a CSV file, received {what}: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader
                    if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:  # found by a user's check: codec jargon alone
        raise LabelsError(f"{csv_path}: expected a UTF-8 text CSV, received byte "
                          f"0x{error.object[error.start]:02x}, which is not UTF-8: save the "
                          f"file as UTF-8") from None
    except (OSError, csv.Error) as error:
        raise LabelsError(f"{csv_path}: expected a readable text CSV, received {error}") from None


def _header_index(csv_path: Path, rows: list[tuple[int, list[str]]], required: Iterable[str]
                  ) -> list[str]:
    """The header's column names as matched (`_column_key`), each once, `required` among them;
    messages quote the file's own spelling."""
    if not rows:
        raise LabelsError(f"{csv_path}: expected a header line, received an empty file")
    spelled = _header_cells(rows)
    header = [_column_key(name) for name in spelled]
    # Empty names are no columns (a spreadsheet's trailing commas: found in review).
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise LabelsError(f"{csv_path}: expected each column once in the header, received "
                          f"{','.join(spelled)!r} ({', '.join(map(repr, repeated))} repeated)")
    missing = [name for name in required if name not in header]
    if missing:
        raise LabelsError(
            f"{csv_path}: expected a header with column(s) {', '.join(required)}, "
            f"received {','.join(spelled)!r} (missing {', '.join(missing)})"
        )
    return header


def _header_cells(rows: list[tuple[int, list[str]]]) -> list[str]:
    """The header's column names as the file spells them."""
    return [cell.strip() for cell in rows[0][1]]


def _fits_header(row: list[str], header: list[str]) -> bool:
    """Whether a row has the header's cells: as many, or more whose extra cells are empty, or
    fewer where only the header's trailing unnamed columns go without (a spreadsheet's export
    pads rows and headers with commas)."""
    if len(row) >= len(header):
        return not any(cell.strip() for cell in row[len(header):])
    return not any(header[len(row):])


def _column_key(name: str) -> str:
    """A column name as columns are matched: case-blind (`ID,Cancer` will do)."""
    return name.lower()


def _patient_id(csv_path: Path, line: int, text: str) -> str:
    """The patient id of a cell, stripped: refused when empty or not usable as the file name
    `<id>.h5` (a '/' or a control character: a quoted line break would also split messages)."""
    patient_id = text.strip()
    if not patient_id:
        raise LabelsError(f"{csv_path} line {line}: expected a patient id, received ''")
    if "/" in patient_id or any(ord(c) < 32 or ord(c) == 127 for c in patient_id):
        raise LabelsError(f"{csv_path} line {line}: expected a patient id usable as a file name "
                          f"(no '/' or control characters), received {patient_id!r}")
    return patient_id


def summarise_ids(ids: list[str]) -> str:
    """The first few ids, then how many more: for error messages about many patients."""
    shown = ", ".join(ids[:IDS_SHOWN])
    more = len(ids) - IDS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def read_labels(csv_path: str | os.PathLike) -> dict[str, int]:
    """Read a labels CSV (header `id,cancer`, any case; other columns ignored) into patient id
    → 0 or 1 (written `0`, `1`, `0.0` or `1.0`), in file order.

    Args:
        csv_path: the CSV file.

    Returns:
        A dict from patient id to its label.

    Raises:
        LabelsError: the file is missing or unreadable, has no header with the columns `id`
            and `cancer` (each column once), a row with another number of cells, an empty or
            duplicate id or one that cannot name a file, or a label other than 0 or 1 (the
            message names the line and the value).
    """
    return _read_id_values(
        csv_path,
        lambda text: VALID_LABELS.get(text),
        expected="a label 0 or 1",
        nothing="labelled patient",
        note_other_columns=True,
    )


def read_label_column(csv_path: str | os.PathLike, column: str) -> dict[str, int] | None:
    """The 0/1 labels of column `column` of a CSV with an `id` column (an out-of-fold file's
    `label`), as `read_labels` reads `cancer`, a blank cell leaving its patient unlabelled;
    None when the header has no such column."""
    rows = _open_rows(Path(csv_path))
    if not rows or column not in {_column_key(name) for name in _header_cells(rows)}:
        return None
    found = _read_id_values(csv_path, lambda text: VALID_LABELS.get(text, None if text else ""),
                            expected="a label 0 or 1 (or none)", nothing="row",
                            value_column=column)
    return {patient: label for patient, label in found.items() if label != ""}


def read_ids(csv_path: str | os.PathLike) -> list[str]:
    """Read the `id` column of a CSV (a Kaggle sample submission) in file order.

    Other columns are ignored.

    Raises:
        LabelsError: the file is missing, has no `id` column (or a repeated column), an empty
            or duplicate id or one that cannot name a file.
    """
    csv_path = Path(csv_path)
    rows = _open_rows(csv_path)
    header = _header_index(csv_path, rows, (ID_COLUMN,))
    id_at = header.index(ID_COLUMN)
    ids: list[str] = []
    seen: set[str] = set()
    for line, row in rows[1:]:
        patient_id = _patient_id(csv_path, line, row[id_at] if id_at < len(row) else "")
        if patient_id in seen:
            raise LabelsError(
                f"{csv_path} line {line}: expected each id once, received {patient_id} again"
            )
        seen.add(patient_id)
        ids.append(patient_id)
    if not ids:
        raise LabelsError(f"{csv_path}: expected at least one id, received none")
    return ids


def check_labels_match(
    labels: Mapping[str, int],
    volume_ids: Iterable[str],
    *,
    labels_path: str | os.PathLike = "labels CSV",
    data_dir: str | os.PathLike = "the data folder",
    allow_unlabelled: bool = False,
    allow_missing_volumes: bool = False,
    failed: Collection[str] = (),
    failed_in: str | os.PathLike = "the manifest",
) -> list[str]:
    """Check that labels and volumes name the same patients; return the usable ids, sorted.

    Args:
        labels: patient id → label (from `read_labels`).
        volume_ids: ids of the volumes on disk.
        labels_path: the labels file, for messages.
        data_dir: the volume folder, for messages.
        allow_unlabelled: skip volumes without a label (logging a warning) instead of failing.
        allow_missing_volumes: skip labelled ids without a volume (logging a warning) instead of
            failing.
        failed: ids whose preprocessing failed: skipped with a warning when labelled.
        failed_in: where `failed` was read (the preprocessing manifest), for the warning.

    Returns:
        The ids that have both a label and a volume, sorted.

    Raises:
        LabelsError: a labelled id has no volume, or a volume no label (unless allowed); or
            no patient has both.
    """
    volume_ids = set(volume_ids)
    without_volume = sorted(set(labels) - volume_ids)
    failed = set(failed)
    not_preprocessed = [i for i in without_volume if i in failed]
    if not_preprocessed:
        logger.warning(
            "skipping %d labelled patient(s) whose preprocessing failed (%s): %s",
            len(not_preprocessed), failed_in, summarise_ids(not_preprocessed),
        )
        without_volume = [i for i in without_volume if i not in failed]
    if without_volume:
        message = (f"{len(without_volume)} of {len(labels)} without one: "
                   f"{summarise_ids(without_volume)}")
        if not allow_missing_volumes:
            raise LabelsError(
                f"{labels_path}: expected a volume in {data_dir} for every labelled id, received "
                f"{message} (pass --allow-missing-volumes to skip them)"
            )
        logger.warning("skipping labelled patients without a volume in %s: %s", data_dir,
                       message)
    without_label = sorted(volume_ids - set(labels))
    if without_label:
        message = (
            f"{len(without_label)} of {len(volume_ids)} volumes in {data_dir} have no label in "
            f"{labels_path}: {summarise_ids(without_label)}"
        )
        if not allow_unlabelled:
            raise LabelsError(
                f"expected a label for every volume, received {message} "
                "(pass --allow-unlabelled to skip them)"
            )
        logger.warning("skipping unlabelled volumes: %s", message)
    usable = sorted(volume_ids & set(labels))
    if not usable:
        raise LabelsError(
            f"expected patients with both a label and a volume, received none "
            f"({labels_path}, {data_dir})"
        )
    return usable


def read_predictions(csv_path: str | os.PathLike) -> dict[str, float]:
    """Read a submission CSV (header `id,cancer`) into patient id → probability, in file order.

    Raises:
        LabelsError: the file is missing or malformed, an id is empty or repeated, or a value is
            not a probability in [0, 1] (the message names the line and the value).
    """
    return _read_id_values(
        csv_path, _probability, expected="a probability in [0, 1]", nothing="prediction"
    )


def _probability(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None  # also rejects NaN


def _read_id_values(
    csv_path: str | os.PathLike,
    parse: Callable[[str], Any],
    *,
    expected: str,
    nothing: str,
    note_other_columns: bool = False,
    value_column: str = LABEL_COLUMN,
) -> dict[str, Any]:
    """Read an `id,cancer` CSV into patient id → `parse(cancer cell)`, in file order.

    Args:
        csv_path: the CSV file.
        parse: the cell's text → its value, or None when the text is not acceptable.
        expected: what an acceptable cell is, for the error message ("a label 0 or 1").
        nothing: what a row holds, for the message when there are none ("prediction").
        note_other_columns: log which columns other than `id` and `cancer` are ignored.
        value_column: the column read instead of `cancer`.

    Raises:
        LabelsError: naming the file, and the line and value where one is at fault.
    """
    csv_path = Path(csv_path)
    rows = _open_rows(csv_path)
    columns = (ID_COLUMN, value_column)
    header = _header_index(csv_path, rows, columns)
    others = [name for name in _header_cells(rows) if _column_key(name) not in columns]
    if note_other_columns and others:
        logger.info("%s: column(s) %s ignored (only %s are read)", csv_path,
                    ", ".join(others), " and ".join(columns))
    id_at, value_at = header.index(ID_COLUMN), header.index(value_column)
    values: dict[str, Any] = {}
    for line, row in rows[1:]:  # line numbers of the file, blank lines counted
        if not _fits_header(row, header):
            raise LabelsError(
                f"{csv_path} line {line}: expected {len(header)} comma-separated values, "
                f"received {len(row)}: {','.join(row)!r}"
            )
        patient_id, text = _patient_id(csv_path, line, row[id_at]), row[value_at].strip()
        value = parse(text)
        if value is None:
            raise LabelsError(
                f"{csv_path} line {line}: expected {expected} for {patient_id}, received {text!r}"
            )
        if patient_id in values:
            raise LabelsError(
                f"{csv_path} line {line}: expected each id once, received {patient_id} again"
            )
        values[patient_id] = value
    if not values:
        raise LabelsError(f"{csv_path}: expected at least one {nothing}, received none")
    return values


def write_labels(csv_path: str | os.PathLike, rows: Iterable[tuple[str, int]]) -> Path:
    """Write an `id,cancer` labels CSV of 0/1 labels atomically, in order.

    Args:
        csv_path: destination file; its folder is created.
        rows: (patient id, label) pairs.

    Returns:
        The path written.
    """
    return _write_rows(csv_path, ((patient_id, int(label)) for patient_id, label in rows))


def probability_text(value: float) -> str:
    """A probability as a CSV cell: the shortest text that reads back as the same float
    (rounding to 6 decimals wrote 2e-07 as 0, which log loss charges 34.5 nats, not 15.4)."""
    return repr(float(value))


def write_predictions(csv_path: str | os.PathLike, predictions: Mapping[str, float]) -> Path:
    """Write an `id,cancer` submission CSV atomically (temporary file, then rename), in order.

    Args:
        csv_path: destination file; its folder is created.
        predictions: patient id → probability, written in iteration order
            (`probability_text`).

    Returns:
        The path written.
    """
    rows = ((patient_id, probability_text(value)) for patient_id, value in predictions.items())
    return _write_rows(csv_path, rows)


def _write_rows(csv_path: str | os.PathLike, rows: Iterable[tuple[str, object]]) -> Path:
    """Write `id,cancer` rows atomically (temporary file, then rename), in order."""
    return write_table(csv_path, LABEL_COLUMNS, rows)


def write_table(
    csv_path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]
) -> Path:
    """Write a CSV (header, then rows in order) atomically: temporary file, then rename."""
    csv_path = Path(csv_path)
    with atomic_path(csv_path) as temp, open(temp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return csv_path
