"""What identifies a patient's source files as written (`source_stamp`): a volume made from them
records it, and a rerun that finds it changed preprocesses the patient again."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from kdsb.io.folders import files_under
from kdsb.io.volumes import SUFFIX as VOLUME_SUFFIX

# kdsb's own files that may lie beside a volume file (OUT_DIR or --qc in INPUT_ROOT): its
# volume, its QC image (no scan is a PNG). Found in review: a QC image rewritten by each run
# changed the stamp, and the patient was preprocessed again on every rerun.
OWN_SUFFIXES = (VOLUME_SUFFIX, ".png")
# Documents and pictures a patient folder may hold beside its scan, which no reader takes: a
# note edited, or a screenshot added, is no change of the scan (found by a user's trial: a
# README.txt touched redid the patient). DICOM files have no suffix, or .dcm / .ima.
DOCUMENT_SUFFIXES = (".txt", ".md", ".csv", ".tsv", ".json", ".xml", ".html", ".pdf", ".doc",
                     ".docx", ".rtf", ".log", ".png", ".jpg", ".jpeg")


def source_stamp(source: str | os.PathLike, every_file: bool = False) -> str:
    """What identifies a patient's source files as written: their count, total size and newest
    modification time (UTC, µs). A folder counts every file under it (`files_under`: not the
    hidden ones) but documents and pictures (`DOCUMENT_SUFFIXES`); a volume file counts the
    files beside it whose names begin with its id and a dot (`p1.mhd` and `p1.raw`; also a
    `p1.b.mhd`, whose change then redoes p1 too: the safe side), but for kdsb's own
    (`OWN_SUFFIXES`), and the data file its detached header names
    (`volume_files.detached_data_file`).

    `every_file`: a folder's every file, hidden files and documents too, as stamps recorded
    before 2026-12-05 counted them (`matches` accepts those: the first rerun after that change
    would otherwise have redone every patient of a folder holding a `.DS_Store`; found in
    review).

    A rewritten scan (another synthetic draw, a series still being copied) changes it; so does
    a copy that does not keep modification times (the patient is then preprocessed again, never
    silently kept; `kdsb preprocess` refuses it while the volume's recorded source is still
    there: `kdsb.preprocessing.cohort`).
    """
    # Imported here: volume_files brings pydicom, which `kdsb preprocess --help` need not load.
    from kdsb.io.volume_files import detached_data_file, volume_id

    source = Path(source)
    if source.is_dir() and every_file:
        files = files_under(source, ignored=True)
    elif source.is_dir():
        files = [p for p in files_under(source) if not p.name.lower().endswith(DOCUMENT_SUFFIXES)]
    else:
        prefix = f"{volume_id(source) or source.name}."
        files = sorted(p for p in source.parent.iterdir()
                       if p.name.startswith(prefix) and not p.name.lower().endswith(OWN_SUFFIXES)
                       and p.is_file()) or [source]
        # A header may name a data file of another name (found in review: rewriting it kept
        # the stamp, so a rerun kept the old volume).
        data = detached_data_file(source)
        if data is not None and data.is_file() and data not in files:
            files.append(data)
    # A volume file's link to a missing path counts as no file: its patient then fails on
    # reading, named, not the whole run on this stat (found in review).
    stats = [path.stat() for path in files if path.exists()]
    newest = max((s.st_mtime_ns for s in stats), default=0)
    # Microseconds, UTC: readable in a warning, and finer than any rewrite of a scan.
    when = datetime.fromtimestamp(newest / 1e9, tz=timezone.utc).isoformat(timespec="microseconds")
    return f"{len(stats)} files, {sum(s.st_size for s in stats)} bytes, newest {when}"


def same_files_but_times(stamp: str, other: str) -> bool:
    """Whether two `source_stamp`s count the same files and bytes, whatever their times (a copy
    that did not keep modification times)."""
    return stamp.split(", newest")[0] == other.split(", newest")[0]



def matches(stamp: str, source: str | os.PathLike, now: str) -> bool:
    """Whether a volume's recorded `stamp` still describes `source`, whose `source_stamp` is
    `now`: equal to it, or to the stamp of every file (`every_file`) as kdsb recorded it
    before 2026-12-05."""
    return stamp == now or (Path(source).is_dir() and stamp == source_stamp(source, True))
