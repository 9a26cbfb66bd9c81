"""Another process holding a kdsb lock file (`kdsb.io.atomic.sole_writer`), as a second run
writing the same folder would: POSIX record locks go with the process, so it must be another."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOLD = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)")


@contextmanager
def lock_held_elsewhere(lock_path: Path) -> Iterator[None]:
    """While the block runs, another process holds `lock_path`; it is killed as the block ends
    (a killed run leaves no lock)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
