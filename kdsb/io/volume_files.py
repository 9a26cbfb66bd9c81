"""Which files are volume files (NIfTI, MetaImage, NRRD, by name), the patient id each stands
for, the data file a detached header names, and the one volume file a patient folder may hold
instead of a DICOM series."""

from __future__ import annotations

import logging
from pathlib import Path

from kdsb.errors import VolumeFileError
from kdsb.io.dicom import is_dicom_file
from kdsb.io.folders import files_under

logger = logging.getLogger(__name__)

# File name suffix (lower case) → (format name, SimpleITK ImageIO). Longest suffixes first.
VOLUME_FORMATS = {
    ".nii.gz": ("NIfTI", "NiftiImageIO"),
    ".nii": ("NIfTI", "NiftiImageIO"),
    ".mhd": ("MetaImage", "MetaImageIO"),
    ".mha": ("MetaImage", "MetaImageIO"),
    ".nrrd": ("NRRD", "NrrdImageIO"),
    ".nhdr": ("NRRD", "NrrdImageIO"),  # detached header; the data file beside it
}
METAIMAGE_HEADER_SUFFIX = ".mhd"
DATA_FILE_KEY = "ElementDataFile"  # the MetaImage header field naming the data file
LOCAL_DATA_FILE = "LOCAL"  # data follows the header in the same file (.mha)
LIST_DATA_FILES = "LIST"  # one data file per slice, listed after the header


def volume_suffix(path: str | Path) -> str | None:
    """The volume-file suffix of `path` (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr"),
    lower case; None when the name is not that of a volume file (a `.raw` data file is not)."""
    name = Path(path).name.lower()
    return next((suffix for suffix in VOLUME_FORMATS if name.endswith(suffix)), None)


def volume_id(path: str | Path) -> str | None:
    """The patient id a volume file stands for: its name without the volume suffix.

    Returns None when `path` is not named like a volume file, or when nothing is left of the
    name without its suffix.
    """
    suffix = volume_suffix(path)
    if suffix is None:
        return None
    name = Path(path).name
    return name[: -len(suffix)] or None


def metaimage_data_file(header: str | Path) -> Path | None:
    """The data file a MetaImage `.mhd` header names (its `ElementDataFile`, beside it).

    Returns None when the header names no single file (data in the header file itself,
    `LOCAL`; a `LIST` of files; a numbered `%d` pattern) or cannot be read: SimpleITK resolves
    those, or says why it cannot.
    """
    value = _header_value(header, "=", DATA_FILE_KEY, blank_ends=False)
    if value is None or value in ("", LOCAL_DATA_FILE) or value.startswith(LIST_DATA_FILES) \
            or "%" in value:
        return None
    return Path(header).parent / value


def detached_data_file(header: str | Path) -> Path | None:
    """The one data file a detached header names, beside it: a MetaImage `.mhd`'s
    `ElementDataFile` (`metaimage_data_file`), an NRRD `.nhdr`'s `data file:` field; None for
    any other file, or a header naming no single file (a list, a numbered pattern)."""
    suffix = volume_suffix(header)
    if suffix == ".mhd":
        return metaimage_data_file(header)
    if suffix != ".nhdr":
        return None
    value = _header_value(header, ":", "data file", blank_ends=True)
    if not value or value.startswith(LIST_DATA_FILES) or " " in value or "%" in value:
        return None
    return Path(header).parent / value


def _header_value(header: str | Path, separator: str, key: str, *, blank_ends: bool
                  ) -> str | None:
    """The stripped value of the first line `key <separator> value` of a text header (keys
    compared case-blind, spaces ignored: NRRD's `datafile` is `data file`); None when there is
    none or the file cannot be read. `blank_ends`: the header ends at its first blank line."""
    try:
        text = Path(header).read_text(errors="replace")
    except OSError:
        return None
    wanted = key.replace(" ", "").lower()
    for line in text.splitlines():
        if blank_ends and not line.strip():
            break
        name, _, value = line.partition(separator)
        if name.replace(" ", "").strip().lower() == wanted:
            return value.strip()
    return None


def volume_in_folder(folder: str | Path, patient_id: str | None = None) -> Path | None:
    """The one volume file a patient folder holds instead of a DICOM series.

    A folder holding volume files (directly in it) and no DICOM file (anywhere in it, as
    `kdsb.io.dicom.read_series` would read; a MetaImage header's `.raw` is not DICOM) is read as
    its volume file. A folder holding DICOM files is a DICOM series, even beside volume files
    (logged).

    Args:
        folder: the patient folder.
        patient_id: the name used in messages; the folder name if None.

    Returns:
        The volume file, or None when the folder is to be read as a DICOM series.

    Raises:
        VolumeFileError: the folder holds no DICOM and more than one volume file.
    """
    folder = Path(folder)
    patient = patient_id or folder.name
    volumes = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and volume_suffix(p) is not None
    )
    if not volumes:
        # Found by a user's trial: volume files a sub-folder deeper read as "non-DICOM files".
        every = files_under(folder)
        deeper = [p for p in every if volume_suffix(p) is not None]
        if deeper and not any(is_dicom_file(p) for p in every if p not in deeper):
            raise VolumeFileError(
                f"patient {patient}: expected its volume file in {folder} itself, received "
                f"volume file(s) in a sub-folder only ({deeper[0].relative_to(folder)}"
                f"{', …' if len(deeper) > 1 else ''}): one volume file lies in a patient's "
                "folder, or is the patient"
            )
        return None
    others = (p for p in files_under(folder) if p not in volumes)
    if any(is_dicom_file(p) for p in others):
        logger.info(
            "patient %s: the folder holds DICOM files: reading them, not %s",
            patient, ", ".join(v.name for v in volumes),
        )
        return None
    if len(volumes) > 1:
        raise VolumeFileError(
            f"patient {patient}: expected one volume file (or a DICOM series) in {folder}, "
            f"received {len(volumes)}: {', '.join(v.name for v in volumes)}"
        )
    return volumes[0]
