"""Every file under a patient folder, symlinked sub-folders included, hidden ones left out.

`Path.rglob` (Python 3.11) does not descend into symlinked folders, so a patient folder built of
links to series elsewhere read as empty, or silently without the linked series. `os.walk` with
`followlinks=True` descends into them; a folder reached twice (a link loop, or two links to one
series) is walked once.

Hidden entries (names beginning with a dot) and the `__MACOSX` folder a Mac's archives unpack
are no part of a patient, as they are no patient in INPUT_ROOT (`ignored_name`): the
`.DS_Store` a Mac's Finder writes into a folder it shows, the `._IM1` AppleDouble files its
copies leave on other disks, a `.git` folder. Found in review: a Finder window opened on a
patient folder changed its source stamp, and the patient was preprocessed again on the next
run; found by a user's trial: an unzipped archive's `__MACOSX` failed as a patient on every run.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdsb.errors import KdsbError

MAC_ARCHIVE_FOLDER = "__MACOSX"


def ignored_name(name: str) -> bool:
    """Whether an entry of this name is no part of a cohort: hidden, or a Mac archive's
    `MAC_ARCHIVE_FOLDER`."""
    return name.startswith(".") or name == MAC_ARCHIVE_FOLDER


def files_under(folder: str | os.PathLike, ignored: bool = False) -> list[Path]:
    """The regular files (or links to them) anywhere under `folder`, sorted by path; none
    whose name, or whose sub-folder's name under `folder`, is an `ignored_name` (unless
    `ignored`: the rule before 2026-12-05, which old source stamps counted by).

    Raises:
        KdsbError: a folder under it cannot be listed (no permission): `os.walk` would skip it
            silently, and a patient folder of another user read as empty (found in review).
    """
    seen: set[tuple[int, int]] = set()
    found = []

    def unreadable(error: OSError) -> None:
        raise KdsbError(f"{folder}: expected folders this user may read, received "
                        f"{error.strerror or error} for {error.filename}") from None

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        if not ignored:
            dirs[:] = [name for name in dirs if not ignored_name(name)]  # walked no further
        found += [path for name in files
                  if (ignored or not ignored_name(name)) and (path := Path(root, name)).is_file()]
    return sorted(found)
