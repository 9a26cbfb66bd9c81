"""Keep TensorFlow's C++ start-up lines off the terminal while `import tensorflow` runs.

Some of them ("oneDNN custom operations are on", absl's "All log messages before
absl::InitializeLog() …") are written by C++ code straight to file descriptor 2 before
TensorFlow reads `TF_CPP_MIN_LOG_LEVEL`, so no setting silences them. A one-shot import hook
points descriptor 2 at a temporary file while TensorFlow's top module executes, then writes back
every captured line except that chatter (a real warning or error still reaches the terminal).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import tempfile

from kdsb._keras_hook import wrap_first_import

# Captured lines starting with one of these are dropped.
CHATTER = ("WARNING: All log messages before absl::InitializeLog()", "I0000 ")


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self._loader.exec_module(module)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                    if not line.startswith(CHATTER):
                        sys.stderr.write(line)


def quiet_tensorflow_start_up() -> None:
    """Filter TensorFlow's start-up chatter the first time it is imported (no-op if loaded)."""
    wrap_first_import("tensorflow", _QuietLoader)
