"""Keep TensorFlow's C++ log lines off the terminal (unless the user asks for them).

`TF_CPP_MIN_LOG_LEVEL=3` (set here unless the user set the variable; `KDSB_TF_LOG_LEVEL` holds
the level kdsb set, so a subprocess that inherits both is quieted the same way, while a level
the user sets later wins) keeps TensorFlow's C++ info, warning and error log lines off stderr
(such as tf.data's "E0000 … use_unbounded_threadpool" on every training run); errors that
matter reach Python as exceptions. Some start-up lines ("oneDNN custom operations are on",
absl's "All log messages before absl::InitializeLog() …") are written by C++ code straight to
file descriptor 2 before TensorFlow reads `TF_CPP_MIN_LOG_LEVEL`, so no setting silences them.
A one-shot import hook points descriptor 2 at a temporary file while TensorFlow's top module
executes, then writes back every captured line except that chatter (a real warning or error
still reaches the terminal).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import tempfile

from kdsb._keras_hook import unwrap_first_import, wrap_first_import

# Captured lines starting with one of these are dropped.
CHATTER = ("WARNING: All log messages before absl::InitializeLog()", "I0000 ")
LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "3"  # FATAL only
OURS_VARIABLE = "KDSB_TF_LOG_LEVEL"  # the level kdsb set (the user's when they differ)


def _level_is_ours() -> bool:
    return LEVEL_VARIABLE not in os.environ or (
        os.environ.get(OURS_VARIABLE) == os.environ[LEVEL_VARIABLE])


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
    """Unless the user set `TF_CPP_MIN_LOG_LEVEL`: set it to `QUIET_LEVEL` and filter
    TensorFlow's start-up chatter the first time it is imported (no-op if loaded)."""
    if not _level_is_ours():
        return
    os.environ[LEVEL_VARIABLE] = os.environ[OURS_VARIABLE] = QUIET_LEVEL
    wrap_first_import("tensorflow", _QuietLoader)


def show_tensorflow_logs() -> None:
    """Let every TensorFlow C++ log line through (`kdsb -v`), unless the user chose a level.

    Works until TensorFlow is imported: it reads the level once, when it loads.
    """
    if _level_is_ours():
        os.environ[LEVEL_VARIABLE] = os.environ[OURS_VARIABLE] = "0"
        unwrap_first_import("tensorflow")
