"""Real CT files for tests, from the totalsegmentator 2.18.0 source archive on PyPI.

The archive carries, under `tests/reference_files/`, a real 20-slice Siemens CT DICOM series in
JPEG 2000 (`example_ct_dicom/`) and a real chest CT in NIfTI (`aorta_report/example_ct.nii.gz`,
1.5 mm, full lungs). It is fetched once with `pip download` into a cache folder
(`$KDSB_TEST_DATA`, default `~/.cache/kdsb-test-data`); tests that need it skip when offline.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path

PACKAGE = "totalsegmentator==2.18.0"
MEMBER_PREFIX = "tests/reference_files/"


def cache_dir() -> Path:
    return Path(os.environ.get("KDSB_TEST_DATA", Path.home() / ".cache" / "kdsb-test-data"))


@cache
def reference_files() -> Path | None:
    """The `reference_files` folder, downloading it if needed; None when it cannot be had.

    A file lock makes parallel test processes (pytest-xdist) fetch it once, one after the other.
    """
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch()


def _fetch() -> Path | None:
    target = cache_dir() / "reference_files"
    if (target / "example_ct_dicom").is_dir():
        return target
    download = cache_dir() / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    archives = list(download.glob("totalsegmentator-2.18.0.tar.gz"))
    if not archives:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--no-binary", ":all:", "-d", str(download), PACKAGE],
                check=True, capture_output=True, timeout=300,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        archives = list(download.glob("totalsegmentator-2.18.0.tar.gz"))
        if not archives:
            return None
    with tarfile.open(archives[0]) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            if inner.startswith(MEMBER_PREFIX) and member.isfile():
                member.name = inner[len("tests/"):]
                tar.extract(member, cache_dir(), filter="data")
    return target if (target / "example_ct_dicom").is_dir() else None
