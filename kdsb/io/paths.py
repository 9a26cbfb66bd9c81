"""The input- and output-path checks every command runs first, with the same wording in each:
a missing input is a usage error (exit 2) before any work (`require_dir` / `require_file`), and
an output path a run could never write is one too (`require_output_file`, `require_output_dir`),
not a failure at the run's end. Light: the commands import it in `run`, library modules too.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdsb.errors import UsageError
from kdsb.io.atomic import system_link


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path if it is an existing folder, else raise `UsageError`.

    Args:
        path: the folder given on the command line.
        what: what the folder should be, for the message (e.g. "DATA_DIR, a folder of kdsb
            volume files").
    """
    path = Path(path)
    if not path.is_dir():
        state = "a file" if path.exists() else "a missing path"
        raise UsageError(f"expected {what}, received {state}: {path}")
    return path


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path if it is an existing file, else raise `UsageError`.

    Args:
        path: the file given on the command line.
        what: what the file should be, for the message (e.g. "LABELS_CSV, an id,cancer CSV").
    """
    path = Path(path)
    if not path.is_file():
        state = "a folder" if path.is_dir() else "a missing path"
        raise UsageError(f"expected {what}, received {state}: {path}")
    return path


DATA_DIR_WHAT = "DATA_DIR, a folder of kdsb volume files (<id>.h5)"


def require_volume_dir(path: str | os.PathLike) -> Path:
    """`require_dir` for DATA_DIR, which must hold at least one volume file: a folder without
    any (a DICOM folder given by mistake) is a usage error alike in every command (found by a
    user's check: exit 2 in one command, 1 in others, 0 in export)."""
    from kdsb.io.volumes import SUFFIX

    path = require_dir(path, DATA_DIR_WHAT)
    try:
        names = [p.name for p in path.iterdir()]
    except OSError as error:  # a folder that cannot be listed (permissions)
        raise UsageError(f"expected {DATA_DIR_WHAT}, received a folder that cannot be listed: "
                         f"{path} ({error.strerror})") from error
    if not any(name.endswith(SUFFIX) and not name.startswith(".") for name in names):
        raise UsageError(f"expected {DATA_DIR_WHAT}, received a folder without any: {path} "
                         f"(kdsb preprocess writes them)")
    return path


KERAS_SUFFIX = ".keras"


def require_keras_file(path: str | os.PathLike, what: str) -> Path:
    """`require_file`, and the file must be a Keras model archive (`.keras`): a CSV or volume
    given where a model goes is a usage error, not Keras's long "format not supported" (found
    by a user's check)."""
    path = require_file(path, what)
    if path.suffix.lower() != KERAS_SUFFIX:
        raise UsageError(f"expected {what}, received a file that is no Keras model "
                         f"({KERAS_SUFFIX}): {path}")
    return path


def require_output_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path if a file can be written there (a regular file or nothing yet,
    in a writable folder that exists), else raise `UsageError`.

    Found by a user's trial: `--out /dev/stdout` renamed the written file onto the device's
    link, replacing it for every process on the machine (kdsb writes a file beside the target
    and renames it into place), `--out -` wrote a file named "-", and a mistyped folder was
    created.
    """
    path = Path(path)
    if os.fspath(path) == "-":
        raise UsageError(f"expected {what}, received '-': kdsb writes a file, not standard "
                         "output (name a file, then read it)")
    if path.is_dir():
        raise UsageError(f"expected {what}, received a folder: {path}")
    if (path.exists() and not path.is_file()) or system_link(path):
        raise UsageError(f"expected {what}, received {path}, which is not a regular file (a "
                         "device, pipe or socket): kdsb writes a file beside it and renames it "
                         "into place; name a file")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"expected {what}, received a path in a folder that does not exist: "
                         f"{path.absolute().parent}")
    _require_writable_above(path, what)
    return path


def require_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path if it is a writable folder or can be made one, else raise
    `UsageError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"expected {what}, received a file: {path}")
    _require_writable_above(path, what)
    return path


def _require_writable_above(path: Path, what: str) -> None:
    """The nearest existing folder at or above `path` must be a folder that takes a new file
    (a read-only file system, or a folder without write permission, would otherwise fail the
    run at its end, after all its work)."""
    import tempfile

    path = path.absolute()
    nearest = next(folder for folder in (path, *path.parents) if folder.exists())
    if not nearest.is_dir():
        if nearest != path:
            raise UsageError(f"expected {what}, received a path under a file: {path}")
        nearest = nearest.parent
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise UsageError(f"expected {what}, received a path where nothing can be written "
                         f"({error.strerror}): {path}") from None
