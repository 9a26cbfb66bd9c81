"""Atomic file writes: write a hidden temporary file beside the target, then rename it.

A reader, or a run resumed after a kill, sees either the previous file or the complete new one,
never a half-written file. (Against a kill of the process; after a power loss a file renamed
moments before may still be incomplete: nothing is synced to disk, which would slow every
write.) Temporary files are named `.tmp-<pid>-<random>-<name>`: hidden, so
listings skip them, ending in the target's own suffix (Keras insists on `.keras`), and never the
same for two writers of one file (processes on two hosts of a cluster may share a pid).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from kdsb.errors import KdsbError, UsageError

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"


SYSTEM_FOLDERS = ("/dev", "/proc")  # devices and processes: /dev/stdout, /proc/self/fd/1


def system_link(path: str | os.PathLike) -> bool:
    """Whether `path` is a link in a `SYSTEM_FOLDERS` folder (/dev/stdout, /dev/fd/1), which
    may lead to a regular file (a shell's redirection): a file renamed there replaces the link
    for every process (found in review). Files in /dev/shm, a memory disk, are no links."""
    absolute = os.path.abspath(path)
    inside = any(absolute.startswith(root + os.sep) for root in SYSTEM_FOLDERS)
    return inside and Path(absolute).is_symlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto `path`, else removed.

    Raises:
        KdsbError: `path` (or where its link leads) exists and is not a regular file: renamed
            onto, a device's link (/dev/stdout) was replaced for every process (a user's trial).
    """
    path = Path(path)
    if (path.exists() and not path.is_file()) or system_link(path):
        raise KdsbError(f"{path}: expected a regular file to write, received something else "
                        "(a folder, device, pipe or socket)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):  # a read-only or full disk: the first error tells
            temp.unlink(missing_ok=True)


def save_figure(figure: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """Save a Matplotlib figure as PNG atomically (a killed run leaves no truncated image);
    `savefig` are `Figure.savefig`'s options (dpi). Returns the path."""
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", **savefig)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Write `payload` as indented JSON to `path` atomically; returns the path."""
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON record kdsb wrote (atomically: only outside damage breaks one).

    Raises:
        KdsbError: the file is unreadable or not valid JSON, naming it.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KdsbError(f"{path}: expected a JSON record, received an unreadable or damaged "
                        f"file ({error}): restore it, or start a new folder") from None


def remove_stale_temporaries(folder: str | os.PathLike,
                             targets: Collection[str] | Callable[[str], bool] | None = None,
                             idle_seconds: float | None = None) -> int:
    """Delete temporary files a killed writer left in `folder`; returns how many.

    Args:
        targets: only temporaries of files of these names, or of names this predicate accepts
            (a folder other commands write to as well keeps their files in progress); None:
            every temporary.
        idle_seconds: only temporaries not written to for this long (a folder that writers on
            other machines share, where no lock tells a live writer from a killed one); None:
            whatever their age.
    """
    removed = 0
    now = time.time()
    for temp in Path(folder).glob(f"{TEMP_PREFIX}*"):
        # .tmp-<pid>-<random>-<name>: the name may hold "-" itself, and be a temporary's own
        # (a writer writing atomically into a temporary of a set, `write_nifti_set`).
        name = temp.name
        while name.startswith(TEMP_PREFIX):
            name = name[len(TEMP_PREFIX):].split("-", 2)[-1]
        if targets is not None and not (targets(name) if callable(targets) else name in targets):
            continue
        if idle_seconds is not None:
            # A shared folder: another user's temporary may not be ours to delete, and its
            # writer may have finished meanwhile; neither stops the caller's work.
            try:
                if now - temp.stat().st_mtime < idle_seconds:
                    continue
                temp.unlink()
            except OSError as error:
                logger.debug("left %s: %s", temp, error)
                continue
        else:
            temp.unlink(missing_ok=True)
        removed += 1
    return removed


@contextmanager
def sole_writer(lock_path: str | os.PathLike, command: str, advice: str,
                remove: bool = False) -> Iterator[BinaryIO]:
    """Hold `lock_path` (created if needed) while a run writes the folder it lies in: two runs
    writing one folder (Slurm array jobs sharing it) would delete or overwrite each other's
    files. A POSIX record lock (`fcntl.lockf`, which NFS supports) goes with the process, so a
    killed run leaves no lock behind; without fcntl (Windows) runs are not guarded.

    Yields the lock file, open for reading and appending (binary): a journal's writer keeps its
    content there (`kdsb.io.journal`); closing any other handle of the file would release the
    lock. The holder may delete the file before it lets go: a run that opened it just before
    then finds the deleted file locked by no one, and takes the one now at `lock_path` instead.

    Args:
        lock_path: the lock file.
        command: the kind of run, for the message ("kdsb preprocess").
        advice: what to do instead of waiting, for the message.
        remove: delete the lock file as the block ends, success or not (while still held; POSIX:
            elsewhere an open file cannot be deleted), so the folder keeps no lock file.

    Raises:
        UsageError: another run holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    lock_path = Path(lock_path)
    while True:
        handle = open(lock_path, "a+b")  # closed below, or by the with
        try:
            if fcntl is None or _locked(fcntl, handle, lock_path, command, advice):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # the file was deleted by the run that held it: lock the new one
    with handle:
        try:
            yield handle
        finally:
            if remove and os.name == "posix":
                lock_path.unlink(missing_ok=True)


def _locked(fcntl: Any, handle: BinaryIO, lock_path: Path, command: str, advice: str) -> bool:
    """Lock `handle`'s file; False when it is no longer the file at `lock_path`."""
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            raise UsageError(f"expected no other {command} writing {lock_path.parent}, "
                             f"received one holding {lock_path}: wait for it, or "
                             f"{advice}") from None
        # No locks on this file system (NFS without a lock daemon, Lustre without flock).
        logger.warning("%s: file locks unavailable (%s): another run writing it would not "
                       "be noticed", lock_path.parent, error.strerror)
        return True
    try:
        return os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
