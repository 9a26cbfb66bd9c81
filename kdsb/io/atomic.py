"""Atomic file writes: write a hidden temporary file beside the target, then rename it.

A reader, or a run resumed after a kill, sees either the previous file or the complete new one,
never a half-written file. (Against a kill of the process; after a power loss a file renamed
moments before may still be incomplete: nothing is synced to disk, which would slow every
write.) Temporary files are named `.tmp-<pid>-<random>-<name>`: hidden, so
listings skip them, ending in the target's own suffix (Keras insists on `.keras`), and never the
same for two writers of one file (processes on two hosts of a cluster may share a pid).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Write `payload` as indented JSON to `path` atomically; returns the path."""
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = "*") -> int:
    """Delete temporary files a killed writer left in `folder`; returns how many."""
    removed = 0
    for temp in Path(folder).glob(f"{TEMP_PREFIX}{pattern}"):
        temp.unlink(missing_ok=True)
        removed += 1
    return removed
