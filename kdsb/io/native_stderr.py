"""What C and C++ code writes to the process's stderr (file descriptor 2) during a block, caught
instead of reaching the screen: SimpleITK's format libraries print their complaints there, not
in their exceptions, and kdsb folds them into its one-line errors."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from types import TracebackType

STDERR_FD = 2
REDIRECT_LOCK = threading.Lock()


class NativeStderr:
    """Context manager: what C and C++ code writes to file descriptor 2 inside the block.

    SimpleITK's MetaImage and NIfTI libraries print their complaints there ("MetaImage:
    M_ReadElementsData: data not read completely …", "** ERROR: nifti_…"), not in the exception.
    The block's output goes to a temporary file instead of the screen; afterwards `text` holds it
    on one line, for the error message (or a warning). Anything else writing to the process's
    stderr during the block (another thread) lands there too: delayed, not lost. The descriptor
    is the process's, so blocks in several threads (a Dask worker's patients) take turns
    (`REDIRECT_LOCK`): overlapping ones would swap each other's text and leave stderr pointing
    at a deleted file.
    """

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> NativeStderr:
        REDIRECT_LOCK.acquire()
        try:
            sys.stderr.flush()
            self._sink = tempfile.TemporaryFile()
            self._saved = os.dup(STDERR_FD)
            os.dup2(self._sink.fileno(), STDERR_FD)
        except BaseException:
            REDIRECT_LOCK.release()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            os.dup2(self._saved, STDERR_FD)
            os.close(self._saved)
            self._sink.seek(0)
            self.text = " ".join(self._sink.read().decode(errors="replace").split())
            self._sink.close()
        finally:
            REDIRECT_LOCK.release()
