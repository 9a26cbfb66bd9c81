"""The patients of an input root: each visible sub-folder (a DICOM series, or a folder holding
one volume file) and each NIfTI, MetaImage or NRRD file is one; what is not a patient is left
out, and said where a user would wonder."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from kdsb.errors import UsageError
from kdsb.io.folders import ignored_name
from kdsb.io.tables import summarise_ids
from kdsb.preprocessing.out_dir import LOCK_NAME, MANIFEST_NAME

logger = logging.getLogger(__name__)

# Files in INPUT_ROOT that look like a patient's scan in a format kdsb does not read: Analyze,
# compressed NIfTI other than gzip, archives, arrays (found in review: dropped without a word).
UNREAD_IMAGE_SUFFIXES = (".img", ".hdr", ".nii.bz2", ".nii.xz", ".zip", ".tar", ".tgz",
                         ".tar.gz", ".7z", ".npy", ".npz", ".mgz", ".mnc")
# The data files of MetaImage and NRRD headers: alone, a header went missing (a LUNA16 scan
# whose .mhd was not copied; found by a user's check: dropped without a word).
HEADER_DATA_SUFFIXES = (".raw", ".zraw", ".raw.gz")
HEADER_SUFFIXES = (".mhd", ".nhdr")
# Suffixes a header's data file may end in, longest first (a stem is what precedes them).
DATA_FILE_SUFFIXES = tuple(sorted({*HEADER_DATA_SUFFIXES, ".img", ".img.gz"}, key=len,
                                  reverse=True))


def find_patients(input_root: Path, *outputs: Path | None) -> dict[str, Path]:
    """Patient id → folder or volume file for every patient in `input_root`, sorted by id.

    Each visible entry of `input_root` is one patient: a sub-folder (a DICOM series, or a folder
    holding one volume file), whose name is the id, or a volume file (NIfTI `.nii`/`.nii.gz`,
    MetaImage `.mhd`/`.mha`, NRRD `.nrrd`/`.nhdr`), whose name without that suffix is the id. The
    data file beside a `.mhd` or `.nhdr` header (its `.raw`) is not a patient; other files
    (labels.csv, …), hidden entries and a Mac archive's `__MACOSX` (`folders.ignored_name`)
    are ignored (a link to a missing path with a warning).
    The run's own output folders (`outputs`: OUT_DIR, the QC folder) are left out when they lie
    inside `input_root`, with a warning the folders that hold them deeper, and so, with a
    warning, are an earlier run's (a folder holding a preprocess lock, a manifest.csv or a QC
    contact sheet).

    Raises:
        UsageError: `input_root` is missing, not a folder, holds no patient, or holds two
            entries with the same id (`p1/` and `p1.nii.gz`) or ids that differ only by case
            (`P1/`, `p1/`).
    """
    from kdsb.io.dicom import is_dicom_file
    from kdsb.io.volume_files import volume_id

    if not input_root.exists():
        raise UsageError(f"expected an input root folder, received a missing path: {input_root}")
    if not input_root.is_dir():
        raise UsageError(f"expected an input root folder, received a file: {input_root}")
    skip = {Path(folder).resolve() for folder in outputs if folder is not None}
    patients: dict[str, Path] = {}
    folded: dict[str, str] = {}  # lower-case id → id (as case-insensitive disks compare)
    loose_dicom = []  # DICOM files lying in input_root itself: never a patient
    unread = []  # images in formats kdsb does not read (Analyze, archives): named, not silent
    headless = []  # data files (.raw) without the header of their name
    named_by_headers = functools.cache(lambda: _named_by_headers(input_root))  # read if asked
    for path in sorted(input_root.iterdir()):
        if ignored_name(path.name):
            continue
        if path.is_symlink() and not _exists(path):
            # A patient's link whose target moved (or lies on a disk not mounted now): not
            # silently one less, and not failed either: a failed patient's earlier volume would
            # be removed (found in review: links into an unmounted disk would have cost every
            # volume of the cohort).
            logger.warning("%s: ignored %s, a link to a missing path (%s); its earlier volume "
                           "and manifest row, if any, are kept", input_root, path.name,
                           os.readlink(path))
            continue
        if _is_dir(path):
            patient_id = path.name if path.resolve() not in skip else None
            holding = next((o for o in skip if o.is_relative_to(path.resolve())), None)
            if patient_id is not None and holding is not None:
                # This run's output deeper inside (found in review: `nest/derived/vol` made
                # `derived` a patient that failed on every rerun).
                logger.warning("%s: ignored %s, which holds this run's output folder %s, not "
                               "a patient", input_root, path.name, holding)
                patient_id = None
            if patient_id is not None and _kdsb_output(path):
                # An earlier run's OUT_DIR or QC folder (found in review: it failed as a
                # patient, and its "failed" row stayed in the manifest for good).
                logger.warning("%s: ignored %s, the output of an earlier kdsb preprocess "
                               "(volumes or QC images), not a patient", input_root, path.name)
                patient_id = None
        else:  # volume files only: a .raw beside its .mhd, labels.csv, … give None
            patient_id = volume_id(path)
            if patient_id is None and is_dicom_file(path):
                loose_dicom.append(path.name)
            elif patient_id is None and path.name.lower().endswith(UNREAD_IMAGE_SUFFIXES) \
                    and not _data_file_of_a_header(path, named_by_headers):
                unread.append(path.name)
            elif patient_id is None and path.name.lower().endswith(HEADER_DATA_SUFFIXES) \
                    and not _data_file_of_a_header(path, named_by_headers):
                headless.append(path.name)
        if patient_id is None:
            continue
        _require_utf8_name(path)
        if patient_id != patient_id.strip():
            # Found in review: CSV ids are read stripped, so its labels and --ids never matched.
            raise UsageError(
                f"expected patient ids without leading or trailing spaces in {input_root} (ids "
                f"in CSV files are read without them), received {patient_id!r}: rename it"
            )
        if patient_id in patients:
            raise UsageError(
                f"expected one entry per patient id in {input_root}, received two for "
                f"{patient_id}: {patients[patient_id].name} and {path.name}"
            )
        twin = folded.setdefault(patient_id.lower(), patient_id)
        if twin != patient_id:
            raise UsageError(
                f"expected patient ids that differ by more than letter case in {input_root} "
                f"(their volume files would be one file on a case-insensitive disk), received "
                f"{twin} and {patient_id}: rename one"
            )
        patients[patient_id] = path
    files = (f"{len(loose_dicom)} DICOM file(s) ({', '.join(loose_dicom[:1])}"
             f"{', …' if len(loose_dicom) > 1 else ''})")
    if not patients:
        raise UsageError(
            f"expected one sub-folder per patient, or one NIfTI, MetaImage or NRRD file per "
            f"patient, in {input_root}, received none"
            + (f"; {files} lie in it: a patient's series is a sub-folder (for one patient, pass "
               f"the folder above it)" if loose_dicom else "")
        )
    if loose_dicom:
        logger.warning("%s: ignored %s beside the patients: a patient's series is a sub-folder",
                       input_root, files)
    if unread:
        logger.warning("%s: ignored %d file(s) in a format kdsb does not read (%s): convert them "
                       "to NIfTI, MetaImage or NRRD, or unpack them", input_root, len(unread),
                       summarise_ids(unread))
    if headless:
        logger.warning("%s: ignored %d data file(s) without a MetaImage or NRRD header of "
                       "their name (%s): is a .mhd or .nhdr missing?", input_root,
                       len(headless), summarise_ids(headless))
    return dict(sorted(patients.items()))


def _data_file_of_a_header(path: Path, named_by_headers: Callable[[], set[Path]]) -> bool:
    """Whether `path` (`p1.raw`, `p1.img`) is the data file of a MetaImage or NRRD header beside
    it: one of its name (less the data suffix: LUNA16 ids hold dots, found in review), or one
    whose `ElementDataFile` / `data file` names it (`named_by_headers`: the folder's, read once
    when first asked for). Otherwise it was warned of as a format kdsb does not read, or as a
    data file whose header went missing."""
    lower = path.name.lower()
    suffix = next((s for s in DATA_FILE_SUFFIXES if lower.endswith(s)), path.suffix.lower())
    stem = path.name[: len(path.name) - len(suffix)]
    if any((path.parent / f"{stem}{header}").is_file() for header in HEADER_SUFFIXES):
        return True
    return path in named_by_headers()


def _named_by_headers(folder: Path) -> set[Path]:
    """The data files the MetaImage and NRRD headers in `folder` name."""
    from kdsb.io.volume_files import detached_data_file

    headers = (p for p in folder.iterdir() if p.name.lower().endswith(HEADER_SUFFIXES))
    return {data for header in headers if (data := detached_data_file(header)) is not None}


def _kdsb_output(folder: Path) -> bool:
    """Whether `folder` is a kdsb preprocess OUT_DIR (its lock or manifest) or QC folder (its
    contact sheet). A folder this user may not search is none: it fails as a patient, alone
    (found in review: its PermissionError stopped the whole run before any work)."""
    from kdsb.preprocessing.qc.sheet import CONTACT_SHEET_NAME

    try:
        return any((folder / name).is_file() for name in (LOCK_NAME, MANIFEST_NAME,
                                                          CONTACT_SHEET_NAME)) or any(
            folder.glob(f"{Path(CONTACT_SHEET_NAME).stem}_[0-9]*.png"))
    except OSError:
        return False


def _exists(path: Path) -> bool:
    """`path.exists()`, True where the answer is not ours to know (a link into a folder this
    user may not search): the patient then fails alone, naming the error."""
    try:
        return path.exists()
    except OSError:
        return True


def _is_dir(path: Path) -> bool:
    """`path.is_dir()`; where the answer is not ours to know (a link into a folder this user
    may not search, as `_exists`), a folder unless its name is a volume file's (`p1.nii.gz`):
    either way a patient of the right id, which then fails alone."""
    from kdsb.io.volume_files import volume_id

    try:
        return path.is_dir()
    except OSError:
        return volume_id(path) is None


def _require_utf8_name(path: Path) -> None:
    """Refuse an entry whose name is not valid UTF-8 (an old archive's Latin-1 folder name):
    its id could not be written into the volume file or the manifest (found in review: a
    traceback after the other patients had started).

    Raises:
        UsageError: naming the entry as its bytes read.
    """
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"expected patient names in UTF-8, received {os.fsencode(path)!r}: rename it "
            "(e.g. convmv -f latin1 -t utf8)"
        ) from None


