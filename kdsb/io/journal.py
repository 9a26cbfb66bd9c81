"""A long run's journal: each finished patient's result on one JSON line, so a killed run resumes.

`kdsb predict`, `explain` and `embed` work through a cohort one patient at a time: hours at
1 mm for the DSB's 1,600 patients, days with `--tta` or occlusion. Each appends a line per
finished patient to a journal beside its output (`OUT_CSV.partial`, `OUT_DIR/explain.partial`,
`OUT_DIR/embed.partial`); a rerun of the same command takes the journal's results and works
only on the rest; the journal is removed once the output is written (a failed or killed run
keeps it, unless it holds no result to resume from).

A result is taken only when it is the one a fresh run would compute:

- the journal's first line is the run's fingerprint (the models by content, the options that
  change a result, the kdsb version): the journal of another run is discarded, not mixed in. The
  version is the package's: code changed in a source checkout keeps it, so delete the journals
  of runs begun before such a change;
- each entry carries its volume file's size, modification time and inode (and whatever else the
  command adds, e.g. embed's per-patient seed): a volume written again since is worked on again;
- a line cut short by the kill, and any line after an unreadable one, is dropped.

One run at a time writes a journal: the journal is its own lock (`kdsb.io.atomic.sole_writer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from kdsb._version import __version__

logger = logging.getLogger(__name__)

SUFFIX = ".partial"
T = TypeVar("T")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex (models are MBs: milliseconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loaded_with_digests(paths: Sequence[str | os.PathLike], load: Callable[[], T]
                        ) -> tuple[T, list[str]]:
    """`load()` (which reads the files at `paths`) and each file's `file_digest`, taken before
    and checked after loading, so the digests are those of what was loaded.

    Raises:
        UsageError: a file changed while it was loaded (a training run still writing it).
    """
    from kdsb.errors import UsageError

    digests = [file_digest(path) for path in paths]
    loaded = load()
    for path, digest in zip(paths, digests, strict=True):
        if file_digest(path) != digest:
            raise UsageError(f"expected model files that stay as they are, received {path}, "
                             "which changed while it was loaded: run again once it is written")
    return loaded, digests


def volume_stamp(path: str | os.PathLike) -> list[int]:
    """[size in bytes, modification time in ns, inode] of a volume file: a file written again
    differs, also where timestamps are coarse (FAT, some network disks) or were copied with
    the file (`cp -p`): kdsb writes by renaming a new file into place, a new inode (found in
    review)."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


class Journal:
    """The journal of one run (see the module docstring); open it with `open_journal`.

    Attributes:
        path: the journal file.
        held: how many results the journal held from an earlier run when it was opened (a
            result is taken only where its patient's volume is unchanged).
        finished: set by `finish` (or by a failure while the journal holds no result): the
            journal is removed when its block ends.
    """

    def __init__(self, path: Path, handle: BinaryIO, entries: dict[str, tuple[list, Any]]
                 ) -> None:
        self.path = path
        self._handle = handle
        self._entries = entries
        self.held = len(entries)
        self.finished = False

    def result(self, patient_id: str, stamp: list) -> Any | None:
        """The result the journal holds for `patient_id` if it was made from an input with this
        stamp, else None."""
        entry = self._entries.get(patient_id)
        return entry[1] if entry is not None and entry[0] == stamp else None

    @property
    def empty(self) -> bool:
        """Whether the journal holds no result, of this run or an earlier one."""
        return not self._entries

    def record(self, patient_id: str, stamp: list, result: Any) -> None:
        """Append one finished patient's result (JSON-serialisable) and flush it to the file."""
        self._entries[patient_id] = (stamp, result)
        line = json.dumps({"id": patient_id, "stamp": stamp, "result": result})
        self._handle.write(line.encode() + b"\n")
        self._handle.flush()

    def finish(self) -> None:
        """The run's output is written: remove the journal when its block ends."""
        self.finished = True


def _read_entries(handle: BinaryIO, fingerprint: Mapping[str, Any], path: Path
                  ) -> dict[str, tuple[list, Any]]:
    """The entries of a journal whose first line is `fingerprint`; the file is cut back to its
    last complete entry (a kill mid-line), or emptied and given the fingerprint when it belongs
    to another run or is new. `handle` appends (mode "a+b"): writes go to the end."""
    handle.seek(0)
    lines = handle.read().split(b"\n")
    entries: dict[str, tuple[list, Any]] = {}
    keep = 0  # bytes of complete, valid lines
    try:
        # A header without its newline (a kill while it was written) starts afresh.
        same_run = len(lines) > 1 and json.loads(lines[0]) == fingerprint
    except ValueError:
        same_run = False
    if same_run:
        keep = len(lines[0]) + 1
        for line in lines[1:-1]:  # the last piece follows the last newline: empty or cut short
            try:
                entry = json.loads(line)
                entries[str(entry["id"])] = (list(entry["stamp"]), entry["result"])
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line) + 1
    elif lines[0]:
        logger.info("%s: the journal of another run (other models, options or kdsb version) is "
                    "discarded", path)
    handle.truncate(keep)
    if not same_run:
        handle.write(json.dumps(fingerprint).encode() + b"\n")
        handle.flush()
    return entries


@contextmanager
def open_journal(path: str | os.PathLike, fingerprint: Mapping[str, Any], command: str
                 ) -> Iterator[Journal]:
    """Open (or start) the journal at `path` for a run with this fingerprint (JSON-serialisable),
    held against other runs until the block ends. Once the run's output is written, the caller
    calls `Journal.finish` and the journal is removed as the block ends; an error leaves it for
    the rerun, unless it holds no result.

    Raises:
        UsageError: another run of `command` holds the journal.
    """
    from kdsb.io.atomic import sole_writer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Another kdsb may compute otherwise. A JSON round trip, so that tuples and lists compare
    # equal with the stored line.
    fingerprint = json.loads(json.dumps({**fingerprint, "kdsb": __version__}))
    with sole_writer(path, f"kdsb {command}", "write the output somewhere else") as handle:
        journal = Journal(path, handle, _read_entries(handle, fingerprint, path))
        if journal.held:
            logger.info("%s: the journal of an earlier, unfinished run holds %d patient(s) (%s); "
                        "those whose volume is unchanged are not worked on again", command,
                        journal.held, path)
        try:
            yield journal
        except BaseException:
            # Nothing to resume from: no journal left behind (found by a user's trial: `embed`
            # of volumes it could not read left one holding no patient).
            journal.finished = journal.empty
            raise
        finally:
            if journal.finished and os.name == "posix":
                path.unlink(missing_ok=True)  # while locked: a run waiting takes a new file
    if journal.finished and os.name != "posix":
        # Elsewhere an open file cannot be deleted. (Not again on POSIX: a run that started
        # since holds a new journal at this path.)
        path.unlink(missing_ok=True)


@contextmanager
def optional_journal(path: str | os.PathLike | None, fingerprint: Mapping[str, Any], command: str
                     ) -> Iterator[Journal | None]:
    """`open_journal`, or None when `path` is None (a run without a journal)."""
    if path is None:
        yield None
        return
    with open_journal(path, fingerprint, command) as journal:
        yield journal
