"""Reading one DICOM file: telling DICOM from other files (with or without the Part 10 header)
and parsing it; the one-line error every DICOM problem raises."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kdsb.errors import DicomError, one_line

# pydicom both warns and logs when a file ends early ("End of file reached before delimiter …
# found in file …"); kdsb names that file in its own one-line error, so pydicom's two lines
# (one with a source line) are kept off the terminal: the log record by this filter, the
# warning where the file is read (`headers`).
DAMAGED_FILE_MESSAGE = "End of file reached"
logging.getLogger("pydicom").addFilter(
    lambda record: not record.getMessage().startswith(DAMAGED_FILE_MESSAGE)
)

PREAMBLE_BYTES = 128  # a Part 10 file: 128 bytes, then "DICM"
BARE_GROUP = b"\x08\x00"  # group 0008, little endian: where a bare data set begins
BARE_TEXT_BYTES = 64  # longest first element of a bare data set (a UID)
BARE_HEAD_BYTES = 8 + BARE_TEXT_BYTES  # bytes `bare_dataset` reads


def patient_error(patient: str, message: str, path: Path | None = None) -> DicomError:
    """The one-line error naming the patient and, where relevant, the file."""
    where = f" (file {path.name})" if path is not None else ""
    # One line whatever the message quotes (a decoder's own text may hold newlines and tabs).
    return DicomError(one_line(f"patient {patient}: {message}{where}"))


def bare_dataset(head: bytes) -> bool:
    """Whether a file's first bytes (at least `BARE_HEAD_BYTES`) are a DICOM data set without
    its Part 10 header (no preamble, no "DICM": older archives and exports write them). Its
    first element, little endian, is of group 0008: the group's length (4 bytes), or a short
    text (SpecificCharacterSet, ImageType, a date, SOPClassUID), after its VR (explicit) or not
    (implicit). A stray binary file seldom passes; `read_dataset` checks the rest."""
    if len(head) < 8 or head[:2] != BARE_GROUP:
        return False
    element = int.from_bytes(head[2:4], "little")
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()  # then a 2-byte length
    length = int.from_bytes(head[6:8] if explicit_vr else head[4:8], "little")
    if element == 0:
        return length == 4
    text = head[8:8 + length]
    return (element <= 0xFF and 0 < length <= BARE_TEXT_BYTES and len(text) == length
            and all(32 <= byte < 127 or byte == 0 for byte in text))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a readable regular file holding DICOM: with the Part 10 preamble and
    "DICM", or a bare data set (`bare_dataset`). A dangling link, a FIFO or an unreadable
    file is not."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as file:
            head = file.read(max(PREAMBLE_BYTES + 4, BARE_HEAD_BYTES))
    except OSError:
        return False
    return head[PREAMBLE_BYTES:PREAMBLE_BYTES + 4] == b"DICM" or bare_dataset(head)


def read_dataset(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """`pydicom.dcmread`, also of a bare data set (`bare_dataset`, and a SOPClassUID), to which
    the transfer syntax pydicom found is added (its pixels cannot be decoded without one).

    Raises:
        InvalidDicomError: the file is no DICOM.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        with open(path, "rb") as file:
            if not bare_dataset(file.read(BARE_HEAD_BYTES)):
                raise
    ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    if "SOPClassUID" not in ds:
        raise InvalidDicomError(f"{path}: no DICOM data set (no SOPClassUID)")
    implicit, _ = ds.original_encoding  # little endian: `bare_dataset` read group 0008 so
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


